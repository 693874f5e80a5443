"""A new vector cache from an older one: the rows changed since are read from SQLite and
appended to the older cache's store, which the new one shares (vector_store.py), or, when
that store would hold too many dead rows, the kept rows copied into a new one.

What the older cache holds is the database as it was at its record stamp (every change to
a row's vector, path, status, model or EXIF stamps the row with a later value; a deleted
row is simply gone), so a row whose stamp is not above it holds the same vector, date and
camera today, and one that is above it, or that the older cache does not hold, is read.
Nothing is read for an unchanged row: the ids of the model's rows (a scan of an index of
ids, records.vector_ids) say which of the older cache's rows are gone, the stamps which
changed, and the kept rows keep their paths and so their order, with each changed or new
row put in among them where its path sorts. For each row of the cache, an update only
copies its entries of the per-row arrays, in numpy.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING

import numpy as np

from . import records
from .errors import SearchError
from .progress import Progress
from .vector_store import STORE, RowView, link_and_append, open_store

if TYPE_CHECKING:
    from .vectors import VectorIndex
    from .vectors_build import CacheArrays

# A shared store is copied into one of its own (its dead rows dropped) before it would
# hold more than this many times the rows of the cache: exhaustive queries scan them all.
COMPACT = 1.5
# Share of changed rows above which the cache is read again from SQLite, whole.
UPDATE_MAX_SHARE = 0.25


def copy_forward(conn: sqlite3.Connection, model: records.ModelVectors, out: CacheArrays, previous: VectorIndex,
                 progress: Progress) -> list[str] | None:
    """Fill out with the model's rows as they are now, from previous and the changed rows;
    return the camera names (previous's first, so the copied codes keep their meaning).
    None, with nothing filled, when so much changed that reading everything is cheaper."""
    from .vectors import NO_DATE
    from .vectors_build import normalised_block

    assert previous.stamp is not None
    count = len(out.ids)
    ids = records.vector_ids(conn, model.model, model.dim)  # ascending: the new cache's id_sorted
    if len(ids) != count:
        raise SearchError("the database changed while its vectors were read")
    changed = np.unique(np.asarray(records.ids_changed_since(conn, model.model, previous.stamp), dtype=np.int64))
    old = previous.rows_of(ids)
    fresh = (old < 0) | _member(ids, changed)
    if fresh.sum() > UPDATE_MAX_SHARE * count:
        return None
    with progress("updating vectors", count) as tick:
        kept = np.zeros(len(previous), dtype=bool)  # previous's rows that stay, in its (path) order
        kept[old[~fresh]] = True
        keep_src = np.flatnonzero(kept)
        rows = records.search_rows_by_id(conn, model.model, model.dim, ids[fresh].tolist())
        if len(rows) != count - len(keep_src):
            raise SearchError("the database changed while its vectors were read")
        encoded = [row[1].encode("utf-8", "surrogateescape") for row in rows]
        by_path = sorted(range(len(rows)), key=encoded.__getitem__)
        rows, encoded = [rows[i] for i in by_path], [encoded[i] for i in by_path]
        at, keep = _places(previous, kept, encoded, count)
        names = {name: i for i, name in enumerate(previous.cameras)}
        out.ids[keep] = previous.ids[keep_src]
        out.ids[at] = [row[0] for row in rows]
        out.taken[keep] = previous.taken[keep_src]
        out.taken[at] = [NO_DATE if row[3] is None else row[3] for row in rows]
        out.camera[keep] = previous.camera[keep_src]
        out.camera[at] = [-1 if row[4] is None else names.setdefault(str(row[4]), len(names)) for row in rows]
        block = normalised_block(rows, model.dim) if rows else np.empty((0, model.dim), dtype=np.float32)
        old_slots = keep_src if previous.slots is None else np.asarray(previous.slots)[keep_src]
        _vectors(out, previous, keep, old_slots, at, block)
        _paths(out, previous, keep_src, keep, at, encoded)
        out.id_order = _id_rows(ids, fresh, old, kept, keep, at, rows)
        tick(count)
    return list(names)


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _places(previous: VectorIndex, kept: np.ndarray, encoded: list[bytes], count: int) -> tuple[np.ndarray, np.ndarray]:
    """The new cache's rows of the fresh paths (encoded, in path order) and of previous's
    kept rows (in its order): a kept row's path has not changed, so both stay in path
    order when each fresh path goes after the kept rows whose paths sort before it."""
    kept_before = np.concatenate([[0], np.cumsum(kept)])
    at = kept_before[previous.paths.bisect_sorted(encoded)] + np.arange(len(encoded), dtype=np.int64)
    taken = np.zeros(count, dtype=bool)
    taken[at] = True
    return at.astype(np.int64), np.flatnonzero(~taken)


def _paths(out: CacheArrays, previous: VectorIndex, keep_src: np.ndarray, keep: np.ndarray, at: np.ndarray,
           encoded: list[bytes]) -> None:
    """The new cache's path table: the kept rows' bytes copied from previous's, a run of
    rows at a time, and the fresh ones put in between."""
    old_offsets = np.asarray(previous.paths.offsets)
    lengths = np.empty(len(out.ids), dtype=np.int64)
    lengths[keep] = np.diff(old_offsets)[keep_src]
    lengths[at] = [len(e) for e in encoded]
    out.offsets[1:] = np.cumsum(lengths)
    offsets = np.asarray(out.offsets)
    blob = np.empty(int(offsets[-1]), dtype=np.uint8)
    old_blob = np.asarray(previous.paths.blob)
    for src, dst, k in _runs(keep_src, keep):
        blob[offsets[dst] : offsets[dst + k]] = old_blob[old_offsets[src] : old_offsets[src + k]]
    for row, e in zip(at.tolist(), encoded):
        blob[offsets[row] : offsets[row + 1]] = np.frombuffer(e, dtype=np.uint8)
    out.blob = blob


def _id_rows(ids: np.ndarray, fresh: np.ndarray, old: np.ndarray, kept: np.ndarray, keep: np.ndarray,
             at: np.ndarray, rows: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(id_sorted, id_rows) of the new cache without sorting its ids again: ids is
    ascending; a kept id's row follows its old row, a fresh id's is where it was put."""
    new_row_of_old = np.full(len(kept), -1, dtype=np.int64)
    new_row_of_old[kept] = keep
    id_rows = np.empty(len(ids), dtype=np.int64)
    id_rows[~fresh] = new_row_of_old[old[~fresh]]
    fresh_ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    id_rows[fresh] = at[np.argsort(fresh_ids, kind="stable")]  # ids[fresh] is ascending too
    return ids, id_rows


def _vectors(out: CacheArrays, previous: VectorIndex, keep: np.ndarray, old_slots: np.ndarray, at: np.ndarray,
             block: np.ndarray) -> None:
    """The new cache's vectors: the kept rows (at old_slots of previous's store) and the
    changed ones (block, for the rows at). Shared with previous where that is possible and
    the store stays under COMPACT times the rows; else copied into a store of its own."""
    dim = block.shape[1]
    count = len(out.ids)
    start = None
    if out.tmp is not None and previous.folder is not None:
        start = link_and_append(previous.folder, out.tmp, block, dim, max_rows=int(COMPACT * count))
    if start is not None:
        slots = np.empty(count, dtype=np.int64)
        slots[keep] = old_slots
        slots[at] = start + np.arange(len(at))
        out.share(open_store(out.tmp, start + len(at), dim), slots)
        return
    vectors = out.matrix()
    # Both sides are in path order: the rows kept are a few long runs, each one copy.
    runs = _runs(old_slots, keep)
    if not _copy_file_runs(previous, out, runs, dim * 4):
        store = previous.vectors.store if isinstance(previous.vectors, RowView) else previous.vectors
        for src, dst, k in runs:
            vectors[dst : dst + k] = store[src : src + k]
    vectors[at] = block


def _runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(source start, destination start, length) of the runs where both go up by one."""
    if not len(src):
        return []
    cuts = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], cuts])
    lengths = np.diff(np.concatenate([starts, [len(src)]]))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


def _copy_file_runs(previous: VectorIndex, out: CacheArrays, runs: list[tuple[int, int, int]], row_bytes: int) -> bool:
    """Copy the runs of rows from the older cache's vectors.npy into the new one inside the
    kernel (copy_file_range: no page of either file mapped, or read into this process);
    False where that cannot be done (no such call, no files, another file system)."""
    if previous.folder is None or out.tmp is None or not hasattr(os, "copy_file_range"):
        return False
    try:
        with open(previous.folder / STORE, "rb") as src, open(out.tmp / STORE, "r+b") as dst:
            src_at = dst_at = 0
            for s, d, k in runs:
                n, s_off, d_off = k * row_bytes, src_at + s * row_bytes, dst_at + d * row_bytes
                while n:
                    done = os.copy_file_range(src.fileno(), dst.fileno(), n, s_off, d_off)
                    if done <= 0:
                        raise OSError("copy_file_range copied nothing")
                    n, s_off, d_off = n - done, s_off + done, d_off + done
    except OSError:
        return False  # the caller copies them all through the memory maps
    return True
