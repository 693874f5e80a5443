"""Near-duplicate images: groups of vectors closer than a cosine threshold.

Exhaustive below DUPLICATES_EXACT_BELOW vectors (or when asked): every pair, blockwise.
Above it the candidate pairs come from the cells of the approximate index (ann.py): each
row is compared with the rows whose nearest cell is one of its DUPLICATE_CELLS nearest,
so the work falls from n^2 / 2 to about DUPLICATE_CELLS * n^2 / cells. The pairs of a
cell are first screened on the vectors projected to PROJECTED dimensions (a random
orthonormal projection, each row then normalised: squared distances are kept to within a
few percent), and only those within SCREEN times the threshold's squared distance are
compared in full. Either way
a pair counts on its exact float32 cosine, and the groups are the connected components
of the pairs found.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import absolute
from .errors import SearchError
from .progress import Progress, no_progress
from .vectors import VectorIndex, choose_model, load_index

# Rows per side of the blocks the duplicate search multiplies (a 2048 x 2048 float32 block
# of scores is 16 MiB).
DUPLICATE_BLOCK = 2048
# Every pair below this many vectors: there all pairs cost about what the cells do, and
# every pair is seen. SQLINDEXER_EXACT_BELOW, when set, overrides it too.
DUPLICATES_EXACT_BELOW = 10_000
PROJECTED = 128
# A pair at exactly the threshold has squared distance 2 (1 - threshold); projected, it
# exceeds twice that with a probability of about 1e-9 at 128 dimensions (chi-squared).
SCREEN = 2.0
# Below this threshold the screen would pass most pairs of a cell: compare them in full.
SCREEN_FROM = 0.75


@dataclass
class Group:
    """Near-identical images: paths in path order, each with its cosine to the first."""

    members: list[tuple[str, float]] = field(default_factory=list)


def duplicate_groups(index: VectorIndex, threshold: float, *, block: int = DUPLICATE_BLOCK,
                     progress: Progress = no_progress) -> list[Group]:
    """Connected components of the pairs with cosine >= threshold, largest first.

    The n x n similarity matrix is never held: it is computed block by block (block x block
    scores at a time, upper triangle only), and each block's pairs are merged into a
    union-find forest at once, so memory stays bounded by the block size and the forest.
    """
    _check(threshold)
    n = len(index)
    parent = np.arange(n, dtype=np.int64)
    vectors = index.vectors
    starts = range(0, n, block)
    with progress("comparing", len(starts)) as tick:
        for i in starts:
            a = np.ascontiguousarray(vectors[i : i + block])
            for j in range(i, n, block):
                s = a @ vectors[j : j + block].T
                if j == i:
                    s[np.tril_indices(len(a), 0, s.shape[1])] = -np.inf  # each pair once, no self-pairs
                x, y = np.nonzero(s >= threshold)
                if len(x):
                    _union(parent, x + i, y + j)
            tick(1)
    return _groups(index, parent)


def cell_duplicate_groups(index: VectorIndex, cells: np.ndarray, threshold: float, *,
                          block: int = DUPLICATE_BLOCK, progress: Progress = no_progress) -> list[Group]:
    """duplicate_groups over the candidate pairs of the cells: cells[r] are row r's nearest
    cells, nearest first; rows r and s are compared when cells[s][0] is among cells[r]."""
    _check(threshold)
    n = len(index)
    parent = np.arange(n, dtype=np.int64)
    nlist = int(cells.max()) + 1 if n else 0
    # For each cell: the rows whose nearest it is (home), and the others that have it
    # among their nearest (near), both in path order.
    home_order = np.argsort(cells[:, 0], kind="stable")
    home_cuts = np.searchsorted(cells[home_order, 0], np.arange(nlist + 1))
    near_cells = cells[:, 1:].ravel()
    near_rows = np.repeat(np.arange(n, dtype=np.int64), cells.shape[1] - 1)
    keep = near_cells != np.repeat(cells[:, 0], cells.shape[1] - 1)  # (a cell repeated when there are few)
    near_cells, near_rows = near_cells[keep], near_rows[keep]
    near_order = np.argsort(near_cells, kind="stable")
    near_cuts = np.searchsorted(near_cells[near_order], np.arange(nlist + 1))
    screened = threshold >= SCREEN_FROM and index.dim > PROJECTED
    vectors = _project(index, progress) if screened else index.vectors
    # Projected rows are compared at the cosine of SCREEN times the threshold's squared
    # distance; every candidate then on its exact cosine.
    level = 1.0 - SCREEN * (1.0 - threshold) if screened else threshold - 1e-6
    with progress("comparing", nlist) as tick:
        for c in range(nlist):
            home = home_order[home_cuts[c] : home_cuts[c + 1]]
            if len(home):
                near = np.unique(near_rows[near_order[near_cuts[c] : near_cuts[c + 1]]])
                x, y = _pairs_in_cell(vectors, home, near, level, block)
                if len(x):  # each candidate on its exact cosine, as duplicate_groups has it
                    exact = np.einsum("ij,ij->i", np.asarray(index.vectors[x]), np.asarray(index.vectors[y]))
                    x, y = x[exact >= threshold], y[exact >= threshold]
                if len(x):
                    _union(parent, x, y)
            tick(1)
    return _groups(index, parent)


def _project(index: VectorIndex, progress: Progress) -> np.ndarray:
    """Every row projected to PROJECTED dimensions and normalised."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((index.dim, PROJECTED)))[0].astype(np.float32)
    out = np.empty((len(index), PROJECTED), dtype=np.float32)
    with progress("projecting", len(index)) as tick:
        for start in range(0, len(index), 65_536):
            stop = min(len(index), start + 65_536)
            block = np.asarray(index.vectors[start:stop]) @ basis
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            out[start:stop] = block / np.where(norms > 0, norms, 1.0)
            tick(stop - start)
    return out


def _pairs_in_cell(vectors: Any, home: np.ndarray, near: np.ndarray, level: float,
                   block: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (rows) among home, and between home and near, at cosine level or above."""
    a_all = np.asarray(vectors[home])
    b_all = np.asarray(vectors[near]) if len(near) else None
    xs, ys = [], []
    for i in range(0, len(home), block):
        a = a_all[i : i + block]
        for j in range(i, len(home), block):
            s = a @ a_all[j : j + block].T
            if j == i:
                s[np.tril_indices(len(a), 0, s.shape[1])] = -np.inf  # each pair once, no self-pairs
            x, y = np.nonzero(s >= level)
            xs.append(home[x + i])
            ys.append(home[y + j])
        if b_all is not None:
            for j in range(0, len(near), block):
                x, y = np.nonzero(a @ b_all[j : j + block].T >= level)
                xs.append(home[x + i])
                ys.append(near[y + j])
    if not xs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def _check(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise SearchError(f"the threshold must be in (0, 1], got {threshold}")


def _groups(index: VectorIndex, parent: np.ndarray) -> list[Group]:
    n = len(index)
    vectors = index.vectors
    roots = _roots(parent, np.arange(n, dtype=np.int64))
    grouped = np.flatnonzero(np.bincount(roots, minlength=n)[roots] >= 2)  # rows in a group of 2 or more
    order = grouped[np.argsort(roots[grouped], kind="stable")]  # one group's rows together, in path order
    cuts = np.flatnonzero(np.diff(roots[order])) + 1
    groups = []
    for members in np.split(order, cuts) if len(order) else []:
        sims = vectors[members] @ np.asarray(vectors[members[0]])
        groups.append(Group([(index.paths[int(r)], float(s)) for r, s in zip(members, sims)]))
    groups.sort(key=lambda g: (-len(g.members), g.members[0][0]))
    return groups


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of x in the forest, compressing the paths walked."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            break
        r = up
    parent[x] = r
    return r


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the trees of each pair (a[k], b[k]). Every link points to a smaller row, so the
    forest has no cycle; pairs whose link lost to another pair's are retried."""
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


@dataclass
class Duplicates:
    """What find_duplicates found."""

    model: str
    compared: int  # images of the model
    groups: list[Group]
    approximate: bool  # candidate pairs from the approximate index's cells, not every pair


def find_duplicates(conn: sqlite3.Connection, db_path: str | os.PathLike[str], *, threshold: float,
                    model_name: str | None = None, progress: Progress = no_progress,
                    exhaustive: bool = False) -> Duplicates:
    """The near-duplicate groups of the database's vectors of one model."""
    _check(threshold)
    model = choose_model(conn, model_name, where=str(absolute(db_path)))
    index = load_index(conn, db_path, model, progress=progress)
    if not exhaustive and len(index) >= exact_below():
        from .ann import load_ann

        ann = load_ann(conn, index, need_faiss=False, progress=progress)
        if ann is not None:
            groups = cell_duplicate_groups(index, ann.cells_by_row(index), threshold, progress=progress)
            return Duplicates(model.model, len(index), groups, approximate=True)
    return Duplicates(model.model, len(index), duplicate_groups(index, threshold, progress=progress),
                      approximate=False)


def exact_below() -> int:
    return DUPLICATES_EXACT_BELOW if os.environ.get("SQLINDEXER_EXACT_BELOW") is None else _ann_exact_below()


def _ann_exact_below() -> int:
    from .ann import exact_below as ann_exact_below

    return ann_exact_below()
