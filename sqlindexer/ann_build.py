"""Building the approximate index (ann.py) of a VectorIndex, or updating an older one to it.

A build trains k-means on a sample, then assigns every row to its nearest cells (one
matrix product per page, which gives both the cell faiss files the row under and the
DUPLICATE_CELLS cells kept for duplicates) and adds its 8-bit codes.

An update starts from the newest older index. The rows it must no longer answer from its
faiss file are those gone and those changed since its record stamp; the rows it must
answer otherwise are the changed and the new ones. While both together stay under
DELTA_MAX_SHARE of the rows, the faiss file is shared as it is and they are listed beside
it (its cost: the changed rows and the per-row ids and cells); past that a new faiss file
is written, with the old one's rows removed and the others added by id (its cost: one
pass over the file, and writing it). Past UPDATE_MAX_SHARE the cells no longer fit the
vectors, and the index is built again.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import records
from .ann import (
    ADD_PAGE,
    DELTA_MAX_SHARE,
    DUPLICATE_CELLS,
    KMEANS_ROUNDS,
    TRAIN_PER_CELL,
    AnnIndex,
    cell_count,
    nearest_cells,
    read_faiss,
    score_dtype,
)
from .progress import Progress
from .vectors import VectorIndex

log = logging.getLogger(__name__)

# Share of changed rows above which an update costs more than a build.
UPDATE_MAX_SHARE = 0.5
# Rows scored against the centres per step of k-means (a 16,384 x 4,000 bfloat16 block is 125 MiB).
KMEANS_PAGE = 16_384


def _new_faiss(dim: int, nlist: int) -> Any:
    import faiss

    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    # Codes of the vectors themselves, not of their offsets from the cell's centre: the
    # vectors are unit length, and a code then decodes without its cell.
    index.by_residual = False
    return index


def _add(faiss_index: Any, centroids: np.ndarray, vectors: np.ndarray, ids: np.ndarray, *,
         scores: int | None = None) -> np.ndarray:
    """Add rows with their ids; return their nearest cells (scores: as nearest_cells)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    cells = nearest_cells(centroids, x, DUPLICATE_CELLS, scores=scores)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assign = np.ascontiguousarray(cells[:, 0], dtype=np.int64)
    faiss_index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    return cells


def _none(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, dim), np.float32)


def build(index: VectorIndex, progress: Progress) -> AnnIndex:
    """A new index of every row of index."""
    n = len(index)
    nlist = cell_count(n)
    faiss_index = _new_faiss(index.dim, nlist)
    rng = np.random.default_rng(0)  # the same vectors give the same index
    sample = np.sort(rng.choice(n, size=min(n, TRAIN_PER_CELL * nlist), replace=False))
    x = np.ascontiguousarray(index.vectors[sample])
    with progress("training cells", KMEANS_ROUNDS) as tick:
        faiss_index.quantizer.add(train_cells(x, nlist, tick))
        faiss_index.train(x)  # (the cells are given) the range of each dimension for the codes
    centroids = faiss_index.quantizer.reconstruct_n(0, nlist)
    cells = np.empty((n, DUPLICATE_CELLS), dtype=np.int32)
    with progress("indexing vectors", n) as tick:
        for start in range(0, n, ADD_PAGE):
            stop = min(n, start + ADD_PAGE)
            cells[start:stop] = _add(faiss_index, centroids, index.vectors[start:stop], index.ids[start:stop])
            tick(stop - start)
    ids = np.asarray(index.id_sorted)
    return AnnIndex(faiss_index, ids, cells[np.asarray(index.id_rows)], nlist, "built", ids, *_none(index.dim))


def train_cells(x: np.ndarray, nlist: int, tick: Any = lambda n: None) -> np.ndarray:
    """(nlist, dim) unit centres of spherical k-means over the unit rows x: each row goes
    to the centre of its largest cosine, each centre becomes its rows' normalised mean;
    KMEANS_ROUNDS rounds. The scores are taken in torch, in bfloat16 where the CPU has
    it in hardware (ann.score_dtype; docs/performance-search.md), the means in
    float32. An emptied cell restarts from a row drawn at random."""
    if nlist == 1:  # one cell, its centre the mean
        centre = x.mean(axis=0, keepdims=True)
        tick(KMEANS_ROUNDS)
        return centre / max(float(np.linalg.norm(centre)), 1e-12)
    import torch

    rng = np.random.default_rng(1)
    dtype = score_dtype()
    with torch.no_grad():
        x32 = torch.from_numpy(np.require(x, np.float32, ["C", "W"]))
        x16 = x32.to(dtype)
        centres = x32[torch.from_numpy(rng.choice(len(x), size=nlist, replace=False))].clone()
        for _ in range(KMEANS_ROUNDS):
            c16 = centres.to(dtype).T
            nearest = torch.cat([(x16[i : i + KMEANS_PAGE] @ c16).argmax(dim=1)
                                 for i in range(0, len(x), KMEANS_PAGE)])
            sums = torch.zeros_like(centres).index_add_(0, nearest, x32)
            empty = torch.bincount(nearest, minlength=nlist) == 0
            if bool(empty.any()):
                sums[empty] = x32[torch.from_numpy(rng.choice(len(x), size=int(empty.sum()), replace=False))]
            centres = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
            tick(1)
    return centres.numpy()


@dataclass
class _Plan:
    """What an update from an older index has to do."""

    folder: Path
    faiss_index: Any  # the older faiss file, memory-mapped
    base_ids: np.ndarray  # its ids
    removed: np.ndarray  # of those, the ones not to answer now
    extra: np.ndarray  # ids to answer besides it
    cells: np.ndarray  # (n, DUPLICATE_CELLS) of the new rows, -1 where to be worked out


def _plan(conn: sqlite3.Connection, previous: tuple[Path, dict[str, Any]], index: VectorIndex) -> _Plan | None:
    folder, info = previous
    try:
        old_ids = np.load(folder / "ids.npy", allow_pickle=False)
        old_cells = np.load(folder / "cells.npy", allow_pickle=False)
        base_ids = np.load(folder / "base_ids.npy", allow_pickle=False)
        old_removed = np.load(folder / "removed.npy", allow_pickle=False)
        faiss_index = read_faiss(folder / "index.faiss", index.dim, int(info["nlist"]), len(base_ids))
        if old_cells.shape != (len(old_ids), DUPLICATE_CELLS):
            raise ValueError("its files do not agree")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        log.warning("cannot update the approximate index %s (%s); building it again", folder, e)
        return None
    new_ids = np.asarray(index.id_sorted)
    # Changed since the older index: stamped after it. Read now, after the vectors were,
    # this may name rows changed later still; those are taken as the vectors hold them.
    changed = np.asarray(records.ids_changed_since(conn, index.model, int(info["record_stamp"])), dtype=np.int64)
    changed = np.unique(changed[index.rows_of(changed) >= 0])
    removed = np.union1d(np.union1d(old_removed, np.setdiff1d(base_ids, new_ids, assume_unique=True)),
                         np.intersect1d(base_ids, changed, assume_unique=True))
    extra = np.setdiff1d(new_ids, np.setdiff1d(base_ids, removed, assume_unique=True), assume_unique=True)
    cells = np.full((len(new_ids), DUPLICATE_CELLS), -1, dtype=np.int32)
    kept = np.isin(new_ids, old_ids, assume_unique=True) & ~np.isin(new_ids, changed, assume_unique=True)
    cells[kept] = old_cells[np.searchsorted(old_ids, new_ids[kept])]
    return _Plan(folder, faiss_index, base_ids, removed, extra, cells)


def update(conn: sqlite3.Connection, previous: tuple[Path, dict[str, Any]], index: VectorIndex,
           progress: Progress) -> AnnIndex | None:
    """The older index updated to index's rows; None when that would cost more than a
    build, or the older index cannot be read (then the caller builds)."""
    plan = _plan(conn, previous, index)
    if plan is None:
        return None
    n, nlist = len(index), plan.faiss_index.nlist
    if len(plan.extra) > UPDATE_MAX_SHARE * n or not 0.5 <= nlist / cell_count(n) <= 2:
        return None  # so much has changed that the cells no longer fit the vectors
    centroids = plan.faiss_index.quantizer.reconstruct_n(0, nlist)
    todo = np.flatnonzero(plan.cells[:, 0] < 0)
    rows_todo = np.asarray(index.id_rows)[todo]
    for start in range(0, len(todo), ADD_PAGE):
        page = slice(start, start + ADD_PAGE)
        plan.cells[todo[page]] = nearest_cells(centroids, index.vectors[rows_todo[page]], DUPLICATE_CELLS,
                                               scores=len(todo) * nlist)
    new_ids = np.asarray(index.id_sorted)
    if len(plan.removed) + len(plan.extra) <= DELTA_MAX_SHARE * n:
        extra_vectors = np.ascontiguousarray(index.vectors[index.rows_of(plan.extra)], dtype=np.float32)
        return AnnIndex(plan.faiss_index, new_ids, plan.cells, nlist, "delta", plan.base_ids, plan.removed,
                        plan.extra, extra_vectors, base_folder=plan.folder)
    return _rewrite(plan, index, progress)


def _rewrite(plan: _Plan, index: VectorIndex, progress: Progress) -> AnnIndex | None:
    """A new faiss file: the older one without plan.removed, with plan.extra added."""
    import faiss

    faiss_index = read_faiss(plan.folder / "index.faiss", index.dim, plan.faiss_index.nlist, len(plan.base_ids),
                             mmap=False)
    with progress("updating the index", len(plan.extra) + 1) as tick:
        if len(plan.removed):
            faiss_index.remove_ids(faiss.IDSelectorBatch(len(plan.removed), faiss.swig_ptr(plan.removed)))
        tick(1)
        centroids = faiss_index.quantizer.reconstruct_n(0, faiss_index.nlist)
        rows = index.rows_of(plan.extra)
        for start in range(0, len(rows), ADD_PAGE):
            page = rows[start : start + ADD_PAGE]
            _add(faiss_index, centroids, index.vectors[page], index.ids[page], scores=len(rows) * len(centroids))
            tick(len(page))
    new_ids = np.asarray(index.id_sorted)
    if faiss_index.ntotal != len(new_ids):
        log.warning("the updated approximate index holds %d vectors, not %d; building it again",
                    faiss_index.ntotal, len(new_ids))
        return None
    return AnnIndex(faiss_index, new_ids, plan.cells, int(faiss_index.nlist), "updated", new_ids,
                    *_none(index.dim))
