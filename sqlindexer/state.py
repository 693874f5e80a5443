"""The state of every file: what the scan found, what is pending, what the model made of
it, and vectors adopted from an existing index.

Functions take an open connection plus plain values and return plain data. Each function
that writes commits its own transaction, so whatever it returned is durable.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import content
from .db import transaction
from .runs import Run, add_counts
from .errors import EmbedError
from .scan import FileRecord, is_under

# Rows fetched or written per statement; SQLite's default limit on host parameters is
# 32766, and a few hundred keeps each transaction short.
SCAN_BATCH = 500
PENDING_PAGE = 256
# New files a re-index holds back until the walk has ended, at most: one of them may be a
# file renamed, which then moves its old row (content.move_renamed) instead of being
# inserted while that row is deleted. Past this many they are written as they come.
HELD_NEW = 50_000


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
        self._inodes: list[tuple] = []
        self._missing: list[tuple] = []
        # Only a re-index reuses vectors, and only a database with vectors of the model
        # has rows a renamed file can move.
        self._hold = run.mode == "reindex" and content.has_vectors(conn, run.model)
        self._held: list[tuple] = []
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
            f"SELECT CASE WHEN {_REQUEUE} THEN NULL ELSE path END, size, mtime_ns, ctime_ns, dev, ino "
            "FROM files WHERE path > :after AND path <= :last ORDER BY path",
            params,
        ).fetchall()
        new = modified = held = 0
        if rows != records:
            new, modified, held = self._compare(records, rows, params)
        u = self._unsaved
        u.scanned += len(records)
        u.new += new
        u.modified += modified
        u.unchanged += len(records) - new - modified - held
        if len(self._held) > HELD_NEW:
            u.new += len(self._held)
            self.to_embed += len(self._held)
            self._new += self._held
            self._held, self._hold = [], False
        queued = len(self._new) + len(self._replaced) + len(self._requeued) + len(self._touched) + \
            len(self._inodes) + len(self._missing)
        if queued >= SCAN_BATCH:
            self._write()

    def _compare(self, records: Sequence[FileRecord], rows: list[tuple],
                 params: dict[str, Any]) -> tuple[int, int, int]:
        """Queue the changes of one batch; return (new, modified, new held back)."""
        matched, walked = set(rows), set(records)
        differ = [r for r in records if r not in matched]
        unmatched = [row for row in rows if row not in walked]
        if any(row[0] is None for row in unmatched):
            # Rows that need work again (after a change of model, all of them): their paths
            # came back NULL, so read the whole range with ids and flags.
            found = self._cursor.execute(
                f"SELECT path, id, size, mtime_ns, ctime_ns, dev, ino, {_REQUEUE} FROM files "
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
                    f"SELECT path, id, size, mtime_ns, ctime_ns, dev, ino, 0 FROM files "
                    f"WHERE path IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        known = {row[0]: row for row in found}
        new = modified = 0
        held = len(self._held)
        run_id = self.run.id
        for path, size, mtime_ns, ctime_ns, dev, ino in differ:
            row = known.pop(path, None)
            if row is None:
                if self._hold and ino is not None:
                    self._held.append((path, size, mtime_ns, ctime_ns, dev, ino, run_id))
                else:
                    self._new.append((path, size, mtime_ns, ctime_ns, dev, ino, run_id))
                    new += 1
                continue
            _, file_id, old_size, old_mtime_ns, old_ctime_ns, old_dev, old_ino, requeue = row
            if old_size != size or old_mtime_ns != mtime_ns:
                self._replaced.append((size, mtime_ns, ctime_ns, dev, ino, run_id, file_id))
                modified += 1
            elif requeue:
                self._requeued.append((ctime_ns, dev, ino, file_id))
                self.to_embed += 1
            elif old_ctime_ns != ctime_ns:  # only its ctime changed (chmod, a new link): nothing to embed
                self._touched.append((ctime_ns, dev, ino, file_id))
            elif (old_dev, old_ino) != (dev, ino):
                # A row of a database older than inodes (or a disk whose device number
                # changed): recorded once, the record itself is unchanged.
                self._inodes.append((dev, ino, file_id))
        # Rows of this range that the walk did not yield.
        walked_paths = {r.path for r in records}
        self._missing += [(row[1], path) for path, row in known.items() if path not in walked_paths]
        self.to_embed += new + modified
        return new, modified, len(self._held) - held

    def _write(self) -> None:
        conn = self.conn
        with transaction(conn):
            conn.executemany(
                "INSERT INTO files (path, size, mtime_ns, ctime_ns, dev, ino, status, changed_run) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                self._new,
            )
            # A modified file's row is replaced in place (same id) and waits as 'pending'.
            # It keeps the vector, EXIF and fingerprint of its old content, never exported
            # while pending, so that a file whose bytes did not change (touched, or copied
            # over with the same bytes) takes them back instead of being embedded again.
            conn.executemany(
                "UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, dev = ?, ino = ?, status = 'pending', "
                "error = NULL, build = NULL, changed_run = ? WHERE id = ?",
                self._replaced,
            )
            conn.executemany("UPDATE files SET ctime_ns = ?, dev = ?, ino = ?, status = 'pending' WHERE id = ?",
                             self._requeued)
            conn.executemany("UPDATE files SET ctime_ns = ?, dev = ?, ino = ? WHERE id = ?", self._touched)
            conn.executemany("UPDATE files SET dev = ?, ino = ? WHERE id = ?", self._inodes)
            conn.executemany("INSERT INTO temp.missing (id, path) VALUES (?, ?)", self._missing)
            u = self._unsaved
            add_counts(conn, self.run.id, scanned=u.scanned, new=u.new, modified=u.modified, unchanged=u.unchanged)
        self._unsaved = ScanCounts()
        self._new, self._replaced, self._requeued, self._touched, self._inodes, self._missing = [], [], [], [], [], []

    def finish(self, *, keep_under: Iterable[str] = ()) -> int:
        """After the whole walk: write what is queued and collect in temp.missing the rows
        of files the walk did not see, except under folders that could not be listed (not
        seen there does not mean deleted); then the new files held back are written, a
        renamed one as its old row moved to its new path. Returns how many rows are still
        missing. They stay in `files`, where a copied file can still find its vector,
        until sweep()."""
        self._write()
        self._collect_missing(list(keep_under))
        if self._held:
            self.to_embed += content.move_renamed(self.conn, self.run, self._held)
            self._held = []
        return self.conn.execute("SELECT count(*) FROM temp.missing").fetchone()[0]

    def _collect_missing(self, keep: list[str]) -> None:
        conn = self.conn
        with transaction(conn):
            conn.execute("INSERT INTO temp.missing (id, path) SELECT id, path FROM files WHERE path > ?",
                         (self._after,))
            if keep:
                kept = [(file_id,) for file_id, path in conn.execute("SELECT id, path FROM temp.missing")
                        if any(is_under(path, k) for k in keep)]
                conn.executemany("DELETE FROM temp.missing WHERE id = ?", kept)

    def sweep(self) -> int:
        """Delete the rows finish() found gone and record the count; returns it."""
        conn = self.conn
        with transaction(conn):
            # One statement: the ids are looked up in temp.missing, never sent from Python.
            gone = conn.execute("DELETE FROM files WHERE id IN (SELECT id FROM temp.missing)").rowcount
            conn.execute("DELETE FROM temp.missing")
            add_counts(conn, self.run.id, deleted=gone)
        return gone


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
    content: bytes | None = None  # fingerprint of the bytes decoded


def store_results(conn: sqlite3.Connection, results: Sequence[Result], run: Run, *, model: str, dim: int | None) -> None:
    """Commit one batch of results, and the run's counters with them, in one transaction."""
    ok = [
        (r.width, r.height, exif_json(r.exif), model, dim, r.vector, r.content, run.build, run.id, r.file.id,
         r.file.size, r.file.mtime_ns)
        for r in results
        if r.vector is not None and not r.changed
    ]
    failed = [
        (r.error, r.width, r.height, exif_json(r.exif), run.build, run.id, r.file.id, r.file.size, r.file.mtime_ns)
        for r in results
        if r.error is not None and not r.changed
    ]
    hashed = sum(r.file.size for r in results if r.content is not None)
    with transaction(conn):
        # The size/mtime guard keeps a result off a row whose file was rescanned as changed.
        conn.executemany(
            "UPDATE files SET status = 'ok', error = NULL, width = ?, height = ?, exif = ?, model = ?, dim = ?, "
            "embedding = ?, content = ?, build = ?, changed_run = ? WHERE id = ? AND size = ? AND mtime_ns = ?",
            ok,
        )
        conn.executemany(
            "UPDATE files SET status = 'failed', error = ?, width = ?, height = ?, exif = ?, model = NULL, "
            "dim = NULL, embedding = NULL, content = NULL, build = ?, changed_run = ? "
            "WHERE id = ? AND size = ? AND mtime_ns = ?",
            failed,
        )
        add_counts(conn, run.id, embedded=len(ok), failed=len(failed), decoded=sum(r.decoded for r in results),
                   hashed_bytes=hashed)


def vector_blobs(vectors: Any, *, dim: int, model: str, where: str = "") -> list[bytes]:
    """A batch of vectors, (n, dim) floats from the model, as the blobs the database stores
    (little-endian float32): the one place both engines turn vectors into rows."""
    if vectors.shape[1] != dim:
        raise EmbedError(f"model {model!r} gave {vectors.shape[1]}-d vectors{where}, its config says {dim}")
    return [vec.astype("<f4").tobytes() for vec in vectors]


def exif_json(exif: dict[str, Any] | None) -> str | None:
    """EXIF (plain JSON values, exif.py makes it so) as the text the database stores."""
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
            values = (rec.size, rec.mtime_ns, rec.ctime_ns, rec.width, rec.height, exif_json(rec.exif),
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
                    "model = ?, dim = ?, embedding = ?, build = ?, changed_run = ?, status = 'ok', error = NULL, "
                    "content = NULL WHERE id = ?",
                    (*values, row["id"]),
                )
            count += 1
        add_counts(conn, run.id, imported=count)
    return count
