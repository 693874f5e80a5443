"""Out of space: the disk fills while the index is exported and while a batch is committed
to the working database. On a small tmpfs (mounting one needs root; the tests skip
otherwise) filled up to a few kilobytes by a filler file, a real `python -m sqlindexer`
run must stop with one line naming the path and a non-zero status, leave the previous
index as it was and no .tmp behind, keep the database intact with what it committed, and
the next run, once the filler is gone, must finish the job without embedding anything
twice.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import cli_subprocess, make_photo, mounted_tmpfs, read_jsonl, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, unmounted at the end."""
    with mounted_tmpfs(tmp_path / "small", "size=4m,mode=0755") as mnt:
        yield mnt


def _fill(mnt: Path, leave: int) -> Path:
    """Take all the free space of mnt but `leave` bytes."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _photos(folder: Path, start: int, n: int) -> None:
    for i in range(start, start + n):
        make_photo(folder / f"p{i:03d}.jpg", seed=i, color=(i * 11 % 256, 80, 160))


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    return conn


def _check_integrity(path: Path) -> None:
    conn = _db(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_disk_full_during_export(runner, tmp_path, small_fs, tiny_model):
    photos = tmp_path / "photos"
    _photos(photos, 0, 8)
    out, state = small_fs / "index.jsonl", tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--state-db", state, "--model-name", tiny_model, "--workers", "0", "--reindex"]
    run_cli(runner, args)
    previous = out.read_bytes()
    stat_before = out.stat()

    _photos(photos, 8, 32)  # the next index is about five times the size of this one
    filler = _fill(small_fs, leave=len(previous))
    full = cli_subprocess(*args)
    line = _one_error_line(full)
    assert str(out) in line and "No space left on device" in line, line
    assert out.read_bytes() == previous and out.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert not out.with_name(out.name + ".tmp").exists(), "the .tmp was left on the full disk"
    _check_integrity(state)
    conn = _db(state)
    try:
        run = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    # The vectors were committed before the export failed: kept, not embedded again.
    assert (run["status"], run["embedded"], run["exported"]) == ("failed", 32, 0), dict(run)
    assert "No space left on device" in run["error"]

    filler.unlink()
    again = cli_subprocess(*args)
    assert again.returncode == 0, again.stderr
    records = read_jsonl(out)
    assert sorted(Path(r["metadata"]["path"]).name for r in records) == [f"p{i:03d}.jpg" for i in range(40)]
    conn = _db(state)
    try:
        last = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    assert (last["status"], last["embedded"], last["exported"]) == ("completed", 0, 40), dict(last)


def test_disk_full_during_a_commit(runner, tmp_path, small_fs, tiny_model):
    photos = tmp_path / "photos"
    _photos(photos, 0, 6)
    out, state = tmp_path / "index.jsonl", small_fs / "index.sqlite"
    args = ["-i", photos, "-o", out, "--state-db", state, "--model-name", tiny_model, "--workers", "0",
            "--batch-size", "2", "--reindex"]
    run_cli(runner, args)
    previous = out.read_bytes()

    _photos(photos, 6, 60)
    # Each commit of a batch appends a few 4 KiB pages to the -wal file; the scan's one
    # commit fits in this much, the thirty commits of the embedding do not.
    filler = _fill(small_fs, leave=224 * 1024)
    full = cli_subprocess(*args)
    line = _one_error_line(full)
    assert str(state) in line and "database or disk is full" in line, line
    assert out.read_bytes() == previous
    assert not out.with_name(out.name + ".tmp").exists()
    _check_integrity(state)
    conn = _db(state)
    try:
        failed_run = dict(conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())
        ok_before = {r["path"]: r["embedding"] for r in conn.execute(
            "SELECT path, embedding FROM files WHERE status = 'ok'")}
    finally:
        conn.close()
    # It stopped at a commit of the embedding (the scan's went through); what it had
    # committed is in the database (the row stays 'running' when there was no room to
    # record the failure either).
    summary = {k: failed_run[k] for k in ("status", "error", "scanned", "embedded")}
    assert failed_run["status"] in ("failed", "running"), summary
    assert failed_run["scanned"] == 66 and failed_run["embedded"] < 60, summary
    assert len(ok_before) == 6 + failed_run["embedded"]

    filler.unlink()
    again = cli_subprocess(*args)
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(out)) == 66
    _check_integrity(state)
    conn = _db(state)
    try:
        runs = conn.execute("SELECT id, status, embedded FROM runs ORDER BY id").fetchall()
        ok_after = {r["path"]: r["embedding"] for r in conn.execute(
            "SELECT path, embedding FROM files WHERE status = 'ok'")}
    finally:
        conn.close()
    assert [r["status"] for r in runs] == ["completed", runs[1]["status"], "completed"]
    assert runs[1]["status"] in ("failed", "interrupted")
    # Nothing embedded twice: the last run did only what the failed one had not committed.
    assert runs[1]["embedded"] + runs[2]["embedded"] == 60
    for path, vec in ok_before.items():
        assert ok_after[path] == vec, f"{path} was embedded again"
