"""Before anything is decoded: give new and modified files the vector of a row with the
same content, so that a file renamed, moved, copied, re-mounted or only touched is neither
decoded nor embedded again.

Two rules, both for the vectors of the run's model only:
- renamed: a pending file whose (device, inode, size, mtime_ns) are those of a row whose
  path this scan found gone is that file under a new name; it takes the row's vector
  without being read at all. The scan moves most such rows itself (state.Scan holds new
  files back, content.move_renamed); what reaches this rule is a file it did not hold
  (past state.HELD_NEW of them) or a pending row an interrupted run left.
- same content: a pending file of a size that some row with a vector has is read once and
  hashed (fingerprint.py); a row with the same fingerprint, under any path (still on disk,
  found gone, or its own row whose mtime only moved), gives its vector. Rows made before
  fingerprints, of such a size, get theirs on the way (their files are read and hashed).
A file no rule matches stays pending and is decoded and embedded as before. Only a
fingerprint match, never a name or a size, gives a file a vector of other bytes.

Core code: no Click, no printing, no SQL (content.py holds it).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from . import content, fingerprint
from .progress import Progress, no_progress
from .runs import Run

log = logging.getLogger(__name__)

# Files hashed at a time (the threads read the next batch while one is matched).
BATCH = 256
# Hashed files matched and committed at a time, at most, or fewer whose bytes reach
# ADOPT_BYTES: a stopped run loses at most that much reading. Each commit of a few hundred
# adoptions dirties index pages all over files_content and checkpoints the WAL often.
ADOPT_FILES = 2048
ADOPT_BYTES = 256 << 20
# Renamed files matched and committed at a time: nothing is read for them, so a batch is
# one short set-based transaction, and a larger one saves commits.
RENAME_BATCH = 4096
# Threads that read and hash: reading and BLAKE3 both release the GIL.
HASH_THREADS = 4

T = TypeVar("T")


@dataclass
class Reused:
    renamed: int = 0
    by_content: int = 0
    hashed_bytes: int = 0

    @property
    def total(self) -> int:
        return self.renamed + self.by_content


def reuse_known(conn: sqlite3.Connection, run: Run, *, progress: Progress = no_progress,
                threads: int = HASH_THREADS) -> Reused:
    """Give the pending files whose content the database holds for run.model that
    content's vector; returns what was done (also added to the run's counters)."""
    done = Reused()
    model = run.model
    if not content.has_vectors(conn, model):
        return done  # a first index: nothing to match, nothing read twice
    waiting = content.pending_rows(conn)
    if not waiting:
        return done
    rest = _renamed(conn, run, waiting, done)
    own = {w.id for w in rest if w.model == model and w.content is not None}
    sizes = content.sizes_with_vectors(conn, model, {w.size for w in rest})
    candidates = [w for w in rest if w.size in sizes or w.id in own]
    if not candidates:
        return done
    threads = max(1, threads)
    with ThreadPoolExecutor(threads) as pool:
        hashing = functools.partial(_hashing, pool, threads)
        _fingerprint_old_rows(conn, run, {w.size for w in candidates}, hashing, done)
        with progress("hashing", len(candidates)) as tick:
            _by_content(conn, run, candidates, hashing, tick, done)
    return done


def _by_content(conn: sqlite3.Connection, run: Run, candidates: Sequence[content.Waiting],
                hashing: Callable[..., Callable[[], list[bytes | None]]], tick: Callable[[int], None],
                done: Reused) -> None:
    """Hash the candidates BATCH at a time and give those whose fingerprint is known its
    vector, committed ADOPT_FILES (or ADOPT_BYTES) at a time."""
    batches = [candidates[start : start + BATCH] for start in range(0, len(candidates), BATCH)]
    # The threads read and hash the next batch while the files held so far are matched
    # and committed: SQLite, like reading, releases the GIL.
    ahead = hashing(batches[0], _where)
    held: list[content.Waiting] = []
    digests: list[bytes | None] = []
    held_bytes = 0
    for k, batch in enumerate(batches):
        held += batch
        held_bytes += sum(w.size for w in batch)
        digests += ahead()
        if k + 1 < len(batches):
            ahead = hashing(batches[k + 1], _where)
        if k + 1 == len(batches) or len(held) >= ADOPT_FILES or held_bytes >= ADOPT_BYTES:
            _adopt_by_content(conn, run, held, digests, done)
            held, digests, held_bytes = [], [], 0
        tick(len(batch))


def _where(w: content.Waiting) -> tuple[str, int, int]:
    return w.path, w.size, w.mtime_ns


def _renamed(conn: sqlite3.Connection, run: Run, waiting: Sequence[content.Waiting],
             done: Reused) -> list[content.Waiting]:
    """Apply the inode rule; return the rows it did not match."""
    gone = content.gone_by_inode(conn, run.model)
    matched: list[content.Adoption] = []
    rest: list[content.Waiting] = []
    for w in waiting:
        src = gone.pop((w.dev, w.ino, w.size, w.mtime_ns), None) if w.ino is not None else None
        if src is None:
            rest.append(w)
        else:
            matched.append(content.Adoption(src, w.id, w.size, w.mtime_ns))
    for start in range(0, len(matched), RENAME_BATCH):
        done.renamed += content.adopt(conn, matched[start : start + RENAME_BATCH], run, renamed=True)
    return rest


def _fingerprint_old_rows(conn: sqlite3.Connection, run: Run, sizes: set[int],
                          hashing: Callable[..., Callable[[], list[bytes | None]]], done: Reused) -> None:
    """Rows with a vector but no fingerprint (made before fingerprints), of a size some
    pending file has: read their files now, so a copy of them can match."""
    old = content.unfingerprinted(conn, run.model, sizes)
    if old:
        log.info("fingerprinting %d indexed files that have none yet", len(old))
    for start in range(0, len(old), BATCH):
        batch = old[start : start + BATCH]
        digests = hashing(batch, lambda row: (row[1], row[2], row[3]))()
        found = [(d, row[0], row[2], row[3]) for row, d in zip(batch, digests) if d is not None]
        content.set_fingerprints(conn, found, run)
        done.hashed_bytes += sum(row[2] for row in found)


def _adopt_by_content(conn: sqlite3.Connection, run: Run, batch: Sequence[content.Waiting],
                      digests: Sequence[bytes | None], done: Reused) -> None:
    known = content.sources(conn, run.model, [(w.size, d) for w, d in zip(batch, digests) if d is not None])
    adoptions = []
    for w, d in zip(batch, digests):
        if d is None:
            continue  # changed or unreadable since the scan: the decode step meets it
        if w.model == run.model and w.content == d:
            src = w.id  # its own old vector: the bytes did not change, only the mtime
        else:
            src = known.get(d)
        if src is not None:
            adoptions.append(content.Adoption(src, w.id, w.size, w.mtime_ns))
    hashed = sum(w.size for w, d in zip(batch, digests) if d is not None)
    done.by_content += content.adopt(conn, adoptions, run, renamed=False, hashed_bytes=hashed)
    done.hashed_bytes += hashed


def _hashing(pool: ThreadPoolExecutor, parts: int, items: Sequence[T],
             where: Callable[[T], tuple[str, int, int]]) -> Callable[[], list[bytes | None]]:
    """Start hashing items on the pool; returns what waits for their digests, in order."""
    def some(part: Sequence[T]) -> list[bytes | None]:
        return [fingerprint.hash_file(path, size=size, mtime_ns=mtime_ns)
                for path, size, mtime_ns in map(where, part)]

    # One task per thread, each a slice of the batch: a task per file costs more than
    # hashing a small file.
    step = -(-len(items) // parts) or 1
    futures = [pool.submit(some, items[i : i + step]) for i in range(0, len(items), step)]
    return lambda: [d for future in futures for d in future.result()]
