"""Every query on the working database's tables: file state, runs, vectors.

Functions take an open connection plus plain values and return plain data. Each function
that writes commits its own transaction, so whatever it returned is durable.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby, islice
from operator import itemgetter
from typing import Any

from .db import transaction
from .scan import FileRecord, is_under

# Rows fetched or written per statement; SQLite's default limit on host parameters is
# 32766, and a few hundred keeps each transaction short.
SCAN_BATCH = 500
PENDING_PAGE = 256


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


COUNTERS = ("scanned", "new", "modified", "unchanged", "deleted", "imported", "embedded", "failed", "decoded", "exported")


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


# -- scan ------------------------------------------------------------------------------
@dataclass
class ScanCounts:
    scanned: int = 0
    new: int = 0
    modified: int = 0
    unchanged: int = 0


# Whether an unchanged file's row still needs work: its vector is of another model, or
# this full build has not processed it yet (a pending row is queued already).
_REQUEUE = ("(status != 'pending' AND ((status = 'ok' AND model IS NOT :model) "
            "OR (:full AND build IS NOT :build)))")


class Scan:
    """One run's comparison of the walk with the rows of `files`.

    The walk comes in batches in path order, the order of the covering index files_scan,
    so each batch is compared with the rows of its path range, (end of the last batch,
    end of this batch], by one indexed query, and every row is looked at once: the rows
    of a range that the walk did not yield are files gone from disk. On a no-change
    re-index that is one read per batch and a comparison of two lists in C. Nothing is
    marked in `files` to say a row was seen: that would write every row, and its page, on
    every run. What changed is written a few hundred rows at a time, one transaction each;
    a scan that stops before a write leaves those files to the next run's scan.
    """

    def __init__(self, conn: sqlite3.Connection, run: Run) -> None:
        self.conn, self.run = conn, run
        self._after = ""  # every path sorts after it
        self._unsaved = ScanCounts()  # counted, not yet added to the run's row
        self._params = {"model": run.model, "full": run.mode == "full", "build": run.build}
        self._cursor = conn.cursor()
        self._cursor.row_factory = None  # plain tuples, which compare equal to FileRecords
        self._new: list[tuple] = []
        self._replaced: list[tuple] = []
        self._requeued: list[tuple] = []
        self._touched: list[tuple] = []
        self._missing: list[tuple] = []
        self.to_embed = 0  # files this scan queued for embedding so far
        # Rows found missing wait here for sweep(): a scan that stops half-way deletes nothing.
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS missing (id INTEGER PRIMARY KEY, path TEXT NOT NULL)")
        conn.execute("DELETE FROM temp.missing")

    def record(self, records: Sequence[FileRecord]) -> None:
        """Compare one batch of the walk (in path order, after the last batch) with the
        rows of its range, and queue what must be written: new files and changed files
        (as 'pending'), rows that need work again, and rows of files gone.

        A file is unchanged when path, size and mtime_ns match. Unchanged files need work
        only if their vector is of another model, if they were never finished, or, in a
        full build, if this build has not processed them yet. An unchanged file whose row
        needs nothing is not written at all.
        """
        if not records:
            return
        if records[0].path <= self._after or records != sorted(records):
            raise ValueError("scan batches must come in path order")
        params = {**self._params, "after": self._after, "last": records[-1].path}
        self._after = records[-1].path
        # A row that needs work comes back with a NULL path, so it never equals its file.
        rows = self._cursor.execute(
            f"SELECT CASE WHEN {_REQUEUE} THEN NULL ELSE path END, size, mtime_ns, ctime_ns "
            "FROM files WHERE path > :after AND path <= :last ORDER BY path",
            params,
        ).fetchall()
        new = modified = 0
        if rows != records:
            new, modified = self._compare(records, rows, params)
        u = self._unsaved
        u.scanned += len(records)
        u.new += new
        u.modified += modified
        u.unchanged += len(records) - new - modified
        queued = len(self._new) + len(self._replaced) + len(self._requeued) + len(self._touched) + len(self._missing)
        if queued >= SCAN_BATCH:
            self._write()

    def _compare(self, records: Sequence[FileRecord], rows: list[tuple], params: dict[str, Any]) -> tuple[int, int]:
        """Queue the changes of one batch; return (new, modified)."""
        matched, walked = set(rows), set(records)
        differ = [r for r in records if r not in matched]
        unmatched = [row for row in rows if row not in walked]
        if any(row[0] is None for row in unmatched):
            # Rows that need work again (after a change of model, all of them): their paths
            # came back NULL, so read the whole range with ids and flags.
            found = self._cursor.execute(
                f"SELECT path, id, size, mtime_ns, ctime_ns, {_REQUEUE} FROM files "
                "WHERE path > :after AND path <= :last",
                params,
            ).fetchall()
        else:
            # A few files differ, and no row of the range needs work again (its path would
            # have come back NULL): read the rows of just those paths.
            paths = sorted({r.path for r in differ} | {row[0] for row in unmatched})
            found = []
            for i in range(0, len(paths), SCAN_BATCH):
                chunk = paths[i : i + SCAN_BATCH]
                found += self._cursor.execute(
                    f"SELECT path, id, size, mtime_ns, ctime_ns, 0 FROM files WHERE path IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        known = {row[0]: row for row in found}
        new = modified = 0
        run_id = self.run.id
        for path, size, mtime_ns, ctime_ns in differ:
            row = known.pop(path, None)
            if row is None:
                self._new.append((path, size, mtime_ns, ctime_ns, run_id))
                new += 1
                continue
            _, file_id, old_size, old_mtime_ns, old_ctime_ns, requeue = row
            if old_size != size or old_mtime_ns != mtime_ns:
                self._replaced.append((size, mtime_ns, ctime_ns, run_id, file_id))
                modified += 1
            elif requeue:
                self._requeued.append((ctime_ns, file_id))
                self.to_embed += 1
            elif old_ctime_ns != ctime_ns:  # only its ctime changed (chmod, a new link): nothing to embed
                self._touched.append((ctime_ns, file_id))
        # Rows of this range that the walk did not yield.
        walked_paths = {r.path for r in records}
        self._missing += [(row[1], path) for path, row in known.items() if path not in walked_paths]
        self.to_embed += new + modified
        return new, modified

    def _write(self) -> None:
        conn = self.conn
        with transaction(conn):
            conn.executemany(
                "INSERT INTO files (path, size, mtime_ns, ctime_ns, status, changed_run) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                self._new,
            )
            # A modified file's row is replaced in place: same id, everything derived from
            # the old content cleared.
            conn.executemany(
                "UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, status = 'pending', error = NULL, "
                "width = NULL, height = NULL, exif = NULL, model = NULL, dim = NULL, embedding = NULL, "
                "build = NULL, changed_run = ? WHERE id = ?",
                self._replaced,
            )
            conn.executemany("UPDATE files SET ctime_ns = ?, status = 'pending' WHERE id = ?", self._requeued)
            conn.executemany("UPDATE files SET ctime_ns = ? WHERE id = ?", self._touched)
            conn.executemany("INSERT INTO temp.missing (id, path) VALUES (?, ?)", self._missing)
            u = self._unsaved
            add_counts(conn, self.run.id, scanned=u.scanned, new=u.new, modified=u.modified, unchanged=u.unchanged)
        self._unsaved = ScanCounts()
        self._new, self._replaced, self._requeued, self._touched, self._missing = [], [], [], [], []

    def sweep(self, *, keep_under: Iterable[str] = ()) -> int:
        """After the whole walk: write what is queued, delete the rows of files the walk
        did not see, except under folders that could not be listed (not seen there does
        not mean deleted), and record the scan's counts. Returns how many were deleted."""
        self._write()
        keep = list(keep_under)
        conn = self.conn
        with transaction(conn):
            conn.execute("INSERT INTO temp.missing (id, path) SELECT id, path FROM files WHERE path > ?",
                         (self._after,))
            gone = [file_id for file_id, path in conn.execute("SELECT id, path FROM temp.missing")
                    if not any(is_under(path, k) for k in keep)]
            for i in range(0, len(gone), SCAN_BATCH):
                chunk = gone[i : i + SCAN_BATCH]
                conn.execute(f"DELETE FROM files WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            conn.execute("DELETE FROM temp.missing")
            add_counts(conn, self.run.id, deleted=len(gone))
        return len(gone)


# -- embedding -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pending:
    id: int
    path: str
    size: int
    mtime_ns: int


def count_pending(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM files WHERE status = 'pending'").fetchone()[0]


def iter_pending(conn: sqlite3.Connection, *, page: int = PENDING_PAGE) -> Iterator[Pending]:
    """Pending rows in path order, fetched a page at a time so that results committed
    between pages (they stop being pending) never disturb the iteration."""
    after = ""
    while True:
        rows = conn.execute(
            "SELECT id, path, size, mtime_ns FROM files WHERE status = 'pending' AND path > ? "
            "ORDER BY path LIMIT ?",
            (after, page),
        ).fetchall()
        if not rows:
            return
        for row in rows:
            yield Pending(row["id"], row["path"], row["size"], row["mtime_ns"])
        after = rows[-1]["path"]


@dataclass
class Result:
    """What one file's processing produced: a vector, a failure, or neither (changed on
    disk while being read: it stays pending for the next run)."""

    file: Pending
    vector: bytes | None = None  # little-endian float32
    width: int | None = None
    height: int | None = None
    exif: dict[str, Any] | None = None
    error: str | None = None
    changed: bool = False
    decoded: bool = True


def store_results(conn: sqlite3.Connection, results: Sequence[Result], run: Run, *, model: str, dim: int | None) -> None:
    """Commit one batch of results, and the run's counters with them, in one transaction."""
    ok = [
        (r.width, r.height, _exif_json(r.exif), model, dim, r.vector, run.build, run.id, r.file.id,
         r.file.size, r.file.mtime_ns)
        for r in results
        if r.vector is not None and not r.changed
    ]
    failed = [
        (r.error, r.width, r.height, _exif_json(r.exif), run.build, run.id, r.file.id, r.file.size, r.file.mtime_ns)
        for r in results
        if r.error is not None and not r.changed
    ]
    with transaction(conn):
        # The size/mtime guard keeps a result off a row whose file was rescanned as changed.
        conn.executemany(
            "UPDATE files SET status = 'ok', error = NULL, width = ?, height = ?, exif = ?, model = ?, dim = ?, "
            "embedding = ?, build = ?, changed_run = ? WHERE id = ? AND size = ? AND mtime_ns = ?",
            ok,
        )
        conn.executemany(
            "UPDATE files SET status = 'failed', error = ?, width = ?, height = ?, exif = ?, model = NULL, "
            "dim = NULL, embedding = NULL, build = ?, changed_run = ? WHERE id = ? AND size = ? AND mtime_ns = ?",
            failed,
        )
        add_counts(conn, run.id, embedded=len(ok), failed=len(failed), decoded=sum(r.decoded for r in results))


def _exif_json(exif: dict[str, Any] | None) -> str | None:
    if exif is None:
        return None
    return json.dumps(exif, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def requeue_other_dims(conn: sqlite3.Connection, model: str, dim: int | None) -> int:
    """Mark 'pending' the rows of model whose vector is not dim long; return how many."""
    if dim is None:
        return 0
    with transaction(conn):
        cur = conn.execute(
            "UPDATE files SET status = 'pending' WHERE status = 'ok' AND model = ? AND dim != ?", (model, dim)
        )
    return cur.rowcount


def stored_dim(conn: sqlite3.Connection, model: str) -> int | None:
    row = conn.execute("SELECT dim FROM files WHERE status = 'ok' AND model = ? LIMIT 1", (model,)).fetchone()
    return row[0] if row else None


# -- import from an existing index -----------------------------------------------------
@dataclass
class Imported:
    """One record of a source index that still matches the file on disk."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    vector: bytes
    dim: int
    width: int | None
    height: int | None
    exif: dict[str, Any] | None


def import_vectors(conn: sqlite3.Connection, records: Iterable[Imported], run: Run) -> int:
    """Adopt vectors from a source index, in one transaction (all or nothing), for files
    whose row is missing or not already ok with this model and the same size and mtime."""
    count = 0
    with transaction(conn):
        for rec in records:
            row = conn.execute(
                "SELECT id, size, mtime_ns, status, model FROM files WHERE path = ?", (rec.path,)
            ).fetchone()
            if row is not None and row["status"] == "ok" and row["model"] == run.model \
                    and row["size"] == rec.size and row["mtime_ns"] == rec.mtime_ns:
                continue
            values = (rec.size, rec.mtime_ns, rec.ctime_ns, rec.width, rec.height, _exif_json(rec.exif),
                      run.model, rec.dim, rec.vector, run.build, run.id)
            if row is None:
                conn.execute(
                    "INSERT INTO files (size, mtime_ns, ctime_ns, width, height, exif, model, dim, embedding, "
                    "build, changed_run, status, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ok', ?)",
                    (*values, rec.path),
                )
            else:
                conn.execute(
                    "UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, width = ?, height = ?, exif = ?, "
                    "model = ?, dim = ?, embedding = ?, build = ?, changed_run = ?, status = 'ok', error = NULL "
                    "WHERE id = ?",
                    (*values, row["id"]),
                )
            count += 1
        add_counts(conn, run.id, imported=count)
    return count


# -- export ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExportRow:
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    width: int | None
    height: int | None
    exif: str | None  # JSON text, as stored
    embedding: bytes
    dim: int


def count_export_rows(conn: sqlite3.Connection, model: str) -> int:
    return conn.execute("SELECT count(*) FROM files WHERE status = 'ok' AND model = ?", (model,)).fetchone()[0]


_EXPORT_COLUMNS = "path, size, mtime_ns, ctime_ns, width, height, exif, embedding, dim"


def iter_export_rows(conn: sqlite3.Connection, model: str) -> Iterator[ExportRow]:
    """Committed vectors of one model, in path order, streamed from SQLite."""
    cur = conn.execute(
        f"SELECT {_EXPORT_COLUMNS} FROM files WHERE status = 'ok' AND model = ? ORDER BY path",
        (model,),
    )
    for row in cur:
        yield ExportRow(*row)


RECORD_STAMP = "record_stamp"  # meta key kept by migrations/0003_export_stamp.sql


def record_stamp(conn: sqlite3.Connection) -> int:
    """The counter that every change to an exported record moves (and that stamps the row)."""
    return int(get_meta(conn, RECORD_STAMP) or 0)


def count_changed_export_rows(conn: sqlite3.Connection, model: str, since: int) -> int:
    """How many rows the export holds that changed after the stamp `since`."""
    return conn.execute(
        "SELECT count(*) FROM files WHERE status = 'ok' AND model = ? AND stamp > ?", (model, since)
    ).fetchone()[0]


def iter_export_changes(conn: sqlite3.Connection, model: str, since: int) -> Iterator[ExportRow | list[str]]:
    """The export's rows in path order: those not changed after the stamp `since` (their
    records are the ones written then) as lists of their paths, a list for each run of
    them (up to _RUN_PATHS), the others whole."""
    cur = conn.cursor()
    cur.row_factory = None
    # The unary + keep the planner on files_scan, which holds every column read here and
    # gives the path order; through files_status_model the rows would be read and sorted.
    cur.execute("SELECT path, stamp > ? FROM files WHERE +status = 'ok' AND +model = ? ORDER BY path",
                (since, model))
    # Grouped in C: a run of 100,000 unchanged rows is ten list comprehensions, not 100,000
    # steps of this generator.
    for changed, rows in groupby(cur, key=itemgetter(1)):
        if changed:
            for path, _ in rows:
                yield export_row(conn, path)
        else:
            while run := [path for path, _ in islice(rows, _RUN_PATHS)]:
                yield run


_RUN_PATHS = 10_000  # a list of paths held at once, whatever the number of rows


def export_row(conn: sqlite3.Connection, path: str) -> ExportRow:
    row = conn.execute(f"SELECT {_EXPORT_COLUMNS} FROM files WHERE path = ?", (path,)).fetchone()
    return ExportRow(*row)


# -- meta ------------------------------------------------------------------------------
def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                     (key, value))


# -- queries (search, similar, duplicates, status) -------------------------------------
# Read-only: these run on a connection opened with db.connect(path, readonly=True).
DATABASE_ID = "database_id"  # meta keys kept by migrations/0002_search.sql
VECTORS_VERSION = "vectors_version"


def vectors_version(conn: sqlite3.Connection) -> tuple[str, int] | None:
    """(database id, change counter) of what a search can see; None for a database whose
    schema predates the counter (a read-only connection cannot migrate it)."""
    try:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", (DATABASE_ID, VECTORS_VERSION)))
    except sqlite3.OperationalError:  # no meta table
        return None
    if len(rows) != 2:
        return None
    return str(rows[DATABASE_ID]), int(rows[VECTORS_VERSION])


@dataclass(frozen=True)
class ModelVectors:
    model: str
    dim: int
    count: int | None = None  # None: not counted


def vector_models(conn: sqlite3.Connection) -> list[ModelVectors]:
    """The models (and vector lengths) of the ok rows, most vectors first; counted on the
    index files_status_model, without reading a vector."""
    rows = conn.execute(
        "SELECT model, dim, count(*) FROM files WHERE status = 'ok' GROUP BY model, dim ORDER BY 3 DESC, 1, 2"
    ).fetchall()
    return [ModelVectors(model, dim, count) for model, dim, count in rows]


def count_vectors(conn: sqlite3.Connection, model: str, dim: int) -> int:
    return conn.execute(
        "SELECT count(*) FROM files WHERE status = 'ok' AND model = ? AND dim = ?", (model, dim)
    ).fetchone()[0]


# The date a photo was taken, as local wall-clock seconds (the time on the camera's clock,
# read as if it were UTC, so that it compares with a date typed by the user): EXIF
# DateTimeOriginal ("YYYY:MM:DD HH:MM:SS") when it is a valid date, else the file's mtime
# in local time. strftime() returns NULL for a date it cannot read ("0000:00:00 ...").
_TAKEN = (
    "coalesce("
    "CAST(strftime('%s', substr(t, 1, 4) || '-' || substr(t, 6, 2) || '-' || substr(t, 9, 2) || substr(t, 11, 9)) "
    "AS INTEGER), "
    "CAST(strftime('%s', mtime_ns / 1000000000, 'unixepoch', 'localtime') AS INTEGER))"
)


def iter_search_rows(conn: sqlite3.Connection, model: str, dim: int, *, page: int = 4096) -> Iterator[list[tuple]]:
    """Pages of (id, path, embedding, taken, camera) for the ok rows of one model, in path
    order: what the search matrix and its filters are built from."""
    cur = conn.cursor()
    cur.row_factory = None  # plain tuples: this reads every vector of the database
    # The unary + keep the planner off files_status_model: through it the rows would come
    # in rowid order and be sorted by path in a temporary B-tree, vectors and all. Walking
    # the path index instead returns them in order, with nothing to sort.
    cur.execute(
        f"SELECT id, path, embedding, {_TAKEN}, camera FROM ("
        "SELECT id, path, embedding, mtime_ns, "
        "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.ExifOffset.DateTimeOriginal') END AS t, "
        "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.Model') END AS camera "
        "FROM files WHERE +status = 'ok' AND +model = ? AND +dim = ?) ORDER BY path",
        (model, dim),
    )
    while rows := cur.fetchmany(page):
        yield rows


def count_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0, "pending": 0}
    counts.update(dict(conn.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall()))
    return counts


def failure_reasons(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """(error, files) of the failed rows, most common first."""
    rows = conn.execute(
        "SELECT coalesce(error, 'unknown error'), count(*) FROM files WHERE status = 'failed' "
        "GROUP BY 1 ORDER BY 2 DESC, 1"
    ).fetchall()
    return [(error, count) for error, count in rows]


def recent_runs(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The last runs, newest first, without their config."""
    rows = conn.execute(
        f"SELECT id, started_at, finished_at, status, mode, model, error, {', '.join(COUNTERS)} FROM runs "
        "ORDER BY id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [dict(row) for row in rows]


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version the database is at (PRAGMA user_version)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def vector_model_keys(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """The distinct (model, dim) of the ok rows, by one index seek each: no counting, so
    choosing the model of a query costs the same on a million rows as on ten."""
    keys: list[tuple[str, int]] = []
    row = conn.execute("SELECT model, dim FROM files WHERE status = 'ok' ORDER BY model, dim LIMIT 1").fetchone()
    while row is not None:
        keys.append((row[0], row[1]))
        # Two seeks, not one (model, dim) > (?, ?): SQLite seeks that on model alone and
        # would then step through every row of the model.
        row = conn.execute(
            "SELECT model, dim FROM files WHERE status = 'ok' AND model = ? AND dim > ? ORDER BY dim LIMIT 1", keys[-1]
        ).fetchone() or conn.execute(
            "SELECT model, dim FROM files WHERE status = 'ok' AND model > ? ORDER BY model, dim LIMIT 1", keys[-1][:1]
        ).fetchone()
    return keys


# -- incremental updates of the search cache and its approximate index ------------------
def search_stamp(conn: sqlite3.Connection) -> int | None:
    """The record stamp (migrations/0003_export_stamp.sql) of the rows a query reads now;
    None for a database that predates it: then a cache can only be built whole."""
    value = get_meta(conn, RECORD_STAMP)
    return None if value is None else int(value)


def iter_search_keys(conn: sqlite3.Connection, model: str, *, page: int = 4096) -> Iterator[list[tuple]]:
    """Pages of (id, path, stamp) for the ok rows of one model, in path order: an update of
    the search cache reads the rows changed after its stamp, and only those, whole."""
    cur = conn.cursor()
    cur.row_factory = None
    # Read from files_scan alone (it holds path, status, model and stamp, and the rowid):
    # no row with its vector is touched. The unary + keep the planner on it, in path order.
    cur.execute("SELECT id, path, stamp FROM files WHERE +status = 'ok' AND +model = ? ORDER BY path", (model,))
    while rows := cur.fetchmany(page):
        yield rows


def search_rows_by_id(conn: sqlite3.Connection, model: str, dim: int, ids: Sequence[int]) -> list[tuple]:
    """(id, path, embedding, taken, camera) of the given ok rows of one model, as
    iter_search_rows gives them, in no particular order."""
    out: list[tuple] = []
    cur = conn.cursor()
    cur.row_factory = None
    for start in range(0, len(ids), SCAN_BATCH):
        chunk = [int(i) for i in ids[start : start + SCAN_BATCH]]
        cur.execute(
            f"SELECT id, path, embedding, {_TAKEN}, camera FROM ("
            "SELECT id, path, embedding, mtime_ns, "
            "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.ExifOffset.DateTimeOriginal') END AS t, "
            "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.Model') END AS camera "
            f"FROM files WHERE id IN ({', '.join('?' * len(chunk))}) AND status = 'ok' AND model = ? AND dim = ?)",
            (*chunk, model, dim),
        )
        out.extend(cur.fetchall())
    return out


def ids_changed_since(conn: sqlite3.Connection, model: str, stamp: int) -> list[int]:
    """ids of the ok rows of one model stamped after `stamp` (read from files_scan)."""
    cur = conn.cursor()
    cur.row_factory = None
    cur.execute("SELECT id FROM files WHERE +status = 'ok' AND +model = ? AND stamp > ?", (model, stamp))
    return [row[0] for row in cur.fetchall()]
