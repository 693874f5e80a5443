"""Open the working SQLite database and bring its schema up to date.

Holds no table-specific SQL: that lives in migrations/*.sql and in state.py. The
query commands open it read-only (open_readonly): never created, never migrated.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from .config import absolute
from .errors import DatabaseError, SchemaTooNewError, SearchError

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")


def _migrations_dir() -> Path:
    # Inside the wheel the files are shipped as sqlindexer/migrations; in a source
    # checkout (editable install, tests) they sit at the top level of the repo.
    packaged = resources.files("sqlindexer") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "migrations"


def migrations() -> list[tuple[int, Path]]:
    """The numbered migration files, in the order they apply."""
    found = []
    for path in _migrations_dir().iterdir():
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    found.sort()
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise DatabaseError(f"migrations are not numbered 1..N without gaps: {numbers}")
    return found


def schema_version() -> int:
    """The schema version this code writes (the highest migration number)."""
    return len(migrations())


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the database at path and apply pending migrations."""
    path = Path(path)
    try:
        if readonly:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        else:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"cannot open working database {path}: {e}") from e
    _refuse_newer(conn, path, version)
    if not readonly:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across application crashes in WAL mode; a power loss can
            # lose the last commits but never corrupts the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            migrate(conn)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise DatabaseError(f"cannot use working database {path}: {e}") from e
    return conn


def _refuse_newer(conn: sqlite3.Connection, path: Path, version: int) -> None:
    latest = schema_version()
    if version > latest:
        conn.close()
        raise SchemaTooNewError(
            f"working database {path} has schema version {version}, this image-indexer knows "
            f"up to {latest}: upgrade image-indexer (the database was left untouched)"
        )


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open an existing working database read-only, for the query commands."""
    p = absolute(path)
    if not p.exists():
        raise SearchError(f"working database {p} does not exist (index a folder first, or pass --db)")
    if p.is_dir():
        raise SearchError(f"working database {p} is a directory")
    try:
        conn = connect(p, readonly=True)
    except DatabaseError as e:
        if not _wal_needs_shm(e):
            raise
        conn = _connect_immutable(p)
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'files'").fetchone()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DatabaseError(f"cannot read working database {p}: {e}") from None
    if found is None:
        conn.close()
        raise SearchError(f"{p} is not an image-indexer database (it has no files table)")
    return conn


def _wal_needs_shm(e: DatabaseError) -> bool:
    # A read-only connection to a WAL database needs the -shm file; when it is missing and
    # cannot be created (a folder we may not write to, a read-only mount), SQLite refuses
    # with SQLITE_READONLY. (On a read-only mount SQLite says SQLITE_CANTOPEN instead.)
    cause = e.__cause__
    if not isinstance(cause, sqlite3.OperationalError):
        return False
    name = getattr(cause, "sqlite_errorname", "")
    return name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) or "readonly" in str(cause)


def _connect_immutable(path: Path) -> sqlite3.Connection:
    """The fallback for a WAL database whose -shm cannot be created: with no -wal file
    either, every committed transaction is in the main file (the last writer checkpointed
    it when it closed), which can then be read as immutable, without the -shm."""
    for suffix in ("-wal", "-journal"):  # (a rollback journal would need undoing first)
        log_file = path.with_name(path.name + suffix)
        if log_file.exists() and log_file.stat().st_size > 0:
            raise SearchError(
                f"cannot read working database {path}: {log_file.name} holds transactions not yet in the "
                f"database, and SQLite cannot create the -shm file it needs to read them in {path.parent}; "
                "let the running index finish, or run this with write access to that folder"
            )
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None)
        conn.row_factory = sqlite3.Row
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"cannot open working database {path}: {e}") from None
    _refuse_newer(conn, path, version)
    log.debug("%s opened as immutable: its folder is not writable", path)
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration newer than PRAGMA user_version; return the new version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, path in migrations():
        if number <= version:
            continue
        script = path.read_text(encoding="utf-8")
        # executescript() commits before it runs, so the BEGIN/COMMIT must be inside
        # the script for the migration and its version bump to be one transaction.
        try:
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        version = number
    return version


def rollback_open(conn: sqlite3.Connection) -> None:
    """Roll back the transaction left open, if any (SQLite may have rolled back already)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT, rolled back on any exception (connections are in autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error:
        # A COMMIT that fails (disk full, I/O error) may leave the transaction open.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
