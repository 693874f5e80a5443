"""The float32 rows of a vector cache on disk: vectors.f32, raw little-endian float32, one
row after another, with no header (its length is in the cache's info.json).

A cache built whole holds its rows in its own order (row i at slot i). A cache updated
from an older one shares the older one's file, a hard link, and appends the rows that
changed: its slots.npy says where each of its rows is. Slots are only ever appended,
never rewritten, so every cache that links the file still reads exactly the rows it
wrote, and an update writes what changed, not the whole matrix. Appends to a shared file
hold an exclusive flock on it (two queries may update from the same cache at once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no hard-link sharing, whole copies instead
    fcntl = None  # type: ignore[assignment]

STORE = "vectors.f32"


class RowView:
    """Row i of the cache is store[slots[i]]: what the queries do with a matrix (an index,
    a slice, a list of rows, @ a vector, np.asarray) works on it, by gathering rows."""

    def __init__(self, store: np.ndarray, slots: np.ndarray) -> None:
        self.store = store
        self.slots = slots
        self.shape = (len(slots), store.shape[1])
        self.dtype = store.dtype
        self.ndim = 2

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.store[int(self.slots[key])]
        return np.asarray(self.store[np.asarray(self.slots[key])])

    def __matmul__(self, other: np.ndarray) -> np.ndarray:
        # Every slot once, in file order (dead ones too: fewer than the live ones), then
        # the scores of this cache's rows picked out.
        return (self.store @ other)[self.slots]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = np.asarray(self.store[np.asarray(self.slots)])
        return rows if dtype is None else rows.astype(dtype)


def new_store(folder: Path | None, rows: int, dim: int) -> np.ndarray:
    if folder is None:
        return np.empty((rows, dim), dtype=np.float32)
    return np.memmap(folder / STORE, dtype="<f4", mode="w+", shape=(rows, dim))


def open_store(folder: Path, rows: int, dim: int) -> np.ndarray:
    size = (folder / STORE).stat().st_size
    if size < rows * dim * 4:
        raise ValueError(f"{STORE} holds {size} bytes, not the {rows} rows of {dim} float32 it should")
    if rows == 0:
        return np.empty((0, dim), dtype=np.float32)
    return np.memmap(folder / STORE, dtype="<f4", mode="r", shape=(rows, dim))


def link_and_append(older: Path, folder: Path, rows: np.ndarray, dim: int, *, max_rows: int) -> int | None:
    """Share older's vectors.f32 as folder's and append rows to it; return the slot of
    the first. None (and nothing linked) where the file system has no hard links or the
    file would grow past max_rows (then a whole copy is the better deal)."""
    if fcntl is None:
        return None
    target = folder / STORE
    try:
        os.link(older / STORE, target)
    except OSError:
        return None
    row_bytes = dim * 4
    with open(target, "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            start = -(-os.fstat(f.fileno()).st_size // row_bytes)  # after a torn append, whole rows
            if start + len(rows) > max_rows:
                target.unlink()
                return None
            data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
            offset = start * row_bytes
            view = memoryview(data)
            while view:
                written = os.pwrite(f.fileno(), view, offset)
                view, offset = view[written:], offset + written
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return int(start)
