"""What the working database holds, from counts on its indexes: no vector is read."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from datetime import datetime
from typing import Any

from . import records
from .runs import recent_runs
from .config import absolute

RECENT_RUNS = 5


def database_status(conn: sqlite3.Connection, db_path: str | os.PathLike[str], *,
                    runs: int = RECENT_RUNS) -> dict[str, Any]:
    """What the database holds, from counts on its indexes: no vector is read."""
    path = absolute(db_path)
    size = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            size += os.stat(f"{path}{suffix}").st_size
    counts = records.count_by_status(conn)
    recent = recent_runs(conn, runs)
    for run in recent:
        run["seconds"] = _duration(run["started_at"], run["finished_at"])
    return {
        "database": str(path),
        "size_bytes": size,
        "schema_version": records.schema_version(conn),
        "images": {**counts, "total": sum(counts.values())},
        "failed": [{"error": error, "files": n} for error, n in records.failure_reasons(conn)],
        "models": [{"model": m.model, "dim": m.dim, "vectors": m.count} for m in records.vector_models(conn)],
        "runs": recent,
    }


def _duration(started: str | None, finished: str | None) -> float | None:
    if not started or not finished:
        return None
    try:
        return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    except ValueError:
        return None
