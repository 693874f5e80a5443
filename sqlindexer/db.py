"""Open the working SQLite database and bring its schema up to date.

Holds no table-specific SQL: that lives in migrations/*.sql and in state.py.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from .errors import DatabaseError, SchemaTooNewError

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
    latest = schema_version()
    if version > latest:
        conn.close()
        raise SchemaTooNewError(
            f"working database {path} has schema version {version}, this image-indexer knows "
            f"up to {latest}: upgrade image-indexer (the database was left untouched)"
        )
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
