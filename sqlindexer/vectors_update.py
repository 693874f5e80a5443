"""A new vector cache from an older one: the rows changed since are read from SQLite, the
others copied from the older cache's memory map.

What the older cache holds is the database as it was at its record stamp (every change to
a row's vector, path, status, model or EXIF stamps the row with a later value; a deleted
row is simply gone), so a row whose stamp is not above it holds the same vector, date and
camera today, and one that is above it, or that the older cache does not hold, is read.
Paths come from the path index alone (state.iter_search_keys), in the order the new
cache keeps them.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING, Any

import numpy as np

from . import state
from .errors import SearchError
from .progress import Progress

if TYPE_CHECKING:
    from .vectors import VectorIndex, _Arrays

# Rows read from SQLite per step (a 65,536 x 768 float32 block is 192 MiB).
COPY_PAGE = 65_536
KEY_PAGE = 65_536


def copy_forward(conn: sqlite3.Connection, model: state.ModelVectors, out: _Arrays, previous: VectorIndex,
                 progress: Progress) -> list[str]:
    """Fill out with the model's rows as they are now, from previous and the changed rows;
    return the camera names (previous's first, so the copied codes keep their meaning)."""
    from .vectors import NO_DATE, normalised_block

    assert previous.stamp is not None
    count = len(out.ids)
    ids, stamps, encoded = _keys(conn, model, count)
    old = previous.rows_of(ids)
    fresh = (old < 0) | (stamps > previous.stamp)
    keep = np.flatnonzero(~fresh)
    names = {name: i for i, name in enumerate(previous.cameras)}
    out.ids[:] = ids
    with progress("updating vectors", count) as tick:
        out.taken[keep] = previous.taken[old[keep]]
        out.camera[keep] = previous.camera[old[keep]]
        # Both sides are in path order: the rows kept are a few long runs, each one copy.
        runs = _runs(old[keep], keep)
        if not _copy_file_runs(previous, out, runs, model.dim * 4):
            for src, dst, k in runs:
                out.vectors[dst : dst + k] = previous.vectors[src : src + k]
        tick(len(keep))
        changed = np.flatnonzero(fresh)
        rows = state.search_rows_by_id(conn, model.model, model.dim, ids[changed].tolist())
        if len(rows) != len(changed):
            raise SearchError("the database changed while its vectors were read")
        rows.sort(key=lambda row: row[0])
        at = changed[np.argsort(ids[changed], kind="stable")]  # positions in the same (id) order
        for start in range(0, len(rows), COPY_PAGE):
            page, dst = rows[start : start + COPY_PAGE], at[start : start + COPY_PAGE]
            out.vectors[dst] = normalised_block(page, model.dim)
            out.taken[dst] = [NO_DATE if row[3] is None else row[3] for row in page]
            out.camera[dst] = [-1 if row[4] is None else names.setdefault(str(row[4]), len(names)) for row in page]
            tick(len(dst))
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=count)
    out.offsets[1:] = np.cumsum(lengths)
    out.blob = b"".join(encoded)
    return list(names)


def _runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(source start, destination start, length) of the runs where both go up by one."""
    if not len(src):
        return []
    cuts = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], cuts])
    lengths = np.diff(np.concatenate([starts, [len(src)]]))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


def _copy_file_runs(previous: VectorIndex, out: _Arrays, runs: list[tuple[int, int, int]], row_bytes: int) -> bool:
    """Copy the runs of rows from the older cache's vectors.npy into the new one inside the
    kernel (copy_file_range: no page of either file mapped, or read into this process);
    False where that cannot be done (no such call, no files, another file system)."""
    if previous.folder is None or out.tmp is None or not hasattr(os, "copy_file_range"):
        return False
    try:
        with open(previous.folder / "vectors.npy", "rb") as src, open(out.tmp / "vectors.npy", "r+b") as dst:
            src_at, dst_at = _data_offset(src), _data_offset(dst)
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


def _data_offset(f: Any) -> int:
    """Where the array data of an open .npy file starts."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(f)
    else:
        np.lib.format.read_array_header_2_0(f)
    return f.tell()


def _keys(conn: sqlite3.Connection, model: state.ModelVectors, count: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """ids, stamps and UTF-8 paths of the model's ok rows, in path order."""
    ids = np.empty(count, dtype=np.int64)
    stamps = np.empty(count, dtype=np.int64)
    encoded: list[bytes] = []
    i = 0
    for rows in state.iter_search_keys(conn, model.model, page=KEY_PAGE):
        k = len(rows)
        if i + k > count:
            raise SearchError("the database changed while its vectors were read")
        ids[i : i + k] = [row[0] for row in rows]
        stamps[i : i + k] = [row[2] for row in rows]
        encoded.extend(row[1].encode("utf-8", "surrogateescape") for row in rows)
        i += k
    if i != count:
        raise SearchError("the database changed while its vectors were read")
    return ids, stamps, encoded
