"""The rest of a run in a child forked at its start (sqlindexer/overlap.py).

Every fork here happens in a fresh Python process: the test process has threads (the tiny
model's build starts some), and overlap refuses to fork a threaded process, so the runs
that pytest makes in-process (CliRunner) take the in-process path, and these tests cover
the forked one: the protocol itself on small scripts, then whole runs of the CLI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_subprocess, live_in_group, make_photo, open_db, read_jsonl

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/task").is_dir(),
                                reason="needs fork and Linux /proc")

# A parent that forks a Helper with one of the works below and prints, as JSON, what came
# back: the records its logging got, the progress events, and the exception run() raised.
SCRIPT = textwrap.dedent('''
    import json, logging, os, signal, sys, threading, time
    from sqlindexer import errors, overlap

    case, marker = sys.argv[1], sys.argv[2]
    got = {"logs": [], "progress": [], "raised": None, "parent": os.getpid()}

    class Keep(logging.Handler):
        def emit(self, record):
            got["logs"].append([record.name, record.levelname, record.getMessage()])

    logging.getLogger("sqlindexer").addHandler(Keep())
    logging.getLogger("sqlindexer").setLevel(logging.INFO)
    log = logging.getLogger("sqlindexer.work")

    import contextlib
    @contextlib.contextmanager
    def progress(desc, total):
        got["progress"].append(["open", desc, total])
        yield lambda n: got["progress"].append(["tick", n])
        got["progress"].append(["close", desc])

    def prepare():
        open(marker, "a").write("prepared\\n")
        if case == "prepare-fails":
            raise errors.ModelLoadError("cannot load model 'm': no such folder")
        if case in ("slow-prepare", "parent-dies"):
            time.sleep(60)
        return 41

    def work(payload, prepared, progress):
        log.info("child %d got %s", os.getpid(), payload)
        if case == "ok":
            with progress("embedding", 3) as tick:
                for _ in range(3):
                    tick(1)
            log.warning("prepared gave %d", prepared() + 1)
        elif case == "prepare-fails":
            prepared()
        elif case == "error":
            raise errors.ConfigError("config.yaml: unknown key 'x'")
        elif case == "crash":
            raise ValueError("boom")
        elif case == "threads":
            # Records larger than a pipe from a thread, while the main thread sends progress.
            def talk():
                for i in range(30):
                    log.info("t %d %s", i, "t" * 200000)
            other = threading.Thread(target=talk)
            other.start()
            while other.is_alive():
                with progress("bar", 1):
                    pass
            other.join()
        elif case == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        elif case == "signal":
            try:
                time.sleep(60)
            finally:
                open(marker, "a").write("stopped\\n")

    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    helper = overlap.Helper.fork(prepare, work)
    assert helper is not None, "fork refused"
    started = time.monotonic()
    try:
        if case == "dismissed":
            pass
        elif case == "slow-prepare":
            helper.prepare()
            time.sleep(0.5)
        elif case == "parent-dies":
            helper.prepare()
            print(helper.pid, flush=True)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            if case == "signal":
                threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            helper.run({"run": 7}, progress)
    except BaseException as e:
        got["raised"] = [type(e).__name__, str(e)]
    finally:
        helper.close()
    got["seconds"] = time.monotonic() - started
    got["child"] = helper.pid
    print(json.dumps(got))
''')


def _helper(tmp_path: Path, case: str) -> tuple[dict, Path]:
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    marker = tmp_path / f"{case}.marker"
    proc = subprocess.run([sys.executable, str(script), case, str(marker)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), marker


def test_logs_progress_and_the_prepared_value_reach_the_parent(tmp_path):
    got, marker = _helper(tmp_path, "ok")
    assert got["raised"] is None
    (name, level, text), last = got["logs"]
    assert (name, level) == ("sqlindexer.work", "INFO")
    assert text == f"child {got['child']} got {{'run': 7}}" and got["child"] != got["parent"]
    assert last == ["sqlindexer.work", "WARNING", "prepared gave 42"]
    events = got["progress"]
    assert events[0] == ["open", "embedding", 3] and events[-1] == ["close", "embedding"]
    assert sum(n for kind, n in (e[:2] for e in events) if kind == "tick") == 3
    assert marker.read_text() == "prepared\n"


def test_records_larger_than_a_pipe_from_a_thread_arrive_whole_among_the_main_thread_s(tmp_path):
    got, _ = _helper(tmp_path, "threads")
    assert got["raised"] is None
    assert [text for _, _, text in got["logs"][1:]] == [f"t {i} {'t' * 200000}" for i in range(30)]
    events = got["progress"]
    assert events and events == [["open", "bar", 1], ["close", "bar"]] * (len(events) // 2)


@pytest.mark.parametrize("case, raised", [
    ("error", ["ConfigError", "config.yaml: unknown key 'x'"]),
    ("prepare-fails", ["ModelLoadError", "cannot load model 'm': no such folder"]),
])
def test_the_child_s_error_is_raised_in_the_parent_as_it_was(tmp_path, case, raised):
    got, _ = _helper(tmp_path, case)
    assert got["raised"] == raised


def test_a_bug_in_the_child_comes_back_with_its_traceback(tmp_path):
    got, _ = _helper(tmp_path, "crash")
    name, text = got["raised"]
    assert name == "ChildProcessFailed"
    assert "Traceback" in text and "ValueError: boom" in text and "in work" in text


def test_a_child_killed_without_a_word_is_reported_by_the_signal(tmp_path):
    got, _ = _helper(tmp_path, "killed")
    name, text = got["raised"]
    assert name == "ProcessDiedError"
    assert "was killed by SIGKILL" in text and "run the same command to resume" in text


def test_a_signal_to_the_parent_stops_the_child_then_reaches_the_parent(tmp_path):
    got, marker = _helper(tmp_path, "signal")
    # The child unwound (its finally ran), then the parent's own handler got the signal.
    assert marker.read_text() == "prepared\nstopped\n"
    assert got["raised"] == ["Stopped", "SIGTERM"]
    assert got["seconds"] < 10


def test_a_dismissed_child_never_prepares(tmp_path):
    got, marker = _helper(tmp_path, "dismissed")
    assert got["raised"] is None
    assert not marker.exists()


def test_a_child_still_preparing_is_killed_not_waited_for(tmp_path):
    got, marker = _helper(tmp_path, "slow-prepare")
    assert marker.read_text() == "prepared\n"
    assert got["seconds"] < 10  # prepare() sleeps 60 s


def test_a_child_leaves_when_its_parent_dies_even_while_preparing(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "marker"
    # Output to a file: a pipe would be held open by the child, and reading it to its end
    # would wait for the child.
    with open(tmp_path / "out", "w+") as out:
        proc = subprocess.Popen([sys.executable, str(script), "parent-dies", str(marker)], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.wait(timeout=60) == -signal.SIGKILL
        out.seek(0)
        child = Path(f"/proc/{int(out.read())}/stat")
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the child outlived its parent"  # its prepare() sleeps 60 s
    assert marker.read_text() == "prepared\n"


def _running(stat: Path) -> bool:
    try:
        text = stat.read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"  # an orphan's zombie waits for init to reap it


# -- whole runs ------------------------------------------------------------------------
# Guarded: the decode workers are spawned, and import the main module again.
RUN = textwrap.dedent('''
    import sys
    from sqlindexer import overlap
    from sqlindexer.cli import cli
    if __name__ == "__main__":
        if sys.argv[1] == "in-process":
            overlap.available = lambda: False
        try:
            cli.main(sys.argv[2:], standalone_mode=False)
        finally:
            print("torch imported:", "torch" in sys.modules)
''')


def _photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_photo(folder / f"p{i:04d}.jpg", color=(i * 37 % 256, 80, 200 - i % 200), seed=i) for i in range(n)]


def test_the_forked_run_writes_what_the_in_process_run_writes_and_never_imports_torch(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    _photos(photos, 6)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    script = tmp_path / "run.py"
    script.write_text(RUN)
    outputs = {}
    for how in ("forked", "in-process"):
        out = tmp_path / how / "index.jsonl"
        out.parent.mkdir()
        proc = subprocess.run([sys.executable, str(script), how, "-i", str(photos), "-o", str(out), "--model-name",
                               str(tiny_model), "--log-level", "INFO"],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
        assert proc.returncode == 0, proc.stderr
        # The scanning process never imports torch when the child embeds.
        assert proc.stdout.strip() == f"torch imported: {how == 'in-process'}"
        # The child's log lines (the model it loaded, the file it could not read) are the
        # parent's, in the order the child wrote them.
        err = proc.stderr
        assert f"INFO: loaded {tiny_model} on cpu" in err
        assert "WARNING: skipping" in err and "broken.jpg" in err
        assert err.index("INFO: loaded") < err.index("INFO: embedded 6 images")
        assert "scanned 7, new 7, modified 0, unchanged 0, deleted 0, failed 1, exported 6" in err
        outputs[how] = out.read_bytes()
    assert outputs["forked"] == outputs["in-process"]
    assert len(read_jsonl(tmp_path / "forked" / "index.jsonl")) == 6


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _start(photos: Path, out: Path, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sqlindexer", "-i", str(photos), "-o", str(out), "--model-name",
                             str(model), "--log-level", "DEBUG", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)), start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"no {prefix!r} line:\n{''.join(lines)}")


def _kill_group(proc: subprocess.Popen) -> None:
    if live_in_group(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _gone(pgid: int, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := live_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _resumes(photos: Path, out: Path, model: Path, n: int) -> None:
    done = cli_subprocess("-i", photos, "-o", out, "--model-name", model)
    assert done.returncode == 0, done.stderr
    with open_db(out.with_suffix(".sqlite")) as conn:
        assert conn.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0] == n
    assert len(read_jsonl(out)) == n


def test_a_child_that_dies_fails_the_run_in_one_line_and_the_next_run_resumes(tmp_path, tiny_model):
    photos, out = tmp_path / "photos", tmp_path / "index.jsonl"
    _photos(photos, 12)
    proc = _start(photos, out, tiny_model)
    try:
        _wait_for_line(proc, "DEBUG: scanning")
        (child,) = _children(proc.pid)  # the only child: the decode workers are the child's
        os.kill(child, signal.SIGKILL)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    finally:
        _kill_group(proc)
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert errors == [("Error: the process that embeds and exports for this run was killed by SIGKILL "
                       "(out of memory?); committed work is kept, run the same command to resume")], err
    assert "Traceback" not in err
    with open_db(out.with_suffix(".sqlite")) as conn:
        assert conn.execute("SELECT status FROM runs ORDER BY id DESC").fetchone()[0] == "failed"
    _resumes(photos, out, tiny_model, 12)


def test_the_child_and_its_workers_die_with_the_parent(tmp_path, tiny_model):
    photos, out = tmp_path / "photos", tmp_path / "index.jsonl"
    _photos(photos, 300)
    proc = _start(photos, out, tiny_model, "--batch-size", "2", "--workers", "1")
    try:
        _wait_for_line(proc, "DEBUG: embedding")
        deadline = time.monotonic() + 30
        while len(live_in_group(proc.pid)) < 3 and time.monotonic() < deadline:  # parent, child, a decode worker
            time.sleep(0.01)
        assert len(live_in_group(proc.pid)) >= 3
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        left = _gone(proc.pid)
    finally:
        _kill_group(proc)
    assert not left, f"outlived the run: {left}"
    with open_db(out.with_suffix(".sqlite")) as conn:
        done = conn.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0]
    assert done < 300, "the embedding was over before the parent was killed: make it longer"
    _resumes(photos, out, tiny_model, 300)


def test_ctrl_c_in_a_terminal_shows_the_child_s_bars_then_stops_in_one_line(tmp_path, tiny_model):
    pty, termios, fcntl = (pytest.importorskip(m) for m in ("pty", "termios", "fcntl"))
    import select
    import struct

    photos, out = tmp_path / "photos", tmp_path / "index.jsonl"
    _photos(photos, 200)
    pid, fd = pty.fork()
    if pid == 0:  # the child of pty.fork: becomes the run, in a terminal of its own
        try:
            os.environ.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
            os.execv(sys.executable, [sys.executable, "-m", "sqlindexer", "-i", str(photos), "-o", str(out),
                                      "--model-name", str(tiny_model), "--batch-size", "2", "--workers", "1"])
        finally:
            os._exit(127)
    # A terminal of 100 columns (a new one has none, and tqdm then draws nothing).
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    screen, deadline = b"", time.monotonic() + 120
    pressed = False
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # the run has ended: the terminal is gone
            break
        if not data:
            break
        screen += data
        # The child's embedding bar, drawn by the parent, past its first image.
        if not pressed and re.search(rb"embedding: [^\r]*\| *[1-9][0-9]*/200 \[", screen):
            os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the run's process group
            pressed = True
    _, status = os.waitpid(pid, 0)
    text = screen.decode("utf-8", "replace")
    assert pressed, text
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGINT, text
    assert "Traceback" not in text
    errors = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("Error")]
    assert errors == ["Error: interrupted by SIGINT; committed work is kept, run the same command to resume"], text
    with open_db(out.with_suffix(".sqlite")) as conn:
        assert conn.execute("SELECT status FROM runs").fetchone()[0] == "interrupted"
        done = conn.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0]
    assert 0 < done < 200
