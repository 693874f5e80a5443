"""Synthetic 768-d vectors for the query benchmarks, with planted near-duplicate pairs.

Two distributions:

  random     i.i.d. Gaussian, normalised: no structure at all. The worst case for any
             approximate index (the nearest neighbours of a query are barely nearer than
             the rest), and what the issue's first figures (59 s, 111 ms) were taken on.
  clustered  a mixture of Gaussians, as real SigLIP vectors cluster (a shoot, a scene, a
             face): n / CLUSTER_SIZE centres, each row its centre plus noise of the same
             norm (cosine ~0.5 inside a cluster, ~0 between clusters), cluster sizes
             drawn from a Zipf-like law.

  hierarchical  photos of events of themes: n / THEME_SIZE theme directions, n / CLUSTER_SIZE
             events around them (cosine ~0.7 to their theme), each row its event plus
             noise (cosine ~0.8 to its event, ~0.65 between two photos of one event,
             ~0.35 across events of one theme, ~0 across themes); event sizes Zipf-like.

In all three, `pairs` rows are replaced by near-copies of other rows at cosine ~0.97 (a resized
or re-encoded photo), and the (original, copy) row numbers are returned.
"""

from __future__ import annotations

import numpy as np

CLUSTER_SIZE = 100
THEME_SIZE = 10_000
COPY_NOISE = 0.25  # |noise| / |row| of a planted copy: cosine 1 / sqrt(1 + 0.25^2) ~ 0.970


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def centres(n: int, dim: int, seed: int, kind: str = "clustered") -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    cs = _unit(rng.standard_normal((max(1, n // CLUSTER_SIZE), dim), dtype=np.float32))
    if kind == "hierarchical":
        themes = _unit(rng.standard_normal((max(1, n // THEME_SIZE), dim), dtype=np.float32))
        cs = _unit(cs + themes[rng.integers(0, len(themes), size=len(cs))])
    return cs


SPREAD = {"clustered": 1.0, "hierarchical": 0.7}  # |noise| / |centre| of a row


def blocks(n: int, dim: int, kind: str, *, seed: int = 0, block: int = 100_000):
    """Yield (start, rows) blocks of n unit vectors of the distribution `kind`."""
    rng = np.random.default_rng(seed)
    cs = centres(n, dim, seed, kind) if kind != "random" else None
    if cs is not None:
        weights = 1.0 / np.arange(1, len(cs) + 1) ** 0.5
        weights /= weights.sum()
    for start in range(0, n, block):
        k = min(block, n - start)
        x = rng.standard_normal((k, dim), dtype=np.float32)
        if cs is not None:
            which = rng.choice(len(cs), size=k, p=weights)
            x = SPREAD[kind] * _unit(x) + cs[which]
        yield start, _unit(x)


def plant_pairs(n: int, pairs: int, *, seed: int = 0) -> np.ndarray:
    """(pairs, 2) distinct row numbers: copy row [:, 1] from row [:, 0]."""
    rng = np.random.default_rng(seed + 7)
    rows = rng.choice(n, size=2 * pairs, replace=False)
    return rows.reshape(pairs, 2)


def vectors(n: int, dim: int, kind: str, *, pairs: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All n rows in memory, with planted pairs: (matrix, pairs)."""
    out = np.empty((n, dim), dtype=np.float32)
    for start, rows in blocks(n, dim, kind, seed=seed):
        out[start : start + len(rows)] = rows
    planted = plant_pairs(n, pairs, seed=seed)
    if pairs:
        rng = np.random.default_rng(seed + 11)
        noise = _unit(rng.standard_normal((pairs, dim), dtype=np.float32)) * COPY_NOISE
        out[planted[:, 1]] = _unit(out[planted[:, 0]] + noise)
    return out, planted


def queries(n_queries: int, dim: int, kind: str, n: int, *, seed: int = 0, query_seed: int = 99) -> np.ndarray:
    """Text-like queries: new points of the distribution of vectors(n, dim, kind, seed=seed),
    not rows of the set."""
    rng = np.random.default_rng(seed + query_seed)
    q = _unit(rng.standard_normal((n_queries, dim), dtype=np.float32))
    if kind != "random":
        cs = centres(n, dim, seed, kind)
        q = _unit(SPREAD[kind] * q + cs[rng.integers(0, len(cs), size=n_queries)])
    return q
