"""Query the working database: images like a text, images like an image, near-duplicates,
and a report of what the database holds.

Core code: no Click, no printing, and no torch unless a query has to be embedded (that
goes through embed.Embedder, imported late). The database is only ever opened read-only.

The vectors of one model are read from SQLite once into a contiguous float32 matrix, in
path order, kept in a cache folder beside the database

    <db>.vectors-<model key>-<state key>/   vectors.npy ids.npy taken.npy camera.npy
                                            path_offsets.npy paths.npy info.json

and memory-mapped (np.load(mmap_mode="r")) by every later query, so a query costs one
matrix-vector product and a partial sort, however many rows the database has. The state
key is a hash of the database's id and change counter (migrations/0002_search.sql: triggers
bump the counter on every change to a vector or to the metadata the filters read) and of the
local time zone, so a change to the database names another folder: a stale cache is never
read, only removed.
Where the folder cannot be written (a read-only folder or mount), or the database predates
the counter, the matrix is built in memory for the one command.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np

from . import db, state
from .config import absolute
from .errors import DatabaseError, IndexerError

if TYPE_CHECKING:
    from .embed import Embedder

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Rows per fetch while the matrix is built, and rows per side of the blocks the duplicate
# search multiplies (a 2048 x 2048 float32 block of scores is 16 MiB).
BUILD_PAGE = 4096
DUPLICATE_BLOCK = 2048
# A stale temporary cache folder (its builder died) is removed after this long.
STALE_TMP_SECONDS = 3600
NO_DATE = np.iinfo(np.int64).min

Tick = Callable[[int], None]
Progress = Callable[[str, "int | None"], ContextManager[Tick]]


@contextlib.contextmanager
def no_progress(desc: str, total: int | None) -> Iterator[Tick]:
    yield lambda n: None


class SearchError(IndexerError):
    """A query cannot be answered: no database, no vectors of the model, a bad query image."""


# -- opening the database --------------------------------------------------------------
def open_database(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open an existing working database read-only; never creates or migrates one."""
    p = absolute(path)
    if not p.exists():
        raise SearchError(f"working database {p} does not exist (index a folder first, or pass --db)")
    if p.is_dir():
        raise SearchError(f"working database {p} is a directory")
    try:
        conn = db.connect(p, readonly=True)
    except DatabaseError as e:
        if not _wal_needs_shm(p, e):
            raise
        conn = _connect_immutable(p)
    try:
        if not state.has_files_table(conn):
            raise SearchError(f"{p} is not an image-indexer database (it has no files table)")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DatabaseError(f"cannot read working database {p}: {e}") from None
    except SearchError:
        conn.close()
        raise
    return conn


def _wal_needs_shm(path: Path, e: DatabaseError) -> bool:
    # A read-only connection to a WAL database needs the -shm file; when it is missing and
    # cannot be created (a folder we may not write to, a read-only mount), SQLite refuses
    # with SQLITE_READONLY.
    cause = e.__cause__
    if not isinstance(cause, sqlite3.OperationalError):
        return False
    name = getattr(cause, "sqlite_errorname", "")
    return name.startswith("SQLITE_READONLY") or "readonly" in str(cause)


def _connect_immutable(path: Path) -> sqlite3.Connection:
    """The fallback for a WAL database whose -shm cannot be created: with no -wal file
    either, every committed transaction is in the main file (the last writer checkpointed
    it when it closed), which can then be read as immutable, without the -shm."""
    for suffix in ("-wal", "-journal"):  # (a rollback journal would need undoing first)
        log_file = path.with_name(path.name + suffix)
        if log_file.exists() and log_file.stat().st_size > 0:
            raise SearchError(
                f"cannot read working database {path}: {log_file.name} holds transactions not yet in the "
                f"database, and SQLite cannot create the -shm file it needs to read them in {path.parent}; "
                "let the running index finish, or run this with write access to that folder"
            )
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None)
        conn.row_factory = sqlite3.Row
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"cannot open working database {path}: {e}") from None
    if version > db.schema_version():
        conn.close()
        raise DatabaseError(f"working database {path} has schema version {version}, this image-indexer knows "
                            f"up to {db.schema_version()}: upgrade image-indexer")
    log.debug("%s opened as immutable: its folder is not writable", path)
    return conn


# -- which model -----------------------------------------------------------------------
def choose_model(conn: sqlite3.Connection, requested: str | None, *, where: str) -> state.ModelVectors:
    """The model whose vectors to query: the one asked for, else the database's only one.
    (Its vectors are not counted here: that would read the whole index on every query.)"""
    keys = state.vector_model_keys(conn)

    def held() -> str:  # for the error messages only
        return ", ".join(f"{m.model} ({m.count} x {m.dim}-d)" for m in state.vector_models(conn))

    if requested is not None:
        names = {requested}
        if requested.startswith(("/", "./", "../", "~")) or requested in (".", ".."):
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
    return state.ModelVectors(*mine[0])


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
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.raw(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def find(self, path: str) -> int | None:
        key = path.encode("utf-8", "surrogateescape")
        i = self.bisect(key)
        return i if i < len(self) and self.raw(i) == key else None

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        """Rows [lo, hi) whose path starts with prefix (no UTF-8 string holds a 0xff byte)."""
        key = prefix.encode("utf-8", "surrogateescape")
        return self.bisect(key), self.bisect(key + b"\xff")


@dataclass
class VectorIndex:
    """The vectors of one model, in path order, with what the filters need."""

    model: str
    dim: int
    vectors: np.ndarray  # (n, dim) float32, L2-normalised rows
    ids: np.ndarray  # (n,) int64: files.id
    taken: np.ndarray  # (n,) int64: local wall-clock seconds (EXIF DateTimeOriginal, else mtime)
    camera: np.ndarray  # (n,) int32: index into cameras, -1 when the file has no EXIF Model
    cameras: list[str]
    paths: PathTable
    origin: str  # "cache" (reused), "built" (cache written now) or "memory" (no cache)
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _timezone() -> str:
    # The dates of files without EXIF are their mtimes in local time, worked out when the
    # cache is built: another time zone needs another cache.
    return f"{os.environ.get('TZ', '')}/{'/'.join(time.tzname)}"


def cache_folder(db_path: Path, model: state.ModelVectors, version: tuple[str, int]) -> Path:
    model_key = hashlib.sha256(f"{model.model}\n{model.dim}".encode()).hexdigest()[:12]
    state_key = hashlib.sha256(f"{version[0]}\n{version[1]}\n{_timezone()}".encode()).hexdigest()[:12]
    return db_path.with_name(f"{db_path.name}.vectors-{model_key}-{state_key}")


def load_index(
    conn: sqlite3.Connection,
    db_path: str | os.PathLike[str],
    model: state.ModelVectors,
    *,
    progress: Progress = no_progress,
) -> VectorIndex:
    """The model's vectors: from the cache when it is current, else read from SQLite (and
    cached when the folder is writable)."""
    db_path = absolute(db_path)
    # One read transaction: the counter that names the cache and the rows it is built
    # from are the same snapshot, whatever an index run commits meanwhile.
    with db.transaction(conn, immediate=False):
        version = state.vectors_version(conn)
        folder = cache_folder(db_path, model, version) if version else None
        if folder is not None:
            index = _open_cache(folder, model, version)
            if index is not None:
                return index
        else:
            log.warning("%s predates the vector cache: run the index command once to upgrade it", db_path)
        count = state.count_vectors(conn, model.model, model.dim)
        if not count:
            raise SearchError(f"no vectors of model {model.model} in {db_path}")
        tmp = _make_tmp(folder) if folder is not None else None
        try:
            index = _build(conn, model, count, tmp, progress)
            if tmp is None:
                return index
            _write_info(tmp, model, version, index)
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


def _build(conn: sqlite3.Connection, model: state.ModelVectors, count: int, tmp: Path | None,
           progress: Progress) -> VectorIndex:
    dim = model.dim

    def array(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if tmp is None:
            return np.empty(shape, dtype=dtype)
        return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    vectors = array("vectors", (count, dim), np.float32)
    ids = array("ids", (count,), np.int64)
    taken = array("taken", (count,), np.int64)
    camera = array("camera", (count,), np.int32)
    offsets = array("path_offsets", (count + 1,), np.int64)
    offsets[0] = 0
    names: dict[str, int] = {}
    blob = bytearray()
    i = 0
    with progress("reading vectors", count) as tick:
        for rows in state.iter_search_rows(conn, model.model, dim, page=BUILD_PAGE):
            k = len(rows)
            if i + k > count:
                raise SearchError("the database changed while its vectors were read")  # not in one snapshot
            encoded = [row[1].encode("utf-8", "surrogateescape") for row in rows]
            data = b"".join(row[2] for row in rows)
            if len(data) != k * dim * 4:
                bad = next(row[1] for row in rows if len(row[2]) != dim * 4)
                raise SearchError(f"the vector of {bad} is not {dim} float32 values; run the index command again")
            block = np.frombuffer(data, dtype="<f4").reshape(k, dim)
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            # Stored vectors are normalised already; imported ones are checked here.
            vectors[i : i + k] = block / np.where(norms > 0, norms, 1.0)
            ids[i : i + k] = [row[0] for row in rows]
            taken[i : i + k] = [NO_DATE if row[3] is None else row[3] for row in rows]
            camera[i : i + k] = [-1 if row[4] is None else names.setdefault(str(row[4]), len(names)) for row in rows]
            offsets[i + 1 : i + k + 1] = len(blob) + np.cumsum([len(e) for e in encoded])
            blob += b"".join(encoded)
            i += k
            tick(k)
    if i != count:
        raise SearchError("the database changed while its vectors were read")
    paths = np.frombuffer(bytes(blob), dtype=np.uint8)
    if tmp is not None:
        np.save(tmp / "paths.npy", paths)
        for arr in (vectors, ids, taken, camera, offsets):
            arr.flush()
    return VectorIndex(model.model, dim, vectors, ids, taken, camera, list(names), PathTable(paths, offsets),
                       origin="memory")


def _info(model: state.ModelVectors, version: tuple[str, int], count: int, cameras: list[str]) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "model": model.model, "dim": model.dim, "database_id": version[0],
            "vectors_version": version[1], "timezone": _timezone(), "count": count, "cameras": cameras}


def _write_info(tmp: Path, model: state.ModelVectors, version: tuple[str, int], index: VectorIndex) -> None:
    # Written last, and every file fsynced before the folder is renamed into place: a
    # folder under its final name is complete, even after a power loss.
    (tmp / "info.json").write_text(json.dumps(_info(model, version, len(index), index.cameras)), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _publish(tmp: Path, folder: Path, model: state.ModelVectors, version: tuple[str, int]) -> VectorIndex | None:
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another query built the same cache meanwhile (or a broken one is in the way).
        index = _open_cache(folder, model, version)
        if index is not None:
            return index
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError as e:
            log.warning("cannot put the vector cache in place (%s); keeping it in memory", e.strerror or e)
            return None
    _remove_stale(folder, version)
    index = _open_cache(folder, model, version)
    if index is not None:
        index.origin = "built"
    return index


def _remove_stale(current: Path, version: tuple[str, int]) -> None:
    """Remove the caches of the same model that are older than this one (or of another
    database, or broken), and temporaries abandoned by a builder that died. A newer cache,
    built meanwhile by a query that saw a later state, is left alone."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    now = time.time()
    for entry in current.parent.iterdir():
        if entry == current or not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        try:
            if ".tmp-" in entry.name:
                if now - entry.stat().st_mtime < STALE_TMP_SECONDS:
                    continue  # another query may be building it
            else:
                info = json.loads((entry / "info.json").read_text(encoding="utf-8"))
                if info.get("database_id") == version[0] and info.get("vectors_version", -1) > version[1]:
                    continue
        except (OSError, ValueError, AttributeError):
            if not entry.exists():
                continue  # removed meanwhile by another query
            # else: unreadable, so broken
        shutil.rmtree(entry, ignore_errors=True)


def _open_cache(folder: Path, model: state.ModelVectors, version: tuple[str, int]) -> VectorIndex | None:
    """The cached matrix, memory-mapped; None when it is missing or not what it should be."""
    try:
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        count = info["count"]
        if info != _info(model, version, count, info["cameras"]):
            return None

        def load(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            arr = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}.npy is {arr.shape} {arr.dtype}")
            return arr

        vectors = load("vectors", (count, model.dim), np.float32)
        ids = load("ids", (count,), np.int64)
        taken = load("taken", (count,), np.int64)
        camera = load("camera", (count,), np.int32)
        offsets = load("path_offsets", (count + 1,), np.int64)
        paths = load("paths", (int(offsets[-1]),), np.uint8)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the broken vector cache %s: %s", folder, e)
        return None
    return VectorIndex(model.model, model.dim, vectors, ids, taken, camera, list(info["cameras"]),
                       PathTable(paths, offsets), origin="cache", folder=folder)


# -- filters ---------------------------------------------------------------------------
_DATE = re.compile(r"^(\d{4})(?:[-:/](\d{1,2})(?:[-:/](\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?$")


def parse_date(text: str) -> int:
    """YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS] (also with ':' or '/' between
    the date's parts, as EXIF writes it) -> wall-clock seconds at its start."""
    m = _DATE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a date: use YYYY, YYYY-MM, YYYY-MM-DD or 'YYYY-MM-DD HH:MM[:SS]'")
    year, month, day, hour, minute, second = (int(g) if g else None for g in m.groups())
    try:
        when = datetime(year, 1 if month is None else month, 1 if day is None else day, hour or 0, minute or 0,
                        second or 0)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a date: {e}") from None
    return calendar.timegm(when.timetuple())


@dataclass(frozen=True)
class Filters:
    """Which images a query considers. Each kind narrows the choice (and); several values
    of one kind widen it (or)."""

    path_prefixes: tuple[str, ...] = ()
    after: int | None = None  # wall-clock seconds, inclusive
    before: int | None = None  # wall-clock seconds, exclusive
    cameras: tuple[str, ...] = ()

    @classmethod
    def build(cls, *, path_prefixes=(), after: str | None = None, before: str | None = None,
              cameras=()) -> Filters:
        return cls(tuple(_prefix(p) for p in path_prefixes), None if after is None else parse_date(after),
                   None if before is None else parse_date(before), tuple(c for c in cameras if c))

    def __bool__(self) -> bool:
        return bool(self.path_prefixes or self.after is not None or self.before is not None or self.cameras)


def _prefix(value: str) -> str:
    """A folder that exists matches only what is inside it (not 2023-summer for 2023);
    anything else is a prefix of the absolute path (~/Pictures/IMG_2023)."""
    path = str(absolute(value))
    if (value.endswith(("/", os.sep)) or os.path.isdir(path)) and not path.endswith(os.sep):
        path += os.sep
    return path


def select(index: VectorIndex, filters: Filters) -> np.ndarray | None:
    """Rows that pass the filters (sorted), or None for all of them."""
    if not filters:
        return None
    keep = np.ones(len(index), dtype=bool)
    if filters.path_prefixes:
        in_prefix = np.zeros(len(index), dtype=bool)
        for prefix in filters.path_prefixes:
            lo, hi = index.paths.prefix_range(prefix)
            in_prefix[lo:hi] = True
        keep &= in_prefix
    if filters.after is not None:
        keep &= index.taken >= filters.after
    if filters.before is not None:
        keep &= (index.taken < filters.before) & (index.taken != NO_DATE)
    if filters.cameras:
        wanted = [c.casefold() for c in filters.cameras]
        codes = [i for i, name in enumerate(index.cameras) if any(w in name.casefold() for w in wanted)]
        keep &= np.isin(index.camera, np.asarray(codes, dtype=np.int32))
    return np.flatnonzero(keep)


# -- ranking ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    path: str


def normalise(vector: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    if q.shape[0] != dim:
        raise SearchError(f"the query vector has {q.shape[0]} values, the indexed vectors {dim}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise SearchError("the query vector is zero or not finite")
    return q / norm


def scores(index: VectorIndex, query: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Cosine of the query with the given rows (all rows for None), in their order."""
    q = normalise(query, index.dim)
    if rows is None:
        return index.vectors @ q
    if len(rows) == 0:
        return np.empty(0, dtype=np.float32)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows):  # one contiguous run (a path prefix): a view, no copy
        return index.vectors[lo:hi] @ q
    if len(rows) * 4 > len(index):  # most rows: one product, then pick
        return (index.vectors @ q)[rows]
    return index.vectors[rows] @ q


def top_k(index: VectorIndex, query: np.ndarray, k: int, rows: np.ndarray | None = None) -> list[Hit]:
    """The k best rows by cosine, best first (ties in path order)."""
    s = scores(index, query, rows)
    k = min(k, len(s))
    if k <= 0:
        return []
    best = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    best = best[np.lexsort((best, -s[best]))]
    at = best if rows is None else rows[best]
    return [Hit(rank, float(s[b]), index.paths[int(r)]) for rank, (b, r) in enumerate(zip(best, at), start=1)]


# -- queries ---------------------------------------------------------------------------
@dataclass
class Results:
    model: str
    hits: list[Hit]
    considered: int  # rows that passed the filters
    total: int  # rows of the model
    origin: str
    query_seconds: float = 0.0


def _embedder(model: str, embedder_factory: Callable[..., Embedder] | None) -> Embedder:
    if embedder_factory is None:
        from .embed import Embedder as embedder_factory  # noqa: N813 - deferred: imports torch
    # One query: the CPU answers it sooner than a GPU could be set up.
    return embedder_factory(model, device="cpu", dtype="float32")


def search_text(conn: sqlite3.Connection, db_path: str | os.PathLike[str], text: str, *, top: int,
                model_name: str | None = None, filters: Filters = Filters(), progress: Progress = no_progress,
                embedder_factory: Callable[..., Embedder] | None = None) -> Results:
    """The images whose vectors best match a text, by SigLIP 2's text tower."""
    if not text.strip():
        raise SearchError("the query text is empty")
    model = choose_model(conn, model_name, where=str(absolute(db_path)))
    query = _embedder(model.model, embedder_factory).embed_texts([text])[0]
    if query.shape[0] != model.dim:
        raise SearchError(f"model {model.model} gives {query.shape[0]}-d text vectors, its image vectors in "
                          f"the database are {model.dim}-d")
    index = load_index(conn, db_path, model, progress=progress)
    return _rank(index, query, top, filters)


def search_image(conn: sqlite3.Connection, db_path: str | os.PathLike[str], image: str, *, top: int,
                 model_name: str | None = None, filters: Filters = Filters(), progress: Progress = no_progress,
                 embedder_factory: Callable[..., Embedder] | None = None) -> Results:
    """The images most like an image: its stored vector when it is indexed, else the image
    embedded now, decoded exactly as the indexer decodes (pipeline.prepare)."""
    model = choose_model(conn, model_name, where=str(absolute(db_path)))
    index = load_index(conn, db_path, model, progress=progress)
    path = str(absolute(image))
    row = index.paths.find(path)
    if row is not None:
        query = np.array(index.vectors[row])
    elif os.path.isfile(path):
        query = embed_image_file(_embedder(model.model, embedder_factory), path)
        if query.shape[0] != model.dim:
            raise SearchError(f"model {model.model} gives {query.shape[0]}-d image vectors, the database's are "
                              f"{model.dim}-d")
    else:
        raise SearchError(f"{image} is not indexed in {absolute(db_path)} and is not an image file")
    return _rank(index, query, top, filters, pin=row)


def embed_image_file(embedder: Embedder, path: str) -> np.ndarray:
    """One image file -> its vector, by the indexer's own path: decoded upright and resized
    to the model's input size in pipeline.prepare, then Embedder.embed_images."""
    from PIL import Image

    from .pipeline import DecodeOptions, prepare

    embedder.prepare()
    prepared = prepare(path, DecodeOptions(patch_size=embedder.patch_size, max_num_patches=embedder.max_num_patches))
    if prepared.error is not None:
        raise SearchError(f"cannot read {path}: {prepared.error}")
    return embedder.embed_images([Image.fromarray(prepared.pixels, "RGB")])[0]


def _rank(index: VectorIndex, query: np.ndarray, top: int, filters: Filters, *, pin: int | None = None) -> Results:
    """top_k over the rows that pass the filters; a pinned row (the indexed query image)
    comes first, before an identical copy that ties with it (or, by rounding, beats it)."""
    started = time.perf_counter()
    rows = select(index, filters)
    hits = top_k(index, query, top + (pin is not None), rows)
    if pin is not None and (rows is None or pin in rows):
        path = index.paths[pin]
        score = next((h.score for h in hits if h.path == path), None)
        if score is None:
            score = float(np.asarray(index.vectors[pin]) @ normalise(query, index.dim))
        ranked = [(score, path)] + [(h.score, h.path) for h in hits if h.path != path]
        hits = [Hit(rank, s, p) for rank, (s, p) in enumerate(ranked, start=1)]
    hits = hits[:top]
    considered = len(index) if rows is None else len(rows)
    return Results(index.model, hits, considered, len(index), index.origin, time.perf_counter() - started)


# -- near-duplicates -------------------------------------------------------------------
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


# -- status ----------------------------------------------------------------------------
RECENT_RUNS = 5


def database_status(conn: sqlite3.Connection, db_path: str | os.PathLike[str], *,
                    runs: int = RECENT_RUNS) -> dict[str, Any]:
    """What the database holds, from counts on its indexes: no vector is read."""
    path = absolute(db_path)
    size = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            size += os.stat(f"{path}{suffix}").st_size
    counts = state.count_by_status(conn)
    recent = state.recent_runs(conn, runs)
    for run in recent:
        run["seconds"] = _duration(run["started_at"], run["finished_at"])
    return {
        "database": str(path),
        "size_bytes": size,
        "schema_version": state.schema_version(conn),
        "images": {**counts, "total": sum(counts.values())},
        "failed": [{"error": error, "files": n} for error, n in state.failure_reasons(conn)],
        "models": [{"model": m.model, "dim": m.dim, "vectors": m.count} for m in state.vector_models(conn)],
        "runs": recent,
    }


def _duration(started: str | None, finished: str | None) -> float | None:
    if not started or not finished:
        return None
    try:
        return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    except ValueError:
        return None
