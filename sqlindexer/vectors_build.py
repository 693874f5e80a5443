"""Writing a vector cache (vectors.py): its arrays, and every vector read from SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from . import records
from .errors import SearchError
from .progress import Progress
from .vector_store import RowView, new_store
from .vectors import BUILD_PAGE, NO_DATE, PathTable, VectorIndex


class CacheArrays:
    """The arrays of a cache being built: memory-mapped files in its temporary folder, or
    plain arrays when there is no folder."""

    def __init__(self, tmp: Path | None, count: int, dim: int) -> None:
        self.tmp = tmp
        self.dim = dim
        self.vectors: Any = None  # matrix() or share()
        self.slots: np.ndarray | None = None
        self.store_rows = count
        self.ids = self.array("ids", (count,), np.int64)
        self.taken = self.array("taken", (count,), np.int64)
        self.camera = self.array("camera", (count,), np.int32)
        self.offsets = self.array("path_offsets", (count + 1,), np.int64)
        self.offsets[0] = 0
        self.blob: bytes | np.ndarray = b""  # the paths, UTF-8, one after another
        self.id_order: tuple[np.ndarray, np.ndarray] | None = None  # (id_sorted, id_rows) when known

    def matrix(self) -> np.ndarray:
        """A store of its own, row i at slot i."""
        self.vectors = new_store(self.tmp, len(self.ids), self.dim)
        return self.vectors

    def share(self, store: np.ndarray, slots: np.ndarray) -> None:
        """Rows in a store shared with older caches."""
        self.vectors, self.slots, self.store_rows = RowView(store, slots), slots, len(store)

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if self.tmp is None:
            return np.empty(shape, dtype=dtype)
        return np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def finish(self, model: records.ModelVectors, cameras: list[str], version: tuple[str, int] | None,
               stamp: int | None) -> VectorIndex:
        paths = np.frombuffer(self.blob, dtype=np.uint8)
        if self.id_order is None:
            order = np.argsort(self.ids, kind="stable")
            self.id_order = (np.asarray(self.ids)[order], order)
        id_rows = self.array("id_rows", self.ids.shape, np.int64)
        id_rows[:] = self.id_order[1]
        id_sorted = self.array("id_sorted", self.ids.shape, np.int64)
        id_sorted[:] = self.id_order[0]
        if self.tmp is not None:
            np.save(self.tmp / "paths.npy", paths)
            if self.slots is not None:
                np.save(self.tmp / "slots.npy", self.slots)
            else:
                self.vectors.flush()
            for arr in (self.ids, self.taken, self.camera, self.offsets, id_rows, id_sorted):
                arr.flush()
        return VectorIndex(model.model, model.dim, self.vectors, self.ids, self.taken, self.camera, cameras,
                           PathTable(paths, self.offsets), origin="memory", version=version, stamp=stamp,
                           id_sorted=id_sorted, id_rows=id_rows, slots=self.slots, store_rows=self.store_rows)


def normalised_block(rows: list[tuple], dim: int) -> np.ndarray:
    """The vectors of rows (id, path, embedding, ...) as one unit-length float32 block."""
    data = b"".join(row[2] for row in rows)
    if len(data) != len(rows) * dim * 4:
        bad = next(row[1] for row in rows if len(row[2]) != dim * 4)
        raise SearchError(f"the vector of {bad} is not {dim} float32 values; run the index command again")
    block = np.frombuffer(data, dtype="<f4").reshape(len(rows), dim)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    # Stored vectors are normalised already; imported ones are checked here.
    return block / np.where(norms > 0, norms, 1.0)


def read_all(conn: sqlite3.Connection, model: records.ModelVectors, out: CacheArrays, progress: Progress) -> list[str]:
    """Fill out with every vector of the model, read from SQLite; the camera names."""
    count = len(out.ids)
    vectors = out.matrix()
    names: dict[str, int] = {}
    blob = bytearray()
    i = 0
    with progress("reading vectors", count) as tick:
        for rows in records.iter_search_rows(conn, model.model, model.dim, page=BUILD_PAGE):
            k = len(rows)
            if i + k > count:
                raise SearchError("the database changed while its vectors were read")  # not in one snapshot
            encoded = [row[1].encode("utf-8", "surrogateescape") for row in rows]
            vectors[i : i + k] = normalised_block(rows, model.dim)
            out.ids[i : i + k] = [row[0] for row in rows]
            out.taken[i : i + k] = [NO_DATE if row[3] is None else row[3] for row in rows]
            out.camera[i : i + k] = [-1 if row[4] is None else names.setdefault(str(row[4]), len(names))
                                     for row in rows]
            out.offsets[i + 1 : i + k + 1] = len(blob) + np.cumsum([len(e) for e in encoded])
            blob += b"".join(encoded)
            i += k
            tick(k)
    if i != count:
        raise SearchError("the database changed while its vectors were read")
    out.blob = bytes(blob)
    return list(names)
