"""Near-duplicate images: groups of vectors closer than a cosine threshold."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field

import numpy as np

from .config import absolute
from .errors import SearchError
from .progress import Progress, no_progress
from .vectors import VectorIndex, choose_model, load_index

# Rows per side of the blocks the duplicate search multiplies (a 2048 x 2048 float32 block
# of scores is 16 MiB).
DUPLICATE_BLOCK = 2048


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
    if not 0.0 < threshold <= 1.0:
        raise SearchError(f"the threshold must be in (0, 1], got {threshold}")
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


def find_duplicates(conn: sqlite3.Connection, db_path: str | os.PathLike[str], *, threshold: float,
                    model_name: str | None = None, progress: Progress = no_progress) -> tuple[str, int, list[Group]]:
    """(model, images compared, groups) for the database's vectors of one model."""
    model = choose_model(conn, model_name, where=str(absolute(db_path)))
    index = load_index(conn, db_path, model, progress=progress)
    return model.model, len(index), duplicate_groups(index, threshold, progress=progress)
