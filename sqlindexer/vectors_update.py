"""A new vector cache from an older one: the rows changed since are read from SQLite and
appended to the older cache's store, which the new one shares (vector_store.py), or, when
that store would hold too many dead rows, the kept rows copied into a new one.

What the older cache holds is the database as it was at its record stamp (every change to
a row's vector, path, status, model or EXIF stamps the row with a later value; a deleted
row is simply gone), so a row whose stamp is not above it holds the same vector, date and
camera today, and one that is above it, or that the older cache does not hold, is read.
Paths come from the path index alone (records.iter_search_keys), in the order the new
cache keeps them.
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

KEY_PAGE = 65_536
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
    ids, stamps, paths = _keys(conn, model, count)
    old = previous.rows_of(ids)
    fresh = (old < 0) | (stamps > previous.stamp)
    if fresh.sum() > UPDATE_MAX_SHARE * count:
        return None
    keep = np.flatnonzero(~fresh)
    names = {name: i for i, name in enumerate(previous.cameras)}
    out.ids[:] = ids
    with progress("updating vectors", count) as tick:
        out.taken[keep] = previous.taken[old[keep]]
        out.camera[keep] = previous.camera[old[keep]]
        changed = np.flatnonzero(fresh)
        rows = records.search_rows_by_id(conn, model.model, model.dim, ids[changed].tolist())
        if len(rows) != len(changed):
            raise SearchError("the database changed while its vectors were read")
        rows.sort(key=lambda row: row[0])
        at = changed[np.argsort(ids[changed], kind="stable")]  # positions in the same (id) order
        block = normalised_block(rows, model.dim) if rows else np.empty((0, model.dim), dtype=np.float32)
        out.taken[at] = [NO_DATE if row[3] is None else row[3] for row in rows]
        out.camera[at] = [-1 if row[4] is None else names.setdefault(str(row[4]), len(names)) for row in rows]
        old_slots = old[keep] if previous.slots is None else np.asarray(previous.slots)[old[keep]]
        _vectors(out, previous, keep, old_slots, at, block)
        tick(count)
    out.blob = "".join(paths).encode("utf-8", "surrogateescape")
    if len(out.blob) == sum(map(len, paths)):  # one byte a character: ASCII, as most paths are
        out.offsets[1:] = np.cumsum(np.fromiter(map(len, paths), dtype=np.int64, count=count))
    else:
        lengths = (len(p.encode("utf-8", "surrogateescape")) for p in paths)
        out.offsets[1:] = np.cumsum(np.fromiter(lengths, dtype=np.int64, count=count))
    return list(names)


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


def _keys(conn: sqlite3.Connection, model: records.ModelVectors, count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ids, stamps and paths of the model's ok rows, in path order."""
    ids = np.empty(count, dtype=np.int64)
    stamps = np.empty(count, dtype=np.int64)
    paths: list[str] = []
    i = 0
    for rows in records.iter_search_keys(conn, model.model, page=KEY_PAGE):
        k = len(rows)
        if i + k > count:
            raise SearchError("the database changed while its vectors were read")
        page_ids, page_paths, page_stamps = zip(*rows)  # columns, in C
        ids[i : i + k] = page_ids
        stamps[i : i + k] = page_stamps
        paths.extend(page_paths)
        i += k
    if i != count:
        raise SearchError("the database changed while its vectors were read")
    return ids, stamps, paths
