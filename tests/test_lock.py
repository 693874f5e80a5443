"""One run per working database: a second run is refused at once, naming the holder, and
a holder that dies (even by SIGKILL) leaves no stale lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_photo, read_jsonl

from sqlindexer.errors import LockedError
from sqlindexer.lock import RunLock

HOLDER = """
import sys, time
from pathlib import Path
from sqlindexer.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sqlindexer", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def _start_holder(db_path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db_path)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    line = holder.stdout.readline()
    assert line.strip() == "locked", f"holder did not take the lock: {line!r}"
    return holder


def _photos(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        make_photo(folder / f"p{i}.jpg", seed=i)
    return folder


def _wait_for_run_row(state: Path, proc: subprocess.Popen, timeout: float = 120) -> tuple:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never recorded itself"
        try:
            conn = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=0.2)
            try:
                row = conn.execute("SELECT status, pid FROM runs ORDER BY id DESC LIMIT 1").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:  # not created, not migrated yet, or locked
            row = None
        if row is not None:
            return row
        time.sleep(0.02)


@pytest.mark.slow
def test_second_run_is_refused_while_locked_and_runs_after_holder_is_killed(tmp_path, tiny_model):
    photos = _photos(tmp_path / "photos", 4)
    out = tmp_path / "index.jsonl"
    state = tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--model-name", tiny_model, "--batch-size", "2"]

    # 1. A process that holds the lock and sleeps: the CLI is refused at once, naming it.
    holder = _start_holder(state)
    try:
        started = time.monotonic()
        refused = _cli(*args, timeout=60)
        elapsed = time.monotonic() - started
        assert refused.returncode != 0, refused.stderr
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, refused.stderr
        assert f"pid {holder.pid}" in lines[0] and str(state) in lines[0], lines[0]
        # Refused before anything else: no model load, no database, no index.
        assert elapsed < 30, f"took {elapsed:.1f} s to refuse"
        assert not state.exists()
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    # The lock file, with the dead pid in it, is still there; it must not block.
    assert (tmp_path / "index.sqlite.lock").read_text().strip() == str(holder.pid)

    # 2. The next run gets the lock; while it runs, a further run is refused naming it and
    #    leaves its run row alone (it must not be marked interrupted); it then completes.
    first = subprocess.Popen([sys.executable, "-m", "sqlindexer", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        row = _wait_for_run_row(state, first)
        assert row == ("running", first.pid)
        refused = _cli(*args, timeout=60)
        still_running = first.poll() is None
        assert refused.returncode != 0, refused.stderr
        assert f"pid {first.pid}" in refused.stderr
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert still_running, "the run finished before the second was tried; that proved nothing"
    assert first.returncode == 0, stderr
    conn = sqlite3.connect(state)
    try:
        assert conn.execute("SELECT id, status, pid FROM runs").fetchall() == [(1, "completed", first.pid)]
        assert conn.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0] == 4
    finally:
        conn.close()
    assert len(read_jsonl(out)) == 4
    # ... and the lock was released when that run ended.
    RunLock(state).acquire().release()


def test_lock_names_the_holder_and_is_released(tmp_path):
    db_path = tmp_path / "state.sqlite"
    first = RunLock(db_path).acquire()
    try:
        # flock locks belong to the open file: a second open, even in this process, conflicts.
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            RunLock(db_path).acquire()
    finally:
        first.release()
    with RunLock(db_path):
        pass
    RunLock(db_path).acquire().release()


def test_cli_refused_while_this_process_holds_the_lock(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    out = tmp_path / "index.jsonl"
    state = tmp_path / "index.sqlite"
    with RunLock(state):
        refused = _cli("-i", photos, "-o", out, "--model-name", tmp_path / "no-model-needed", timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not state.exists() and not out.exists()


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    db_path = tmp_path / "state.sqlite"
    holder = _start_holder(db_path)
    try:
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            RunLock(db_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock = RunLock(db_path).acquire()
    try:
        assert lock.path.read_text().strip() == str(os.getpid())
    finally:
        lock.release()


def test_lock_in_a_missing_folder_is_a_one_line_error(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    state = tmp_path / "no-such-folder" / "state.sqlite"
    out = tmp_path / "index.jsonl"
    result = _cli("-i", photos, "-o", out, "--state-db", state, "--model-name", tmp_path / "no-model-needed",
                  timeout=60)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(state.parent) in lines[0]
    assert not state.parent.exists() and not out.exists()


def _read_until(stream, needle: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    """Lines of stream up to the first one containing needle (a reader thread keeps the
    wait bounded)."""
    import threading

    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no {needle!r} within {timeout} s (exit {proc.poll()}):\n{''.join(lines)}"
    return "".join(lines)


@pytest.mark.slow
def test_wait_waits_for_the_holder_then_runs_and_never_interleaves(tmp_path, tiny_model):
    photos = _photos(tmp_path / "photos", 12)
    out = tmp_path / "index.jsonl"
    state = tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--model-name", tiny_model, "--batch-size", "2", "--workers", "0"]

    # 1. A real indexer run holds the database; a second one with --wait says once whom
    #    it waits for, writes nothing while the first runs, and runs when it has finished.
    first = subprocess.Popen([sys.executable, "-m", "sqlindexer", *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=_env())
    second = None
    try:
        assert _wait_for_run_row(state, first) == ("running", first.pid)
        second = subprocess.Popen([sys.executable, "-m", "sqlindexer", *map(str, args), "--reindex", "--wait"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
        said = _read_until(second.stderr, "waiting", second)
        assert f"pid {first.pid}" in said and str(state) in said, said
        waited_while_running = first.poll() is None
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=30) as conn:
            runs_meanwhile = conn.execute("SELECT id, pid FROM runs").fetchall()
        assert first.wait(timeout=300) == 0, first.stderr.read()
        rest = second.communicate(timeout=300)[1]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert waited_while_running, "the first run ended before the second one waited; that proved nothing"
    assert runs_meanwhile == [(1, first.pid)], "the waiting run wrote to the database"
    assert second.returncode == 0, said + rest
    assert (said + rest).count("waiting") == 1
    conn = sqlite3.connect(state)
    try:
        runs = conn.execute("SELECT id, pid, mode, status, started_at, finished_at FROM runs ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [(r[1], r[2], r[3]) for r in runs] == [(first.pid, "full", "completed"), (second.pid, "reindex", "completed")]
    assert runs[1][4] >= runs[0][5], "the second run started before the first one finished"
    assert len(read_jsonl(out)) == 12


def test_wait_ends_cleanly_on_a_signal_and_refuses_without_it(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    out = tmp_path / "index.jsonl"
    state = tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--model-name", tmp_path / "no-model-needed"]
    holder = _start_holder(state)
    try:
        waiting = subprocess.Popen([sys.executable, "-m", "sqlindexer", *map(str, args), "--wait"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
        said = _read_until(waiting.stderr, "waiting", waiting)
        assert f"pid {holder.pid}" in said
        time.sleep(0.5)
        assert waiting.poll() is None, "it did not wait"
        waiting.send_signal(signal.SIGTERM)
        rest = waiting.communicate(timeout=60)[1]
        assert waiting.returncode == 128 + signal.SIGTERM, said + rest
        assert "Traceback" not in rest and rest.strip().splitlines()[-1].startswith("Error: interrupted by SIGTERM")
        # Without --wait: refused at once, as before.
        refused = _cli(*args, timeout=60)
        assert refused.returncode == 1 and f"pid {holder.pid}" in refused.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not state.exists() and not out.exists()
