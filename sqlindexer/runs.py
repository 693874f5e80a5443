"""The runs and meta tables: what each run did and how it ended, and what the database
records about itself (the last export's mark among it).

Functions take an open connection plus plain values and return plain data. Each function
that writes commits its own transaction, so whatever it returned is durable.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .db import transaction


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- runs ------------------------------------------------------------------------------
@dataclass
class Run:
    id: int
    mode: str  # 'full' | 'reindex'
    build: int
    model: str
    resumed: bool  # a full build that continues an interrupted one


def start_run(conn: sqlite3.Connection, *, mode: str, model: str, config: dict[str, Any], pid: int) -> Run:
    """Record a new run. A full build continues the build of an unfinished full build of
    the same model (that is the resume); otherwise a full build starts a new generation."""
    with transaction(conn):
        last = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        cur = conn.execute(
            "INSERT INTO runs (started_at, mode, build, model, pid, config) VALUES (?, ?, 0, ?, ?, ?)",
            (utcnow(), mode, model, pid, json.dumps(config, sort_keys=True)),
        )
        run_id = cur.lastrowid
        assert run_id is not None
        resumed = False
        if last is None:
            build = run_id
        elif mode == "full":
            resumed = last["status"] != "completed" and last["mode"] == "full" and last["model"] == model
            build = last["build"] if resumed else run_id
        else:
            build = last["build"]
        conn.execute("UPDATE runs SET build = ? WHERE id = ?", (build, run_id))
    return Run(run_id, mode, build, model, resumed)


def mark_unfinished_runs(conn: sqlite3.Connection) -> None:
    """Runs still 'running' belong to processes that died (we hold the lock now)."""
    with transaction(conn):
        conn.execute(
            "UPDATE runs SET status = 'interrupted', error = coalesce(error, 'process ended without finishing') "
            "WHERE status = 'running'"
        )


COUNTERS = ("scanned", "new", "modified", "unchanged", "deleted", "imported", "embedded", "failed", "decoded", "exported",
            "reused", "renamed", "hashed_bytes")


def add_counts(conn: sqlite3.Connection, run_id: int, **deltas: int) -> None:
    """Add to the run's counters; call inside the transaction that did the work."""
    sets = ", ".join(f"{k} = {k} + ?" for k in deltas if k in COUNTERS)
    conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*deltas.values(), run_id))


def finish_run(conn: sqlite3.Connection, run_id: int, *, status: str, error: str | None = None) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
            (status, utcnow(), error, run_id),
        )


def run_counts(conn: sqlite3.Connection, run_id: int) -> dict[str, int]:
    row = conn.execute(f"SELECT {', '.join(COUNTERS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return dict(row)


def recent_runs(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The last runs, newest first, without their config. A database of an older schema
    (the query commands read it as it is) lacks the newer counters: they read 0."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    columns = ", ".join(c if c in present else f"0 AS {c}" for c in COUNTERS)
    rows = conn.execute(
        f"SELECT id, started_at, finished_at, status, mode, model, error, {columns} FROM runs "
        "ORDER BY id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [dict(row) for row in rows]


# -- meta ------------------------------------------------------------------------------
def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                     (key, value))


LAST_EXPORT = "last_export"


@dataclass(frozen=True)
class ExportMark:
    """What the last export wrote: which file (to tell that the file on disk is still that
    one) and from which rows (the record stamp, and what else shapes a record)."""

    path: str
    size: int
    mtime_ns: int
    ino: int
    model: str
    format: str
    stamp: int
    tz: tuple[Any, ...]  # records hold local times: another time zone writes other records
    layout: int | None = None  # jsonl only: the form of its lines (index_file.JSONL_LAYOUT)

    def names_file(self, path: str, st: Any, *, same_inode: bool = True) -> bool:
        """Whether the file at path, of stat result st, is the one this mark describes."""
        return (self.path, self.size, self.mtime_ns) == (path, st.st_size, st.st_mtime_ns) \
            and (not same_inode or self.ino == st.st_ino)


def export_mark(conn: sqlite3.Connection) -> ExportMark | None:
    """The mark of the last export, or None (never exported, or a mark of another version)."""
    text = get_meta(conn, LAST_EXPORT)
    if not text:
        return None
    try:
        raw = json.loads(text)
        return ExportMark(raw["path"], int(raw["size"]), int(raw["mtime_ns"]), int(raw["ino"]), raw["model"],
                          raw["format"], int(raw["stamp"]), tuple(raw["tz"]), raw.get("layout"))
    except (ValueError, KeyError, TypeError):
        return None


def set_export_mark(conn: sqlite3.Connection, mark: ExportMark) -> None:
    raw = {k: v for k, v in dataclasses.asdict(mark).items() if v is not None}
    set_meta(conn, LAST_EXPORT, json.dumps({**raw, "tz": list(mark.tz)}))
