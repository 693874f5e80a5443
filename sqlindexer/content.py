"""Rows by content: the reads and writes that let a file take the vector of a row with the
same bytes (a renamed, moved, copied or touched file), and the groups of byte-identical
files.

Functions take an open connection plus plain values and return plain data. Each function
that writes commits its own transaction, so whatever it returned is durable. The rows a
scan found gone are in temp.missing (state.Scan.finish) until the scan's sweep.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .db import transaction
from .runs import Run, add_counts

# Values per statement (SQLite's host parameter limit is 32766).
CHUNK = 500


@dataclass(frozen=True, slots=True)
class Waiting:
    """A pending row, with the vector it may still hold from its old content."""

    id: int
    path: str
    size: int
    mtime_ns: int
    dev: int | None
    ino: int | None
    model: str | None  # of the vector it holds, if any
    content: bytes | None  # fingerprint of that vector's content


def has_vectors(conn: sqlite3.Connection, model: str) -> bool:
    """Whether any row holds a vector of model (ok, or pending with its old one)."""
    return conn.execute(
        "SELECT 1 FROM files WHERE status IN ('ok', 'pending') AND model = ? AND embedding IS NOT NULL LIMIT 1",
        (model,),
    ).fetchone() is not None


def pending_rows(conn: sqlite3.Connection) -> list[Waiting]:
    rows = conn.execute(
        "SELECT id, path, size, mtime_ns, dev, ino, CASE WHEN embedding IS NULL THEN NULL ELSE model END, content "
        "FROM files WHERE status = 'pending' ORDER BY path"
    ).fetchall()
    return [Waiting(*row) for row in rows]


def gone_by_inode(conn: sqlite3.Connection, model: str) -> dict[tuple[int, int, int, int], int]:
    """(dev, ino, size, mtime_ns) -> id of the rows found gone that hold a vector of model."""
    # CROSS JOIN keeps temp.missing the outer loop: without statistics on it, the planner
    # would rather walk every ok row of the model and look each one up there.
    rows = conn.execute(
        "SELECT f.dev, f.ino, f.size, f.mtime_ns, f.id FROM temp.missing AS m CROSS JOIN files AS f ON f.id = m.id "
        "WHERE f.status = 'ok' AND f.model = ? AND f.dev IS NOT NULL AND f.ino IS NOT NULL",
        (model,),
    ).fetchall()
    return {tuple(row[:4]): row[4] for row in rows}


def move_renamed(conn: sqlite3.Connection, run: Run, arrivals: Sequence[tuple]) -> int:
    """Write the new files a re-index's scan held back, (path, size, mtime_ns, ctime_ns,
    dev, ino, run id) each, once temp.missing holds the rows found gone: one with the
    (dev, ino, size, mtime_ns) of such a row holding a vector of run.model is that file
    renamed, and the row itself moves to the new path (its id, vector, EXIF, size in
    pixels and fingerprint untouched, no vector copied, no row inserted or deleted); the
    others are inserted as pending. Counted as before a row could move: the new path is
    new, the old one deleted, the file reused and renamed. One transaction; returns how
    many were inserted (to embed)."""
    with transaction(conn):
        gone = gone_by_inode(conn, run.model)
        moves, new = [], []
        for path, size, mtime_ns, ctime_ns, dev, ino, run_id in arrivals:
            src = gone.pop((dev, ino, size, mtime_ns), None)
            if src is None:
                new.append((path, size, mtime_ns, ctime_ns, dev, ino, run_id))
            else:
                moves.append((path, ctime_ns, run.build, run.id, src))
        if moves or new:
            stamp = own_stamp(conn, vectors=bool(moves))
            # A statement per row, not one UPDATE joined with a temporary table: such a
            # statement journals every page it changes (temp_store = MEMORY: in memory),
            # tens of MB for rows scattered through the table, for no time to speak of.
            conn.executemany("UPDATE files SET path = ?, ctime_ns = ?, build = ?, changed_run = ?, stamp = ? "
                             "WHERE id = ?", [(*m[:-1], stamp, m[-1]) for m in moves])
            conn.executemany("DELETE FROM temp.missing WHERE id = ?", [(m[-1],) for m in moves])
            conn.executemany(
                "INSERT INTO files (path, size, mtime_ns, ctime_ns, dev, ino, status, changed_run, stamp) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                [(*n, stamp) for n in new],
            )
        n = len(moves)
        add_counts(conn, run.id, new=len(arrivals), deleted=n, reused=n, renamed=n)
    return len(new)


def own_stamp(conn: sqlite3.Connection, *, vectors: bool) -> int:
    """Move record_stamp (and vectors_version, for a write of vectors a search sees) once,
    for statements that then stamp every row they write with the value returned: the
    triggers leave such rows to them (migrations/0005_own_stamps.sql). Call inside the
    transaction that writes the rows."""
    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'record_stamp' "
                 "OR (? AND key = 'vectors_version')", (vectors,))
    return int(conn.execute("SELECT value FROM meta WHERE key = 'record_stamp'").fetchone()[0])


def _chunks(values: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def sizes_with_vectors(conn: sqlite3.Connection, model: str, sizes: Iterable[int]) -> set[int]:
    """Those of sizes that some ok row of model has: only a file of such a size can share
    its content (read from the index files_content, the rows for the model check only)."""
    # One lookup per size that stops at its first row: many files may share a size.
    return {size for size in set(sizes) if conn.execute(
        "SELECT 1 FROM files WHERE size = ? AND status = 'ok' AND model = ? LIMIT 1", (size, model)
    ).fetchone() is not None}


def unfingerprinted(conn: sqlite3.Connection, model: str, sizes: Iterable[int]) -> list[tuple[int, str, int, int]]:
    """(id, path, size, mtime_ns) of the ok rows of model of these sizes that have no
    fingerprint yet (made before fingerprints), whose files are still there."""
    out: list[tuple[int, str, int, int]] = []
    for chunk in _chunks(sorted(set(sizes))):
        out += [tuple(row) for row in conn.execute(
            f"SELECT id, path, size, mtime_ns FROM files WHERE status = 'ok' AND model = ? AND content IS NULL "
            f"AND size IN ({','.join('?' * len(chunk))}) AND id NOT IN (SELECT id FROM temp.missing)",
            (model, *chunk),
        )]
    return out


def set_fingerprints(conn: sqlite3.Connection, found: Sequence[tuple[bytes, int, int, int]], run: Run) -> None:
    """(content, id, size, mtime_ns): record the fingerprints of ok rows that had none,
    where the row still describes the file that was read."""
    with transaction(conn):
        conn.executemany(
            "UPDATE files SET content = ? WHERE id = ? AND size = ? AND mtime_ns = ? AND status = 'ok' "
            "AND content IS NULL",
            found,
        )
        add_counts(conn, run.id, hashed_bytes=sum(size for _, _, size, _ in found))


def sources(conn: sqlite3.Connection, model: str, keys: Iterable[tuple[int, bytes]]) -> dict[bytes, int]:
    """content -> id of a row holding a vector of model made from that content: an ok row
    with that (size, content), else a pending row that still holds the vector of its old
    content (two files that swapped names, a file copied over another)."""
    found: dict[bytes, int] = {}
    # One statement per chunk of keys, each key looked up by the index files_content
    # (then, only if no ok row has it, among the pending rows of the model).
    for chunk in _chunks(sorted(set(keys))):
        found.update((content, src) for content, src in conn.execute(
            f"WITH k(size, content) AS (VALUES {','.join(['(?, ?)'] * len(chunk))}) "
            "SELECT k.content, coalesce("
            "(SELECT id FROM files WHERE size = k.size AND content = k.content AND status = 'ok' AND model = ? "
            "LIMIT 1), "
            "(SELECT id FROM files WHERE status = 'pending' AND model = ? AND content = k.content "
            "AND embedding IS NOT NULL LIMIT 1)) FROM k",
            (*(v for key in chunk for v in key), model, model),
        ) if src is not None)
    return found


@dataclass(frozen=True, slots=True)
class Adoption:
    """Row dst (pending, scanned with size and mtime_ns) takes the vector of row src."""

    src: int
    dst: int
    size: int
    mtime_ns: int


def adopt(conn: sqlite3.Connection, adoptions: Sequence[Adoption], run: Run, *, renamed: bool,
          hashed_bytes: int = 0) -> int:
    """Give each dst the vector, EXIF, size in pixels and fingerprint of its src, bit for
    bit (its own path, size and times stay); the run's counters in the same transaction.
    A dst that is no longer pending with the size and mtime it was matched with is left
    alone. src may be dst itself (a touched file takes back its own vector). Returns how
    many rows took a vector."""
    if not adoptions:
        with transaction(conn):
            add_counts(conn, run.id, hashed_bytes=hashed_bytes)
        return 0
    with transaction(conn):
        # Set-based, in two statements: the values of every source are copied into
        # temp.adopting before any row is written, since a row can be the source of one
        # adoption and the destination of another (two files that swapped names).
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS adopting (dst INTEGER PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "src INTEGER, width INTEGER, height INTEGER, exif TEXT, model TEXT, dim INTEGER, embedding BLOB, "
            "content BLOB)"
        )
        conn.execute("DELETE FROM temp.adopting")
        conn.executemany("INSERT OR IGNORE INTO temp.adopting (dst, size, mtime_ns, src) VALUES (?, ?, ?, ?)",
                         [(a.dst, a.size, a.mtime_ns, a.src) for a in adoptions])
        conn.execute(
            "UPDATE temp.adopting SET (width, height, exif, model, dim, embedding, content) = "
            "(SELECT s.width, s.height, s.exif, s.model, s.dim, s.embedding, s.content FROM files AS s "
            "WHERE s.id = adopting.src AND s.embedding IS NOT NULL)"
        )
        # The join starts from temp.adopting and finds each row of files by its id: the IN
        # and the unary + keep the planner from walking every pending row (through
        # files_status_model) or every row (files_scan) instead.
        stamp = own_stamp(conn, vectors=True)
        done = conn.execute(
            "UPDATE files SET width = a.width, height = a.height, exif = a.exif, model = a.model, dim = a.dim, "
            "embedding = a.embedding, content = a.content, status = 'ok', error = NULL, build = ?, changed_run = ?, "
            "stamp = ? "
            "FROM temp.adopting AS a WHERE files.id IN (SELECT dst FROM temp.adopting) AND files.id = a.dst "
            "AND a.embedding IS NOT NULL AND +files.status = 'pending' AND files.size = a.size "
            "AND files.mtime_ns = a.mtime_ns",
            (run.build, run.id, stamp),
        ).rowcount
        conn.execute("DELETE FROM temp.adopting")
        add_counts(conn, run.id, reused=done, renamed=done if renamed else 0, hashed_bytes=hashed_bytes)
    return done


# -- duplicates --exact ----------------------------------------------------------------
@dataclass(frozen=True)
class IdenticalFiles:
    size: int  # bytes, each
    content: bytes
    paths: list[str]  # in path order


@dataclass(frozen=True)
class ExactDuplicates:
    groups: list[IdenticalFiles]  # the most bytes to win back (size x extra copies) first
    fingerprinted: int  # indexed files with a fingerprint
    without: int  # indexed files without one (made before fingerprints)


def exact_duplicates(conn: sqlite3.Connection) -> ExactDuplicates:
    """Every fingerprint that two or more indexed files share. Reads the index
    files_content, and the paths of the files in a group: never a vector."""
    if "content" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:
        # A database of an older schema, read as it is: no file has a fingerprint yet.
        ok = conn.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0]
        return ExactDuplicates([], 0, ok)
    keys = conn.execute(
        "SELECT size, content FROM files WHERE status = 'ok' AND content IS NOT NULL "
        "GROUP BY size, content HAVING count(*) > 1"
    ).fetchall()
    groups = []
    for size, content in keys:
        paths = [path for (path,) in conn.execute(
            "SELECT path FROM files WHERE size = ? AND content = ? AND status = 'ok' ORDER BY path", (size, content)
        )]
        groups.append(IdenticalFiles(size, content, paths))
    groups.sort(key=lambda g: (-g.size * (len(g.paths) - 1), g.paths[0]))
    with_content, ok = conn.execute("SELECT count(content), count(*) FROM files WHERE status = 'ok'").fetchone()
    return ExactDuplicates(groups, with_content, ok - with_content)
