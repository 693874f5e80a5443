"""Approximate nearest neighbours over the vectors of one model: an inverted-file index with
8-bit codes (faiss IndexIVFScalarQuantizer), kept beside the database like the vector cache.

    <db>.ann-<model key>-<state key>/   index.faiss base_ids.npy ids.npy cells.npy
                                        removed.npy extra_ids.npy extra_vectors.npy info.json

The state key is the vector cache's (vectors.py): the index of another state of the
database is never read, only updated from or removed. The vectors are split into cells
(k-means on a sample); a query scans the codes of the PROBES cells nearest to it and asks
for at least CANDIDATES rows, which search.py then re-scores exactly against the float32
matrix, so every printed score is a true cosine and only the choice of candidates is
approximate. cells.npy holds each row's DUPLICATE_CELLS nearest cells, from which
duplicates.py takes its candidate pairs. The codes take dim bytes a vector (a quarter of
the float32 matrix), in memory or memory-mapped.

A new state of the database updates the newest older index instead of building it again
(ann_build.py): the faiss file and its ids (base_ids.npy) are shared with it (hard links,
never written again), the ids of the rows gone or changed since are listed in removed.npy
and dropped from its answers, and the changed and new rows (extra_*.npy) are scored
exactly at every query. When those grow past DELTA_MAX_SHARE of the rows, the update
writes a new faiss file instead, the rows removed and added by id. An index that is
damaged, of another database or of another state is rebuilt, never trusted. Below EXACT_BELOW vectors
there is no index: an exhaustive query is as fast (docs/performance-search.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import cpu, kept_folder
from .progress import Progress, no_progress
from .vectors import VectorIndex, newer_than, remove_stale

log = logging.getLogger(__name__)

ANN_FORMAT = 2
# Exhaustive search below this many vectors: there a matrix-vector product costs no more
# than an approximate query, and no index has to be built. SQLINDEXER_EXACT_BELOW
# overrides it (the tests and the benchmark force the index on small data with it).
EXACT_BELOW = 50_000
# Cells scanned by a query (of about 4,000 at 1,000,000 rows: 6%), and the fewest rows
# it re-scores exactly.
PROBES = 256
CANDIDATES = 200
CANDIDATES_PER_HIT = 5
# Rows removed from, or scored beside, a shared faiss file past which an update writes a
# new one (those beside it cost every query a matrix-vector product over them).
DELTA_MAX_SHARE = 0.03
# Nearest cells kept per row: a near-duplicate pair is a candidate when one's nearest cell
# is among the other's.
DUPLICATE_CELLS = 4
# Cells per square root of the row count. sqrt(n) balances a query's cost between the
# cells and the codes it scans; more, smaller cells follow the clusters of the vectors
# more closely (fewer of them share a cell), which the recall needs when there are many
# small clusters, and cost the build more k-means work (docs/performance-search.md).
CELLS_PER_ROOT = 4
# k-means trains on this many sampled rows per cell, for this many rounds.
TRAIN_PER_CELL = 32
KMEANS_ROUNDS = 10
# Row x cell scores from which nearest_cells works in torch (bfloat16 where in hardware),
# and, where torch is not loaded yet, from which its faster products pay for loading it
# (about a second, once a process): an update's few changed rows are scored in faiss.
BFLOAT16_FROM = 1 << 22
TORCH_LOAD_FROM = 1 << 28
# Rows assigned to their cells per step (a 16,384 x 1,000 float32 block of scores is 62 MiB).
ADD_PAGE = 16_384


def exact_below() -> int:
    value = os.environ.get("SQLINDEXER_EXACT_BELOW")
    try:
        return EXACT_BELOW if value is None else max(0, int(value))
    except ValueError:
        log.warning("ignoring SQLINDEXER_EXACT_BELOW=%r: not a whole number", value)
        return EXACT_BELOW


def cell_count(n: int) -> int:
    """About CELLS_PER_ROOT * sqrt(n) cells, with enough rows for k-means to train each."""
    return int(max(1, min(round(CELLS_PER_ROOT * np.sqrt(n)), n // 39)))


@dataclass
class AnnIndex:
    """The approximate index of one VectorIndex (same rows, same state)."""

    faiss_index: Any  # faiss.IndexIVFScalarQuantizer over files.id, or None (duplicates only)
    ids: np.ndarray  # (n,) int64, ascending: the ids it holds
    cells: np.ndarray  # (n, DUPLICATE_CELLS) int32: each id's nearest cells, nearest first
    nlist: int
    origin: str  # "cache", "built", "updated" (a new faiss file) or "delta" (a shared one)
    base_ids: np.ndarray  # ids in the faiss file, ascending
    removed: np.ndarray  # ids in the faiss file not to answer (gone, or changed since), ascending
    extra_ids: np.ndarray  # ids not answered by the faiss file, ascending
    extra_vectors: np.ndarray  # (len(extra_ids), dim) float32, their vectors
    base_folder: Path | None = None  # where the faiss file is shared from

    def candidates(self, index: VectorIndex, query: np.ndarray, k: int, rows: np.ndarray | None) -> np.ndarray:
        """Rows (sorted) among which the k best for the unit vector query are, most likely;
        only those of rows when given."""
        import faiss

        want = max(CANDIDATES, CANDIDATES_PER_HIT * k)
        params = faiss.SearchParametersIVF()
        params.nprobe = min(self.nlist, PROBES)
        if rows is not None:
            # A filter that passes a share f of the rows leaves f of each cell: scan 1/f
            # times the cells to see as many candidates.
            params.nprobe = min(self.nlist, int(np.ceil(PROBES * len(index) / max(1, len(rows)))))
            wanted = np.zeros(int(self.ids[-1]) + 1, dtype=bool)
            wanted[np.asarray(index.ids)[rows]] = True
            bitmap = np.packbits(wanted, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # (its size in bytes)
        # One query at a time: its cells are shared among the threads (faiss's default
        # shares out the queries, so one query kept one core busy and the others idle).
        self.faiss_index.parallel_mode = 1
        _, found = self.faiss_index.search(query.reshape(1, -1).astype(np.float32), want, params=params)
        found = found[0][found[0] >= 0]
        if len(self.removed):
            found = found[~_member(found, self.removed)]
        if len(self.extra_ids):
            s = np.asarray(self.extra_vectors) @ query
            if rows is not None:
                s[~wanted[self.extra_ids]] = -np.inf  # (the extra ids are among self.ids)
            best = np.argpartition(-s, min(want, len(s)) - 1)[:want] if want < len(s) else np.arange(len(s))
            found = np.concatenate([found, self.extra_ids[best[np.isfinite(s[best])]]])
        got = index.rows_of(found)
        return np.unique(got[got >= 0])

    def cells_by_row(self, index: VectorIndex) -> np.ndarray:
        """cells in the row order of index."""
        out = np.empty_like(self.cells)
        out[np.asarray(index.id_rows)] = self.cells
        return out


def _member(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def ann_folder(index: VectorIndex) -> Path:
    assert index.folder is not None
    return index.folder.with_name(index.folder.name.replace(".vectors-", ".ann-", 1))


def load_ann(conn: sqlite3.Connection, index: VectorIndex, *, need_faiss: bool = True,
             progress: Progress = no_progress) -> AnnIndex | None:
    """The approximate index of index: opened when current, else updated from an older one
    or built, and kept beside the database; None where the vectors have no cache folder
    (then nothing could keep the index, and building it for one query costs more than
    an exhaustive one)."""
    if index.folder is None or index.version is None:
        return None
    if need_faiss and not _have_faiss():
        return None
    folder = ann_folder(index)
    ann = _open(folder, index, need_faiss=need_faiss)
    if ann is not None:
        return ann
    if not need_faiss and not _have_faiss():  # (duplicates only imports it to build)
        return None
    if folder.exists():
        log.warning("rebuilding the approximate index %s: it is not the index of these vectors", folder)
        shutil.rmtree(folder, ignore_errors=True)
    from .ann_build import build, update

    previous = _previous(folder, index)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        tmp.mkdir()
    except OSError as e:
        log.warning("cannot write the approximate index beside the database (%s); searching exhaustively",
                    e.strerror or e)
        return None
    try:
        made = None
        if previous is not None and index.stamp is not None:
            made = update(conn, previous, index, progress)
        if made is None:
            made = build(index, progress)
        _save(tmp, index, made)
        return _publish(tmp, folder, index, made, need_faiss=need_faiss)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401 - a dependency; an install without it still answers, exhaustively
    except ImportError as e:
        log.warning("no approximate index (%s): searching exhaustively", e)
        return False
    return True


def _info(index: VectorIndex, nlist: int, faiss_bytes: int, base: int, removed: int,
          extra: int) -> dict[str, Any]:
    assert index.version is not None
    return {"format": ANN_FORMAT, "model": index.model, "dim": index.dim, "database_id": index.version[0],
            "vectors_version": index.version[1], "record_stamp": index.stamp, "count": len(index),
            "nlist": nlist, "cells": DUPLICATE_CELLS, "faiss_bytes": faiss_bytes, "base_count": base,
            "removed": removed, "extra": extra}


_SHARED = ("index.faiss", "base_ids.npy")  # never written again once written


def _save(tmp: Path, index: VectorIndex, made: AnnIndex) -> None:
    import faiss

    linked = made.base_folder is not None and _link(made.base_folder, tmp)
    if not linked:
        faiss.write_index(made.faiss_index, str(tmp / "index.faiss"))
        np.save(tmp / "base_ids.npy", made.base_ids)
    for name in ("ids", "cells", "removed", "extra_ids", "extra_vectors"):
        np.save(tmp / f"{name}.npy", np.asarray(getattr(made, name)))
    info = _info(index, made.nlist, (tmp / "index.faiss").stat().st_size, len(made.base_ids), len(made.removed),
                 len(made.extra_ids))
    (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")
    # Whole before it is renamed into place, even after a power loss (the shared files,
    # linked, were synced when they were written).
    kept_folder.sync(tmp, skip=_SHARED if linked else ())


def _link(base: Path, tmp: Path) -> bool:
    try:
        for name in _SHARED:
            os.link(base / name, tmp / name)
    except OSError:
        for name in _SHARED:
            (tmp / name).unlink(missing_ok=True)
        return False
    return True


def _publish(tmp: Path, folder: Path, index: VectorIndex, made: AnnIndex, *, need_faiss: bool) -> AnnIndex:
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another query published the same index meanwhile: use it (or keep ours in memory).
        other = _open(folder, index, need_faiss=need_faiss)
        return other if other is not None else made
    assert index.version is not None
    remove_stale(folder, newer_than(index.version))
    return made


def _open(folder: Path, index: VectorIndex, *, need_faiss: bool) -> AnnIndex | None:
    """The index in folder when it is whole and the index of exactly these vectors."""
    try:
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        if info != _info(index, info["nlist"], info["faiss_bytes"], info["base_count"], info["removed"],
                         info["extra"]):
            raise ValueError("it is the index of another database or state")
        n, nlist = len(index), int(info["nlist"])

        def load(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            arr = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}.npy is {arr.shape} {arr.dtype}")
            return arr

        ids = load("ids", (n,), np.int64)
        if not np.array_equal(ids, index.id_sorted):
            raise ValueError("its ids are not those of the vectors")
        cells = load("cells", (n, DUPLICATE_CELLS), np.int32)
        base_ids = load("base_ids", (info["base_count"],), np.int64)
        removed = load("removed", (info["removed"],), np.int64)
        extra_ids = load("extra_ids", (info["extra"],), np.int64)
        extra_vectors = load("extra_vectors", (info["extra"], index.dim), np.float32)
        if info["base_count"] - info["removed"] + info["extra"] != n:
            raise ValueError("its parts do not add up to the vectors")
        if (folder / "index.faiss").stat().st_size != info["faiss_bytes"]:
            raise ValueError("index.faiss is not the size it was written at")
        faiss_index = read_faiss(folder / "index.faiss", index.dim, nlist, info["base_count"]) if need_faiss \
            else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        if folder.exists():
            log.warning("ignoring the approximate index %s: %s", folder, e)
        return None
    return AnnIndex(faiss_index, ids, cells, nlist, "cache", base_ids, removed, extra_ids, extra_vectors,
                    base_folder=folder)


def read_faiss(path: Path, dim: int, nlist: int | None, count: int, *, mmap: bool = True) -> Any:
    """The faiss file at path, checked to be an index of count dim-d vectors."""
    import faiss

    # Memory-mapped: a query reads the codes of the cells it scans, not the whole file. The
    # in-place mapping (IFC, faiss >= 1.10) scans the lists where they lie, as from memory;
    # the older one is slower to scan (docs/performance-search.md).
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    got = faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    if not isinstance(got, faiss.IndexIVFScalarQuantizer) or got.d != dim or got.ntotal != count \
            or (nlist is not None and got.nlist != nlist):
        raise ValueError(f"{path.name} is not the index it should be")
    return got



def _previous(folder: Path, index: VectorIndex) -> tuple[Path, dict[str, Any]] | None:
    """The newest index of an older state of the same database and model (its folder and
    info), to update from."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    assert index.version is not None
    best: tuple[Path, dict[str, Any]] | None = None
    for entry in folder.parent.iterdir():
        if not entry.name.startswith(prefix) or ".tmp-" in entry.name or entry == folder:
            continue
        try:
            info = json.loads((entry / "info.json").read_text(encoding="utf-8"))
            fits = (info.get("format") == ANN_FORMAT and info.get("database_id") == index.version[0]
                    and info.get("model") == index.model and info.get("dim") == index.dim
                    and info.get("cells") == DUPLICATE_CELLS and isinstance(info.get("record_stamp"), int)
                    and info.get("vectors_version", index.version[1]) < index.version[1])
        except (OSError, ValueError, AttributeError):
            continue
        if fits and (best is None or info["vectors_version"] > best[1]["vectors_version"]):
            best = (entry, info)
    return best


def score_dtype() -> Any:
    """The torch dtype for the build's large products: bfloat16 where the CPU multiplies it
    in hardware, where it pays, else float32; decided as for the model (cpu.choose_dtype)."""
    import torch

    native, _ = cpu.choose_dtype(cpu.features())
    return torch.bfloat16 if native == "bfloat16" else torch.float32


def nearest_cells(centroids: np.ndarray, block: np.ndarray, m: int, *, scores: int | None = None) -> np.ndarray:
    """(len(block), m) int32: the m cells nearest each row, nearest first. A large block is
    scored in torch, in bfloat16 where the CPU has it in hardware (score_dtype): cells
    whose cosines differ by less than its rounding (~0.001) may come in either order.
    scores: the row x cell scores the caller asks for in all, over its blocks (default
    this block's), which decides whether loading torch pays."""
    x = np.asarray(block, dtype=np.float32)
    m = min(m, len(centroids))
    total = len(x) * len(centroids) if scores is None else scores
    in_torch = total >= BFLOAT16_FROM and ("torch" in sys.modules or total >= TORCH_LOAD_FROM)
    if in_torch and m < len(centroids):
        import torch

        dtype = score_dtype()
        with torch.no_grad():
            # (a writable copy where the rows are a read-only map: torch warns of those)
            s16 = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(dtype) @ \
                torch.from_numpy(np.require(centroids, np.float32, ["C", "W"])).to(dtype).T
            out = s16.topk(m, dim=1).indices.numpy().astype(np.int32)  # (sorted, best first)
    else:
        import faiss

        # Exact float32 products and a heap of m per row: no rows x cells block of scores
        # to partition, which costs numpy more than the product.
        _, top = faiss.knn(np.ascontiguousarray(x), np.ascontiguousarray(centroids, dtype=np.float32), m,
                           metric=faiss.METRIC_INNER_PRODUCT)
        out = top.astype(np.int32)
    if out.shape[1] < DUPLICATE_CELLS:  # fewer cells than kept: repeat the nearest
        out = np.concatenate([out, np.repeat(out[:, :1], DUPLICATE_CELLS - out.shape[1], axis=1)], axis=1)
    return out

