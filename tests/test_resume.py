"""Kill and resume: a run stopped by SIGKILL, SIGTERM or SIGINT in the middle of embedding
keeps what it committed, never leaves a partial index, and the next run finishes the job
without embedding anything twice, ending with the same index as an uninterrupted run.

Every run is a real `python -m sqlindexer` subprocess on real JPEG/PNG files with the tiny
random SigLIP 2 from conftest; progress is watched through the state database itself.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, live_in_group, make_photo, open_db, read_jsonl

from sqlindexer.errors import LockedError
from sqlindexer.lock import RunLock

BATCH = 4
# Two folders: `a` alone is the "previous" tree of the tests that start from an existing
# index, `a` + `b` the final one. Large JPEGs and PNGs make each batch take a moment, so
# that the run can be caught, and stopped, between its first and its last batch.
N_A = 12
N_B = 12
N_ALL = N_A + N_B


def _tree_file(i: int) -> tuple[str, dict]:
    if i % 7 == 3:
        return f"img{i:03d}.png", dict(size=(3000, 2000))
    if i % 3 == 0:
        return f"img{i:03d}.jpg", dict(size=(1500, 1000))
    return f"img{i:03d}.jpg", dict(size=(120, 90) if i % 2 else (90, 120))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The shared, read-only photo tree: a/ (N_A files) and b/ (N_B files), all distinct."""
    root = tmp_path_factory.mktemp("tree")
    for i in range(N_ALL):
        name, kwargs = _tree_file(i)
        folder = root / ("a" if i < N_A else "b")
        make_photo(folder / name, color=(i * 9 % 256, 120, 255 - i * 5 % 256), seed=i, **kwargs)
    return root


@pytest.fixture(scope="module")
def baseline(tree, tiny_model, tmp_path_factory) -> list[dict]:
    """The index of the whole tree by one uninterrupted run, with its own output and state DB."""
    folder = tmp_path_factory.mktemp("baseline")
    out = folder / "index.jsonl"
    proc = Indexer([tree], out, tiny_model).start()
    assert proc.wait() == 0, proc.stderr()
    records = read_jsonl(out)
    assert len(records) == N_ALL
    return records


# -- running and watching the indexer --------------------------------------------------
def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")


@dataclass
class Indexer:
    inputs: list[Path]
    out: Path
    model: Path
    reindex: bool = False
    proc: subprocess.Popen | None = None
    _log: Path | None = None

    @property
    def state(self) -> Path:
        return self.out.with_suffix(".sqlite")

    def start(self) -> Indexer:
        args = [sys.executable, "-m", "sqlindexer", "-i", *map(str, self.inputs), "-o", str(self.out),
                "--model-name", str(self.model), "--batch-size", str(BATCH)]
        if self.reindex:
            args.append("--reindex")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        n = len(list(self.out.parent.glob("stderr-*.txt")))
        self._log = self.out.parent / f"stderr-{n}.txt"
        with open(self._log, "wb") as err:
            # Its own session: a process group to send Ctrl-C to, and to clean up.
            # No core file (the hang's SIGABRT): the stacks go to stderr instead.
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=_env(), start_new_session=True,
                                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
        return self

    def wait(self, timeout: float = 300) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A hang says where: faulthandler (PYTHONFAULTHANDLER) writes every thread's
            # stack to stderr on SIGABRT, and the failure shows that stderr.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.cleanup()
            pytest.fail(f"the indexer did not end within {timeout} s; its stderr:\n{self.stderr()[-6000:]}")

    def stderr(self) -> str:
        return self._log.read_text(errors="replace") if self._log else ""

    def run_id(self) -> int | None:
        row = _query(self.state, "SELECT id FROM runs WHERE pid = ? ORDER BY id DESC LIMIT 1", (self.proc.pid,))
        return row[0] if row else None

    def wait_for_embedded(self, at_least: int = 1, timeout: float = 180) -> int:
        """Poll the state DB (read-only) until this run has committed at_least vectors."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"indexer ended (exit {self.proc.returncode}) before it could be stopped:\n"
                            f"{self.stderr()}")
            row = _query(self.state, "SELECT embedded FROM runs WHERE pid = ? ORDER BY id DESC LIMIT 1",
                         (self.proc.pid,))
            if row is not None and row[0] >= at_least:
                return row[0]
            if time.monotonic() > deadline:
                self.cleanup()
                pytest.fail(f"no progress within {timeout} s:\n{self.stderr()}")
            time.sleep(0.01)

    def cleanup(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=30)


def _query(db: Path, sql: str, params=()) -> tuple | None:
    """One read-only query that tolerates the database being absent, locked or not yet
    migrated (the writer is running)."""
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None
    except sqlite3.Error:  # database is locked, no such table, ...
        return None
    finally:
        conn.close()


@pytest.fixture
def indexers():
    """Indexers started by a test; any still alive at the end are killed, with their group."""
    started: list[Indexer] = []

    def make(*args, **kwargs) -> Indexer:
        ix = Indexer(*args, **kwargs)
        started.append(ix)
        return ix

    yield make
    for ix in started:
        ix.cleanup()


# -- checks ----------------------------------------------------------------------------
def _nothing_left_behind(ix: Indexer, grace: float = 10) -> None:
    """A SIGKILLed run leaves no helper processes running (decoder workers and the like
    must notice that their parent is gone)."""
    if not Path("/proc/self/stat").exists():
        return
    deadline = time.monotonic() + grace
    while (left := live_in_group(ix.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes of the killed run are still alive:\n" + "\n".join(left)


def _integrity(db: Path) -> None:
    with open_db(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _runs(db: Path) -> list[sqlite3.Row]:
    with open_db(db) as conn:
        return conn.execute("SELECT * FROM runs ORDER BY id").fetchall()


def _ok_rows(db: Path) -> dict[str, tuple]:
    """path -> (embedding, changed_run, build) of every committed vector."""
    with open_db(db) as conn:
        return {
            r["path"]: (r["embedding"], r["changed_run"], r["build"])
            for r in conn.execute("SELECT path, embedding, changed_run, build FROM files WHERE status = 'ok'")
        }


def _snapshot(path: Path) -> tuple[bytes, int] | None:
    if not path.exists():
        return None
    return path.read_bytes(), path.stat().st_mtime_ns


def _no_partial_output(out: Path, previous: tuple[bytes, int] | None) -> None:
    """The index is absent or exactly the previous complete one; no temporary file is left
    where a reader could mistake it for the index."""
    assert _snapshot(out) == previous
    assert not out.with_name(out.name + ".tmp").exists()


def _killed_after_its_first_batch(ix: Indexer, out: Path, previous: tuple[bytes, int] | None) -> None:
    """SIGKILL a started run once it has committed a batch; it leaves no process, the index
    as it was, and a sound database."""
    ix.wait_for_embedded(1)
    ix.proc.send_signal(signal.SIGKILL)
    assert ix.wait() == -signal.SIGKILL
    _nothing_left_behind(ix)
    _no_partial_output(out, previous)
    _integrity(ix.state)


def assert_same_index(got: list[dict], want: list[dict], *, got_root: Path, want_root: Path) -> None:
    """Record for record: same files (relative to their roots), same metadata except the
    path itself and creation_time, vectors equal within 1e-5."""

    def keyed(records, root):
        out = {}
        for r in records:
            rel = Path(r["metadata"]["path"]).relative_to(root).as_posix()
            assert rel not in out, f"{rel} exported twice"
            out[rel] = r
        return out

    g, w = keyed(got, got_root), keyed(want, want_root)
    assert sorted(g) == sorted(w)
    # The export is in path order; the same relative layout gives the same order.
    assert [Path(r["metadata"]["path"]).relative_to(got_root).as_posix() for r in got] == \
        [Path(r["metadata"]["path"]).relative_to(want_root).as_posix() for r in want]
    for rel in g:
        gm = {k: v for k, v in g[rel]["metadata"].items() if k not in ("path", "creation_time")}
        wm = {k: v for k, v in w[rel]["metadata"].items() if k not in ("path", "creation_time")}
        assert gm == wm, rel
        gv, wv = np.asarray(g[rel]["vector"]), np.asarray(w[rel]["vector"])
        assert gv.shape == wv.shape and gv.ndim == 1 and gv.size > 0, rel
        np.testing.assert_allclose(gv, wv, rtol=0, atol=1e-5, err_msg=rel)


def _copy_tree(src: Path, dst: Path) -> None:
    # copy2 keeps mtimes, so the copies export the same modification_time as the originals.
    shutil.copytree(src, dst, copy_function=shutil.copy2, dirs_exist_ok=True)


def _one_line_interrupted(stderr: str, signame: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, stderr
    assert "interrupted" in lines[0] and signame in lines[0], lines[0]
    assert stderr.rstrip().splitlines()[-1] == lines[0], "the interruption is not the last word on stderr"


# -- SIGKILL ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_embedding_then_resume(tree, baseline, tiny_model, tmp_path, indexers):
    out = tmp_path / "out" / "index.jsonl"
    first = indexers([tree], out, tiny_model).start()
    first.wait_for_embedded(1)
    # While it runs, the lock names it.
    with pytest.raises(LockedError, match=f"pid {first.proc.pid}"):
        RunLock(first.state).acquire()
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    _nothing_left_behind(first)

    _integrity(first.state)
    _no_partial_output(out, None)
    [run] = _runs(first.state)
    assert run["status"] == "running" and run["pid"] == first.proc.pid
    committed = _ok_rows(first.state)
    assert 0 < len(committed) < N_ALL, f"killed after {len(committed)} of {N_ALL}: not mid-embedding"
    # The counters were committed with the vectors they count.
    assert run["embedded"] == len(committed)
    assert {changed_run for _, changed_run, _ in committed.values()} == {run["id"]}

    second = indexers([tree], out, tiny_model).start()
    assert second.wait() == 0, second.stderr()
    assert_same_index(read_jsonl(out), baseline, got_root=tree, want_root=tree)

    runs = _runs(first.state)
    assert [r["status"] for r in runs] == ["interrupted", "completed"]
    assert runs[1]["build"] == runs[0]["build"], "the second run did not resume the first one's build"
    # Nothing embedded twice: what the killed run committed was kept as it was.
    assert runs[1]["embedded"] == N_ALL - len(committed)
    assert sum(r["embedded"] for r in runs) == N_ALL
    after = _ok_rows(first.state)
    assert len(after) == N_ALL
    for path, row in committed.items():
        assert after[path] == row, f"{path} was embedded again"
    _integrity(first.state)


@pytest.mark.slow
def test_killed_full_rebuild_keeps_previous_index_then_resumes(tree, baseline, tiny_model, tmp_path, indexers):
    photos = tmp_path / "photos"
    _copy_tree(tree / "a", photos / "a")
    out = tmp_path / "out" / "index.jsonl"
    first = indexers([photos], out, tiny_model).start()
    assert first.wait() == 0, first.stderr()
    previous = _snapshot(out)
    assert len(read_jsonl(out)) == N_A

    _copy_tree(tree / "b", photos / "b")
    rebuild = indexers([photos], out, tiny_model).start()  # a full build: everything again
    _killed_after_its_first_batch(rebuild, out, previous)
    runs = _runs(rebuild.state)
    assert [r["status"] for r in runs] == ["completed", "running"]
    this_build = runs[1]["build"]
    assert this_build != runs[0]["build"]
    committed = {p: row for p, row in _ok_rows(rebuild.state).items() if row[2] == this_build}
    assert 0 < len(committed) < N_ALL, f"killed after {len(committed)} of {N_ALL}: not mid-embedding"
    assert runs[1]["embedded"] == len(committed)

    resume = indexers([photos], out, tiny_model).start()
    assert resume.wait() == 0, resume.stderr()
    assert_same_index(read_jsonl(out), baseline, got_root=photos, want_root=tree)
    runs = _runs(rebuild.state)
    assert [r["status"] for r in runs] == ["completed", "interrupted", "completed"]
    assert runs[2]["build"] == this_build
    assert runs[2]["embedded"] == N_ALL - len(committed)
    assert runs[1]["embedded"] + runs[2]["embedded"] == N_ALL
    after = _ok_rows(rebuild.state)
    assert {row[2] for row in after.values()} == {this_build}, "a file kept a vector of the old build"
    for path, row in committed.items():
        assert after[path] == row, f"{path} was embedded again"


@pytest.mark.slow
def test_killed_reindex_resumes(tree, baseline, tiny_model, tmp_path, indexers):
    photos = tmp_path / "photos"
    _copy_tree(tree / "a", photos / "a")
    # Older versions of three of b's files, and two files that will be deleted.
    b_names = sorted(p.name for p in (tree / "b").iterdir())
    modified = b_names[:3]
    for k, name in enumerate(modified):
        make_photo(photos / "b" / name, size=(80, 60), color=(10, 10, 10), seed=100 + k)
    for k in range(2):
        make_photo(photos / "b" / f"extra{k}.jpg", seed=200 + k)
    out = tmp_path / "out" / "index.jsonl"
    first = indexers([photos], out, tiny_model).start()
    assert first.wait() == 0, first.stderr()
    previous = _snapshot(out)
    assert len(read_jsonl(out)) == N_A + 5
    unchanged = {p: row for p, row in _ok_rows(first.state).items() if Path(p).is_relative_to(photos / "a")}
    assert len(unchanged) == N_A

    for k in range(2):
        (photos / "b" / f"extra{k}.jpg").unlink()
    _copy_tree(tree / "b", photos / "b")  # the three modified files and N_B - 3 new ones
    reindex = indexers([photos], out, tiny_model, reindex=True).start()
    _killed_after_its_first_batch(reindex, out, previous)
    runs = _runs(reindex.state)
    assert [(r["mode"], r["status"]) for r in runs] == [("full", "completed"), ("reindex", "running")]
    assert 0 < runs[1]["embedded"] < N_B, f"killed after {runs[1]['embedded']} of {N_B}: not mid-embedding"
    killed_at = _ok_rows(reindex.state)

    resume = indexers([photos], out, tiny_model, reindex=True).start()
    assert resume.wait() == 0, resume.stderr()
    assert_same_index(read_jsonl(out), baseline, got_root=photos, want_root=tree)
    runs = _runs(reindex.state)
    assert [(r["mode"], r["status"]) for r in runs] == \
        [("full", "completed"), ("reindex", "interrupted"), ("reindex", "completed")]
    # Only b's new and modified files were embedded, each once, over the two reindex runs.
    assert runs[1]["embedded"] + runs[2]["embedded"] == N_B
    assert runs[1]["deleted"] + runs[2]["deleted"] == 2
    after = _ok_rows(reindex.state)
    for path, row in unchanged.items():
        assert after[path] == row, f"unchanged {path} was embedded again"
    for path, row in killed_at.items():
        if row[1] == runs[1]["id"]:
            assert after[path] == row, f"{path}, committed before the kill, was embedded again"


# -- SIGTERM and SIGINT ----------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_then_sigint_then_complete(tree, baseline, tiny_model, tmp_path, indexers):
    out = tmp_path / "out" / "index.jsonl"
    done = 0
    stops = [
        # `kill PID`, to the indexer alone; Ctrl-C, as a terminal sends it, to its whole group.
        ("SIGTERM", lambda p: p.send_signal(signal.SIGTERM), 143),
        ("SIGINT", lambda p: os.killpg(p.pid, signal.SIGINT), 130),
    ]
    for signame, send, code in stops:
        ix = indexers([tree], out, tiny_model).start()
        ix.wait_for_embedded(1)
        send(ix.proc)
        assert ix.wait() == code, ix.stderr()
        _one_line_interrupted(ix.stderr(), signame)
        _integrity(ix.state)
        _no_partial_output(out, None)
        run = _runs(ix.state)[-1]
        assert run["pid"] == ix.proc.pid
        assert run["status"] == "interrupted" and signame in run["error"], dict(run)
        assert run["finished_at"] is not None
        with open_db(ix.state) as conn:
            # A signal must never turn into a failed file (it would stay out of the index).
            assert conn.execute("SELECT count(*) FROM files WHERE status = 'failed'").fetchone()[0] == 0
            ok = conn.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0]
        assert run["failed"] == 0 and run["embedded"] == ok - done
        assert done < ok < N_ALL, f"stopped after {ok} of {N_ALL}: not mid-embedding"
        done = ok
        # The lock went with the process.
        RunLock(ix.state).acquire().release()

    last = indexers([tree], out, tiny_model).start()
    assert last.wait() == 0, last.stderr()
    assert_same_index(read_jsonl(out), baseline, got_root=tree, want_root=tree)
    runs = _runs(last.state)
    assert [r["status"] for r in runs] == ["interrupted", "interrupted", "completed"]
    assert len({r["build"] for r in runs}) == 1
    assert runs[-1]["embedded"] == N_ALL - done
    assert sum(r["embedded"] for r in runs) == N_ALL


def test_signal_during_decode_is_not_swallowed(tmp_path):
    """The decoder turns any Exception into "this file failed"; the signal handler's
    exception must get through it, or a Ctrl-C would mark a good file failed and the run
    would go on."""
    from sqlindexer import images
    from sqlindexer.signals import as_interrupts as _signals_as_interrupts

    big = make_photo(tmp_path / "big.png", size=(4000, 3000), seed=5)
    start = time.perf_counter()
    images.decode(str(big))
    took = time.perf_counter() - start
    if took < 0.05:
        pytest.skip(f"decoding took only {took * 1000:.0f} ms: too fast to land a signal inside it")
    timer = threading.Timer(min(0.02, took / 4), os.kill, (os.getpid(), signal.SIGTERM))
    with _signals_as_interrupts():
        timer.start()
        try:
            with pytest.raises(BaseException) as caught:
                images.decode(str(big))
                time.sleep(5)  # not reached when the signal got through the decoder
        finally:
            timer.join()
    assert not isinstance(caught.value, Exception), f"an Exception can be swallowed: {caught.value!r}"
    assert getattr(caught.value, "signum", None) == signal.SIGTERM
