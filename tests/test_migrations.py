"""The working database's schema: migrations from blank, idempotent re-connects, refusing
a newer schema or a file that is not SQLite, all-or-nothing migrations, numbering."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_photo

from sqlindexer import db
from sqlindexer.errors import DatabaseError, SchemaTooNewError

MIGRATIONS = REPO / "migrations"

# Every column of every table, in order, as the shipped migrations leave them. A new
# migration that changes a table must update this (and bump the count it is checked with).
EXPECTED = {
    "files": [
        "id", "path", "size", "mtime_ns", "ctime_ns", "status", "error", "width", "height",
        "model", "dim", "build", "changed_run", "exif", "embedding", "stamp", "content", "dev", "ino",
    ],
    "runs": [
        "id", "started_at", "finished_at", "status", "mode", "build", "model", "pid", "config", "error",
        "scanned", "new", "modified", "unchanged", "deleted", "imported", "embedded", "failed", "decoded",
        "exported", "reused", "renamed", "hashed_bytes",
    ],
    "meta": ["key", "value"],
}


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    }


def _schema(conn: sqlite3.Connection) -> list[tuple]:
    return [tuple(row) for row in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")]


def _raw(path: Path) -> sqlite3.Connection:
    """A plain connection that applies no migrations, to look at what is on disk."""
    return sqlite3.connect(path, isolation_level=None)


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "sqlindexer", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# -- from blank ------------------------------------------------------------------------
def test_blank_database_is_migrated_to_the_latest_schema(tmp_path):
    shipped = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    assert shipped, "no migrations found"
    path = tmp_path / "state.sqlite"
    conn = db.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(shipped) == db.schema_version()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert _tables(conn) == set(EXPECTED)
        for table, columns in EXPECTED.items():
            assert _columns(conn, table) == columns, table
    finally:
        conn.close()
    # WAL is a property of the file: a plain connection sees it too.
    raw = _raw(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(shipped)
    finally:
        raw.close()


def test_migrations_are_the_shipped_files_in_order():
    found = db.migrations()
    assert [n for n, _ in found] == list(range(1, len(found) + 1))
    assert [p.name for _, p in found] == sorted(p.name for p in MIGRATIONS.glob("*.sql"))


def test_reconnect_is_idempotent_and_keeps_data(tmp_path):
    path = tmp_path / "state.sqlite"
    conn = db.connect(path)
    schema = _schema(conn)
    conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    conn.close()
    for _ in range(2):
        conn = db.connect(path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == db.schema_version()
            assert _schema(conn) == schema
            assert conn.execute("SELECT value FROM meta WHERE key = 'k'").fetchone()[0] == "v"
            assert db.migrate(conn) == db.schema_version()  # nothing left to apply
        finally:
            conn.close()


# -- refusing what we must not touch ---------------------------------------------------
def _too_new_db(path: Path) -> bytes:
    conn = db.connect(path)
    conn.execute("INSERT INTO meta (key, value) VALUES ('written_by', 'the future')")
    conn.execute(f"PRAGMA user_version = {db.schema_version() + 1}")
    conn.close()
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    return path.read_bytes()


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "state.sqlite"
    before = _too_new_db(path)
    with pytest.raises(SchemaTooNewError, match="upgrade"):
        db.connect(path)
    with pytest.raises(SchemaTooNewError):
        db.connect(path, readonly=True)
    assert path.read_bytes() == before
    raw = _raw(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == db.schema_version() + 1
    finally:
        raw.close()


def test_cli_refuses_newer_schema(tmp_path):
    photos = tmp_path / "photos"
    make_photo(photos / "a.jpg")
    state = tmp_path / "state.sqlite"
    before = _too_new_db(state)
    out = tmp_path / "index.jsonl"
    result = _cli("-i", photos, "-o", out, "--state-db", state, "--model-name", tmp_path / "no-model-needed")
    assert result.returncode == 1, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "upgrade" in lines[0] and str(state) in lines[0]
    assert "Traceback" not in result.stderr
    assert state.read_bytes() == before
    assert not out.exists()


@pytest.mark.parametrize("content", ["random", "text"])
def test_cli_refuses_a_file_that_is_not_sqlite(tmp_path, content):
    photos = tmp_path / "photos"
    make_photo(photos / "a.jpg")
    state = tmp_path / "state.sqlite"
    if content == "random":
        data = random.Random(1234).randbytes(8192)
    else:
        data = b"these are my notes, not a database\n" * 50
    state.write_bytes(data)
    out = tmp_path / "index.jsonl"
    result = _cli("-i", photos, "-o", out, "--state-db", state, "--model-name", tmp_path / "no-model-needed")
    assert result.returncode == 1, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(state) in lines[0] and "not a database" in lines[0]
    assert "Traceback" not in result.stderr
    assert state.read_bytes() == data
    assert not out.exists()
    # The core raises the typed error too (what the CLI turned into that line).
    with pytest.raises(DatabaseError):
        db.connect(state)
    assert state.read_bytes() == data


# -- all or nothing --------------------------------------------------------------------
@pytest.fixture
def migrations_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir()
    shutil.copy(MIGRATIONS / "0001_init.sql", folder / "0001_init.sql")
    monkeypatch.setattr(db, "_migrations_dir", lambda: folder)
    return folder


BROKEN = """
CREATE TABLE half_done (x INTEGER);
ALTER TABLE files ADD COLUMN half_column TEXT;
INSERT INTO meta (key, value) VALUES ('half', 'done');
THIS IS NOT SQL;
CREATE TABLE never_reached (y INTEGER);
"""


def test_failing_migration_leaves_nothing_half_applied(tmp_path, migrations_dir):
    path = tmp_path / "state.sqlite"
    conn = db.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    schema = _schema(conn)
    conn.close()

    (migrations_dir / "0002_broken.sql").write_text(BROKEN, encoding="utf-8")
    # Straight through migrate(): the SQL error propagates, the connection is usable after.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.Error):
            db.migrate(conn)
        assert not conn.in_transaction
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()
    # Through connect(): a one-line DatabaseError naming the file.
    with pytest.raises(DatabaseError, match="state.sqlite"):
        db.connect(path)

    raw = _raw(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
        assert _schema(raw) == schema
        assert "half_done" not in _tables(raw) and "never_reached" not in _tables(raw)
        assert "half_column" not in _columns(raw, "files")
        assert raw.execute("SELECT count(*) FROM meta").fetchone()[0] == 0
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        raw.close()

    # Once the migration is fixed it applies, in full, on the same file.
    (migrations_dir / "0002_broken.sql").write_text(BROKEN.replace("THIS IS NOT SQL;", ""), encoding="utf-8")
    conn = db.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert {"half_done", "never_reached"} <= _tables(conn)
        assert "half_column" in _columns(conn, "files")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "names",
    [
        ["0001_init.sql", "0003_later.sql"],  # gap
        ["0001_init.sql", "0001_again.sql"],  # duplicate number
        ["0002_first.sql"],  # does not start at 1
    ],
    ids=["gap", "duplicate", "not-from-1"],
)
def test_migration_numbering_must_have_no_gaps(tmp_path, migrations_dir, names):
    for p in migrations_dir.iterdir():
        p.unlink()
    for name in names:
        (migrations_dir / name).write_text("CREATE TABLE t_%s (x);\n" % name[:4], encoding="utf-8")
    (migrations_dir / "README.md").write_text("not a migration", encoding="utf-8")
    with pytest.raises(DatabaseError, match="without gaps"):
        db.migrations()
    path = tmp_path / "state.sqlite"
    with pytest.raises(DatabaseError):
        db.connect(path)
    if path.exists():
        raw = _raw(path)
        try:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
            assert _tables(raw) == set()
        finally:
            raw.close()


def test_files_that_are_not_migrations_are_ignored(migrations_dir):
    (migrations_dir / "README.md").write_text("notes", encoding="utf-8")
    (migrations_dir / "0002_draft.sql.bak").write_text("garbage", encoding="utf-8")
    assert [n for n, _ in db.migrations()] == [1]
