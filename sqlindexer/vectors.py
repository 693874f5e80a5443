"""The vectors of one model, as one matrix the queries read, and its cache on disk.

The vectors of one model are read from SQLite once into a contiguous float32 matrix, in
path order, kept in a cache folder beside the database

    <db>.vectors-<model key>-<state key>/   vectors.f32 [slots.npy] ids.npy taken.npy
                                            camera.npy path_offsets.npy paths.npy
                                            id_sorted.npy id_rows.npy info.json

and memory-mapped (np.load(mmap_mode="r")) by every later query, so a query costs one
matrix-vector product and a partial sort, however many rows the database has. The state
key is a hash of the database's id and change counter (migrations/0002_search.sql: triggers
bump the counter on every change to a vector or to the metadata the filters read) and of the
local time zone, so a change to the database names another folder: a stale cache is never
read, only removed.
A new cache is built from the newest older one of the same database when there is one
(vectors_update.py): the rows stamped after it (migrations/0003_export_stamp.sql) are read
from SQLite and appended to the older cache's vectors.f32, which the new one shares
(vector_store.py), so a re-index that changed 1% of the vectors costs the next query the
changed rows and the small per-row arrays, not a read or a copy of every vector.
Where the folder cannot be written (a read-only folder or mount), or the database predates
the counter, the matrix is built in memory for the one command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import db, kept_folder, records
from .config import absolute, looks_like_path
from .errors import SearchError
from .progress import Progress, no_progress
from .vector_store import RowView, open_store

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
# Rows per fetch while the matrix is built.
BUILD_PAGE = 4096
# A stale temporary cache folder (its builder died) is removed after this long.
STALE_TMP_SECONDS = 3600
NO_DATE = np.iinfo(np.int64).min


# -- which model -----------------------------------------------------------------------
def choose_model(conn: sqlite3.Connection, requested: str | None, *, where: str) -> records.ModelVectors:
    """The model whose vectors to query: the one asked for, else the database's only one.
    (Its vectors are not counted here: that would read the whole index on every query.)"""
    keys = records.vector_model_keys(conn)

    def held() -> str:  # for the error messages only
        return ", ".join(f"{m.model} ({m.count} x {m.dim}-d)" for m in records.vector_models(conn))

    if requested is not None:
        names = {requested}
        if looks_like_path(requested):
            names.add(str(absolute(requested)))
        mine = [key for key in keys if key[0] in names]
        if not mine:
            holds = f"it holds {held()}" if keys else "it holds no vectors at all"
            raise SearchError(f"no vectors of model {requested} in {where}: {holds}")
    else:
        if not keys:
            raise SearchError(f"no indexed images in {where} (no file has been embedded yet)")
        if len({model for model, _ in keys}) > 1:
            raise SearchError(f"{where} holds vectors of several models ({held()}): choose one with --model-name")
        mine = keys
    if len(mine) > 1:
        raise SearchError(f"the vectors of model {mine[0][0]} in {where} have several lengths ({held()}); "
                          "run the index command again to re-embed them")
    return records.ModelVectors(*mine[0])


# -- the matrix ------------------------------------------------------------------------
class PathTable:
    """N paths (sorted, as SQLite's BINARY collation sorts them: by UTF-8 bytes) stored as
    one byte array and N + 1 offsets, so that a cache of a million paths opens without
    decoding any of them."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob = blob
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> bytes:
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes()

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode("utf-8", "surrogateescape")

    def bisect(self, key: bytes) -> int:
        return self.bisect_sorted([key])[0]

    def bisect_sorted(self, keys: list[bytes]) -> list[int]:
        """Where each of keys (ascending) goes among the sorted paths (bisect_left), read
        through plain memoryviews: a numpy scalar per step would cost a cache update more
        than all the rest of it."""
        blob, offsets = memoryview(np.asarray(self.blob)), memoryview(np.asarray(self.offsets))
        found, lo, n = [], 0, len(self)
        for key in keys:
            hi = n
            while lo < hi:
                mid = (lo + hi) // 2
                if blob[offsets[mid] : offsets[mid + 1]].tobytes() < key:
                    lo = mid + 1
                else:
                    hi = mid
            found.append(lo)
        return found

    def find(self, path: str) -> int | None:
        key = path.encode("utf-8", "surrogateescape")
        i = self.bisect(key)
        return i if i < len(self) and self.raw(i) == key else None

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        """Rows [lo, hi) whose path starts with prefix (no UTF-8 string holds a 0xff byte)."""
        key = prefix.encode("utf-8", "surrogateescape")
        lo, hi = self.bisect_sorted([key, key + b"\xff"])
        return lo, hi


@dataclass
class VectorIndex:
    """The vectors of one model, in path order, with what the filters need."""

    model: str
    dim: int
    vectors: np.ndarray | RowView  # (n, dim) float32, L2-normalised rows
    ids: np.ndarray  # (n,) int64: files.id
    taken: np.ndarray  # (n,) int64: local wall-clock seconds (EXIF DateTimeOriginal, else mtime)
    camera: np.ndarray  # (n,) int32: index into cameras, -1 when the file has no EXIF Model
    cameras: list[str]
    paths: PathTable
    origin: str  # "cache" (reused), "built" (cache written now) or "memory" (no cache)
    folder: Path | None = None
    version: tuple[str, int] | None = None  # (database id, change counter) it was read at
    stamp: int | None = None  # the record stamp it was read at; None: unknown
    id_sorted: np.ndarray | None = None  # ids ascending, and the row of each
    id_rows: np.ndarray | None = None
    slots: np.ndarray | None = None  # row -> row of vectors.f32, where it is shared (vector_store.py)
    store_rows: int | None = None  # rows of vectors.f32 this cache may read

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The rows of the given files.id values, -1 for an id the index does not hold."""
        if self.id_sorted is None or self.id_rows is None:
            self.id_rows = np.argsort(self.ids, kind="stable")
            self.id_sorted = np.asarray(self.ids)[self.id_rows]
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.id_sorted):
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.id_sorted, ids), len(self.id_sorted) - 1)
        return np.where(self.id_sorted[pos] == ids, self.id_rows[pos], -1).astype(np.int64)


def _timezone() -> str:
    # The dates of files without EXIF are their mtimes in local time, worked out when the
    # cache is built: another time zone needs another cache.
    return f"{os.environ.get('TZ', '')}/{'/'.join(time.tzname)}"


def cache_folder(db_path: Path, model: records.ModelVectors, version: tuple[str, int]) -> Path:
    model_key = hashlib.sha256(f"{model.model}\n{model.dim}".encode()).hexdigest()[:12]
    state_key = hashlib.sha256(f"{version[0]}\n{version[1]}\n{_timezone()}".encode()).hexdigest()[:12]
    return db_path.with_name(f"{db_path.name}.vectors-{model_key}-{state_key}")


def load_index(
    conn: sqlite3.Connection,
    db_path: str | os.PathLike[str],
    model: records.ModelVectors,
    *,
    progress: Progress = no_progress,
) -> VectorIndex:
    """The model's vectors: from the cache when it is current, else read from SQLite (and
    cached when the folder is writable), from an older cache and the rows changed since
    when there is one."""
    db_path = absolute(db_path)
    # One read transaction: the counter that names the cache and the rows it is built
    # from are the same snapshot, whatever an index run commits meanwhile.
    with db.transaction(conn, immediate=False):
        version = records.vectors_version(conn)
        stamp = records.search_stamp(conn)
        folder = cache_folder(db_path, model, version) if version else None
        if folder is not None:
            index = _open_cache(folder, model, _current(model, version))
            if index is not None:
                return index
        else:
            log.warning("%s predates the vector cache: run the index command once to upgrade it", db_path)
        count = records.count_vectors(conn, model.model, model.dim)
        if not count:
            raise SearchError(f"no vectors of model {model.model} in {db_path}")
        tmp = _make_tmp(folder) if folder is not None else None
        try:
            from .vectors_build import CacheArrays, read_all

            out = CacheArrays(tmp, count, model.dim)
            previous = _previous(folder, model, version) if folder is not None and stamp is not None else None
            cameras = None
            if previous is not None:
                from .vectors_update import copy_forward

                cameras = copy_forward(conn, model, out, previous, progress)
            if cameras is None:
                cameras = read_all(conn, model, out, progress)
            index = out.finish(model, cameras, version, stamp)
            if tmp is None:
                return index
            _write_info(tmp, model, version, stamp, index)
            published = _publish(tmp, folder, model, version)
            return published if published is not None else index
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _make_tmp(folder: Path) -> Path | None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        tmp.mkdir()
    except OSError as e:
        log.warning("cannot write the vector cache beside the database (%s); keeping it in memory", e.strerror or e)
        return None
    return tmp


def _current(model: records.ModelVectors, version: tuple[str, int]) -> Any:
    """Whether an info.json is that of the cache of this model at this state."""
    identity = _identity(model, version)

    def check(info: dict[str, Any]) -> bool:
        return all(info.get(key) == value for key, value in identity.items())

    return check


def _identity(model: records.ModelVectors, version: tuple[str, int]) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "model": model.model, "dim": model.dim, "database_id": version[0],
            "vectors_version": version[1], "timezone": _timezone()}


def _write_info(tmp: Path, model: records.ModelVectors, version: tuple[str, int], stamp: int | None,
                index: VectorIndex) -> None:
    # Written last, and every file fsynced before the folder is renamed into place: a
    # folder under its final name is complete, even after a power loss. (The stamp says
    # which rows an update from this cache must read; a shared store was fsynced as it
    # grew.)
    info = {**_identity(model, version), "count": len(index), "cameras": index.cameras, "record_stamp": stamp,
            "store_rows": index.store_rows, "shared": index.slots is not None}
    (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")
    kept_folder.sync(tmp, skip=("vectors.f32",) if index.slots is not None else ())


def _previous(folder: Path, model: records.ModelVectors, version: tuple[str, int]) -> VectorIndex | None:
    """The newest cache of the same model and database older than this state, to update
    from; None when there is none (or none that is whole and current in its own terms)."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    best: tuple[int, Path, dict[str, Any]] | None = None
    for entry in folder.parent.iterdir():
        if not entry.name.startswith(prefix) or ".tmp-" in entry.name or entry == folder:
            continue
        try:
            info = json.loads((entry / "info.json").read_text(encoding="utf-8"))
            older = (info.get("database_id") == version[0] and isinstance(info.get("record_stamp"), int)
                     and info.get("vectors_version", version[1]) < version[1])
        except (OSError, ValueError, AttributeError):
            continue
        if older and (best is None or info["vectors_version"] > best[0]):
            best = (info["vectors_version"], entry, info)
    if best is None:
        return None
    old_version = (version[0], best[0])
    return _open_cache(best[1], model, _current(model, old_version))


def _publish(tmp: Path, folder: Path, model: records.ModelVectors, version: tuple[str, int]) -> VectorIndex | None:
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another query built the same cache meanwhile (or a broken one is in the way).
        index = _open_cache(folder, model, _current(model, version))
        if index is not None:
            return index
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError as e:
            log.warning("cannot put the vector cache in place (%s); keeping it in memory", e.strerror or e)
            return None
    remove_stale(folder, newer_than(version))
    index = _open_cache(folder, model, _current(model, version))
    if index is not None:
        index.origin = "built"
    return index


def remove_stale(current: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Remove the folders beside current of the same kind and model (its name up to the
    state key), older or broken, and temporaries abandoned by a builder that died; leave
    alone those whose info.json keep() accepts (a newer one, built meanwhile by a query
    that saw a later state). The vector caches and the approximate indexes share it."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    now = time.time()
    for entry in current.parent.iterdir():
        if entry == current or not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        try:
            if ".tmp-" in entry.name:
                if now - entry.stat().st_mtime < STALE_TMP_SECONDS:
                    continue  # another query may be building it
            elif keep(json.loads((entry / "info.json").read_text(encoding="utf-8"))):
                continue
        except (OSError, ValueError, AttributeError):
            if not entry.exists():
                continue  # removed meanwhile by another query
            # else: unreadable, so broken
        shutil.rmtree(entry, ignore_errors=True)


def newer_than(version: tuple[str, int]) -> Callable[[dict[str, Any]], bool]:
    """Whether an info.json is of the same database at a later state than version."""
    return lambda info: info.get("database_id") == version[0] and info.get("vectors_version", -1) > version[1]


def _open_cache(folder: Path, model: records.ModelVectors, check: Any) -> VectorIndex | None:
    """The cached matrix, memory-mapped; None when it is missing or fails check(info)."""
    try:
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        count = info["count"]
        if not check(info):
            return None

        def load(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            arr = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}.npy is {arr.shape} {arr.dtype}")
            return arr

        store = open_store(folder, int(info["store_rows"]), model.dim)
        vectors: np.ndarray | RowView = store
        slots = None
        if info["shared"]:
            slots = load("slots", (count,), np.int64)
            if count and not 0 <= int(slots.min()) <= int(slots.max()) < len(store):
                raise ValueError("slots.npy points outside vectors.f32")
            vectors = RowView(store, slots)
        elif len(store) != count:
            raise ValueError(f"vectors.f32 holds {len(store)} rows, not {count}")
        ids = load("ids", (count,), np.int64)
        taken = load("taken", (count,), np.int64)
        camera = load("camera", (count,), np.int32)
        offsets = load("path_offsets", (count + 1,), np.int64)
        paths = load("paths", (int(offsets[-1]),), np.uint8)
        id_sorted = load("id_sorted", (count,), np.int64)
        id_rows = load("id_rows", (count,), np.int64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the broken vector cache %s: %s", folder, e)
        return None
    return VectorIndex(model.model, model.dim, vectors, ids, taken, camera, list(info["cameras"]),
                       PathTable(paths, offsets), origin="cache", folder=folder,
                       version=(info["database_id"], info["vectors_version"]), stamp=info["record_stamp"],
                       id_sorted=id_sorted, id_rows=id_rows, slots=slots, store_rows=len(store))
