"""Reads of the committed records: the rows an export writes, the vectors the queries rank,
and the counts `status` shows. Nothing here writes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby, islice
from operator import itemgetter
from typing import Any

from .runs import get_meta


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
    id: int | None = None  # the row's, where it was read with it


def count_export_rows(conn: sqlite3.Connection, model: str) -> int:
    return conn.execute("SELECT count(*) FROM files WHERE status = 'ok' AND model = ?", (model,)).fetchone()[0]


_EXPORT_COLUMNS = "path, size, mtime_ns, ctime_ns, width, height, exif, embedding, dim, id"


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


def export_order(conn: sqlite3.Connection, model: str, since: int) -> tuple[Any, Any]:
    """The export's rows in path order (the order of its lines) as two numpy arrays: their
    ids (int64) and whether each changed after the stamp `since` (bool)."""
    import numpy as np

    # Strings joined by SQLite and parsed by numpy, as in vector_ids: several times cheaper
    # than a tuple per row. The subquery walks files_scan, whose order is the path order
    # (the unary + keep the planner on it), and runs as a co-routine that hands its rows to
    # both group_concats in that order (SQLite does not flatten a subquery with an ORDER BY
    # into an aggregate). The documentation leaves group_concat's order open (3.44 added
    # group_concat(... ORDER BY)): tests/test_line_map.py compares a map-based export with
    # a full one byte for byte, which a change there would fail.
    ids, flags = conn.execute(
        "SELECT group_concat(id), group_concat(changed) FROM (SELECT id, stamp > ? AS changed FROM files "
        "WHERE +status = 'ok' AND +model = ? ORDER BY path)",
        (since, model),
    ).fetchone()
    return _ints(ids, np.int64), _ints(flags, np.int8).astype(bool)


def _ints(text: str | None, dtype: Any) -> Any:
    """The numpy array of a group_concat of integers (NULL: of no rows)."""
    import numpy as np

    return np.fromstring(text, dtype=dtype, sep=",") if text else np.empty(0, dtype=dtype)


def iter_changed_rows(conn: sqlite3.Connection, model: str, since: int) -> Iterator[ExportRow]:
    """The export's rows changed after the stamp `since`, whole, in path order."""
    # files_scan holds status, model and stamp, so the table is read for the rows that
    # pass alone; the planner would rather walk the path index and read every row.
    cur = conn.cursor()
    cur.row_factory = None
    cur.execute(f"SELECT {_EXPORT_COLUMNS} FROM files INDEXED BY files_scan "
                "WHERE +status = 'ok' AND +model = ? AND stamp > ? ORDER BY path", (model, since))
    for row in cur:
        yield ExportRow(*row)


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
    # The changed rows, whole, in the same order, from a second statement on the same
    # index, not one query per row.
    fresh = iter_changed_rows(conn, model, since)
    # Grouped in C: a run of 100,000 unchanged rows is ten list comprehensions, not 100,000
    # steps of this generator.
    for changed, rows in groupby(cur, key=itemgetter(1)):
        if changed:
            for path, _ in rows:
                row = next(fresh, None)
                if row is None or row.path != path:  # both read in one transaction: never
                    raise RuntimeError(f"the changed rows and the export's rows disagree at {path}")
                yield row
        else:
            while run := [path for path, _ in islice(rows, _RUN_PATHS)]:
                yield run


_RUN_PATHS = 10_000  # a list of paths held at once, whatever the number of rows


def export_row(conn: sqlite3.Connection, path: str) -> ExportRow:
    row = conn.execute(f"SELECT {_EXPORT_COLUMNS} FROM files WHERE path = ?", (path,)).fetchone()
    return ExportRow(*row)


def export_row_by_id(conn: sqlite3.Connection, row_id: int) -> ExportRow:
    row = conn.execute(f"SELECT {_EXPORT_COLUMNS} FROM files WHERE id = ?", (row_id,)).fetchone()
    return ExportRow(*row)


# -- the queries (search, similar, duplicates, status) ---------------------------------
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


_FACTS_BATCH = 500  # paths per lookup (under SQLite's limit on host parameters)


# -- incremental updates of the search cache and its approximate index ------------------
def search_stamp(conn: sqlite3.Connection) -> int | None:
    """The record stamp (migrations/0003_export_stamp.sql) of the rows a query reads now;
    None for a database that predates it: then a cache can only be built whole."""
    value = get_meta(conn, RECORD_STAMP)
    return None if value is None else int(value)


def search_rows_by_id(conn: sqlite3.Connection, model: str, dim: int, ids: Sequence[int]) -> list[tuple]:
    """(id, path, embedding, taken, camera) of the given ok rows of one model, as
    iter_search_rows gives them, in no particular order."""
    out: list[tuple] = []
    cur = conn.cursor()
    cur.row_factory = None
    for start in range(0, len(ids), _FACTS_BATCH):
        chunk = [int(i) for i in ids[start : start + _FACTS_BATCH]]
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


def vector_ids(conn: sqlite3.Connection, model: str, dim: int) -> Any:
    """The ids of the ok rows of one model as an ascending int64 numpy array, read from
    files_status_model alone: an update of the search cache finds the rows deleted since
    the older cache by comparing them with its ids."""
    import numpy as np

    # One string joined by SQLite and parsed by numpy: a million ids as Python tuples
    # would cost several times as much as the whole scan of the index.
    text = conn.execute(
        "SELECT group_concat(id) FROM files WHERE status = 'ok' AND model = ? AND dim = ?", (model, dim)
    ).fetchone()[0]
    ids = _ints(text, np.int64)
    ids.sort()  # (the scan's order is rowid order, but SQLite does not promise group_concat's)
    return ids


def ids_changed_since(conn: sqlite3.Connection, model: str, stamp: int) -> list[int]:
    """ids of the ok rows of one model stamped after `stamp` (read from files_scan)."""
    cur = conn.cursor()
    cur.row_factory = None
    cur.execute("SELECT id FROM files WHERE +status = 'ok' AND +model = ? AND stamp > ?", (model, stamp))
    return [row[0] for row in cur.fetchall()]



# -- what a results page shows of each image (contact_sheet.py) -------------------------
@dataclass(frozen=True)
class ImageFacts:
    """One file's row as a results page shows it: as last indexed, not read from disk."""

    path: str
    size: int  # bytes
    mtime_ns: int
    width: int | None  # as displayed, after EXIF orientation
    height: int | None
    taken: str | None  # EXIF DateTimeOriginal as the camera wrote it ("YYYY:MM:DD HH:MM:SS")
    make: str | None  # EXIF Make and Model
    model: str | None


def image_facts(conn: sqlite3.Connection, paths: Sequence[str]) -> dict[str, ImageFacts]:
    """The facts of those paths that have a row (a path without one is left out), by one
    lookup on the path index per _FACTS_BATCH paths."""
    found: dict[str, ImageFacts] = {}
    unique = sorted(set(paths))
    for i in range(0, len(unique), _FACTS_BATCH):
        chunk = unique[i : i + _FACTS_BATCH]
        rows = conn.execute(
            "SELECT path, size, mtime_ns, width, height, "
            "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.ExifOffset.DateTimeOriginal') END, "
            "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.Make') END, "
            "CASE WHEN json_valid(exif) THEN json_extract(exif, '$.Model') END "
            f"FROM files WHERE path IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        for row in rows:
            path, size, mtime_ns, width, height, taken, make, model = tuple(row)
            found[path] = ImageFacts(path, size, mtime_ns, width, height, _text(taken), _text(make), _text(model))
    return found


def _text(value: Any) -> str | None:
    # EXIF strings can come back as numbers or lists from odd files: shown only as text.
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None
