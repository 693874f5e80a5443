"""Building the approximate index (ann.py) of a VectorIndex, or updating an older one to it.

A build trains k-means on a sample, then assigns every row to its nearest cells (one
matrix product per page, which gives both the cell faiss files the row under and the
DUPLICATE_CELLS cells kept for duplicates) and adds its 8-bit codes. An update opens the
older index and removes from it, by files.id, the rows that are gone or changed since its
record stamp, and adds the changed and new rows: its cost follows the rows changed, plus
one pass over the older index's lists to drop ids (and the writing of the result).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from . import state
from .ann import ADD_PAGE, DUPLICATE_CELLS, TRAIN_PER_CELL, AnnIndex, cell_count, nearest_cells
from .progress import Progress
from .vectors import VectorIndex

log = logging.getLogger(__name__)

# Share of changed rows above which an update costs more than a build.
UPDATE_MAX_SHARE = 0.5


def _new_faiss(dim: int, nlist: int) -> Any:
    import faiss

    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    # Codes of the vectors themselves, not of their offsets from the cell's centre: the
    # vectors are unit length, and a code then decodes without its cell.
    index.by_residual = False
    return index


def _add(faiss_index: Any, centroids: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Add rows with their ids; return their nearest cells."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    cells = nearest_cells(centroids, x, DUPLICATE_CELLS)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assign = np.ascontiguousarray(cells[:, 0], dtype=np.int64)
    faiss_index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    return cells


def build(index: VectorIndex, progress: Progress) -> AnnIndex:
    """A new index of every row of index."""
    n = len(index)
    nlist = cell_count(n)
    faiss_index = _new_faiss(index.dim, nlist)
    rng = np.random.default_rng(0)  # the same vectors give the same index
    sample = np.sort(rng.choice(n, size=min(n, TRAIN_PER_CELL * nlist), replace=False))
    x = np.ascontiguousarray(index.vectors[sample])
    with progress("training cells", None) as tick:
        if nlist == 1:  # one cell, its centre the mean (k-means would warn of too few rows)
            centre = x.mean(axis=0, keepdims=True)
            faiss_index.quantizer.add(centre / max(float(np.linalg.norm(centre)), 1e-12))
        faiss_index.cp.niter = 10
        faiss_index.train(x)  # k-means for the cells, and the range of each dimension for the codes
        tick(1)
    centroids = faiss_index.quantizer.reconstruct_n(0, nlist)
    cells = np.empty((n, DUPLICATE_CELLS), dtype=np.int32)
    with progress("indexing vectors", n) as tick:
        for start in range(0, n, ADD_PAGE):
            stop = min(n, start + ADD_PAGE)
            cells[start:stop] = _add(faiss_index, centroids, index.vectors[start:stop], index.ids[start:stop])
            tick(stop - start)
    id_rows = np.asarray(index.id_rows)
    return AnnIndex(faiss_index, np.asarray(index.id_sorted), cells[id_rows], nlist, origin="built")


def update(conn: sqlite3.Connection, previous: tuple[Path, dict[str, Any]], index: VectorIndex,
           progress: Progress) -> AnnIndex | None:
    """The older index updated to index's rows; None when that would cost more than a
    build, or the older index cannot be read (then the caller builds)."""
    import faiss

    folder, info = previous
    try:
        old_ids = np.load(folder / "ids.npy", allow_pickle=False)
        old_cells = np.load(folder / "cells.npy", allow_pickle=False)
        faiss_index = faiss.read_index(str(folder / "index.faiss"))
        if (not isinstance(faiss_index, faiss.IndexIVFScalarQuantizer) or faiss_index.d != index.dim
                or faiss_index.ntotal != len(old_ids) or old_cells.shape != (len(old_ids), DUPLICATE_CELLS)):
            raise ValueError("its files do not agree")
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("cannot update the approximate index %s (%s); building it again", folder, e)
        return None
    new_ids = np.asarray(index.id_sorted)
    # Changed since the older index: stamped after it. Read now, after the vectors were,
    # this may name rows changed later still; those are taken as the vectors hold them.
    changed = np.asarray(state.ids_changed_since(conn, index.model, int(info["record_stamp"])), dtype=np.int64)
    changed = changed[index.rows_of(changed) >= 0]
    added = np.union1d(np.setdiff1d(new_ids, old_ids, assume_unique=True), changed)
    removed = np.union1d(np.setdiff1d(old_ids, new_ids, assume_unique=True), np.intersect1d(changed, old_ids))
    if len(added) > UPDATE_MAX_SHARE * len(new_ids) or not 0.5 <= faiss_index.nlist / cell_count(len(new_ids)) <= 2:
        return None  # so much has changed that the cells no longer fit the vectors
    with progress("updating the index", len(added) + 1) as tick:
        if len(removed):
            faiss_index.remove_ids(faiss.IDSelectorBatch(len(removed), faiss.swig_ptr(removed)))
        tick(1)
        centroids = faiss_index.quantizer.reconstruct_n(0, faiss_index.nlist)
        rows = np.sort(index.rows_of(added))
        fresh = np.empty((len(rows), DUPLICATE_CELLS), dtype=np.int32)
        for start in range(0, len(rows), ADD_PAGE):
            page = rows[start : start + ADD_PAGE]
            fresh[start : start + len(page)] = _add(faiss_index, centroids, index.vectors[page], index.ids[page])
            tick(len(page))
    cells = np.empty((len(new_ids), DUPLICATE_CELLS), dtype=np.int32)
    kept = np.isin(new_ids, added, invert=True)
    cells[kept] = old_cells[np.searchsorted(old_ids, new_ids[kept])]
    cells[np.searchsorted(new_ids, np.asarray(index.ids)[rows])] = fresh
    if faiss_index.ntotal != len(new_ids):
        log.warning("the updated approximate index holds %d vectors, not %d; building it again",
                    faiss_index.ntotal, len(new_ids))
        return None
    return AnnIndex(faiss_index, new_ids, cells, int(faiss_index.nlist), origin="updated")
