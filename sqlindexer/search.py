"""Images like a text or like an image: filters and cosine ranking over the vectors of
one model (vectors.py reads them).

Core code: no Click, no printing, and no torch unless a query has to be embedded (that
goes through embed.Embedder, imported late). The database is only ever opened read-only.
From ann.exact_below() vectors on, the candidates of a query come from the approximate
index (ann.py) unless it is asked to be exact; they are always re-scored exactly here.
"""

from __future__ import annotations

import calendar
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from .config import absolute
from .errors import SearchError
from .progress import Progress, no_progress
from .vectors import NO_DATE, VectorIndex, choose_model, load_index

if TYPE_CHECKING:
    from .ann import AnnIndex
    from .embed import Embedder


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
    approximate: bool = False  # the candidates came from the approximate index
    # What is left to do once the hits are shown (search: keeping the text tower for
    # OpenVINO, text_query.embed_query), which says whether it was done; None where
    # nothing is.
    then: Callable[[], bool] | None = None


def _image_embedder(model: str, embedder_factory: Callable[..., Embedder] | None) -> Embedder:
    # One query: the CPU answers it sooner than a GPU could be set up. OpenVINO where the
    # tower an index run with default settings converted is in the cache (no torch to
    # import; its precision is that run's); else torch float32 (no tower to convert first).
    if embedder_factory is None:
        from .embed import Embedder

        warm = Embedder(model, device="cpu", dtype="auto", backend="openvino")
        if warm.prepare_if_warm():
            return warm
        embedder_factory = Embedder
    return embedder_factory(model, device="cpu", dtype="float32", backend="torch")


def approximate_index(conn: sqlite3.Connection, index: VectorIndex, *, exact: bool = False,
                      progress: Progress = no_progress) -> AnnIndex | None:
    """The approximate index to take a query's candidates from; None for an exhaustive
    search (asked for, or too few vectors for an index to pay)."""
    from . import ann

    if exact or len(index) < ann.exact_below():
        return None
    return ann.load_ann(conn, index, progress=progress)


def search_text(conn: sqlite3.Connection, db_path: str | os.PathLike[str], text: str, *, top: int,
                model_name: str | None = None, filters: Filters = Filters(), progress: Progress = no_progress,
                exact: bool = False) -> Results:
    """The images whose vectors best match a text, by SigLIP 2's text tower (text_query.py)."""
    if not text.strip():
        raise SearchError("the query text is empty")
    model = choose_model(conn, model_name, where=str(absolute(db_path)))
    from .text_query import embed_query

    query, then = embed_query(model.model, text)
    if query.shape[0] != model.dim:
        raise SearchError(f"model {model.model} gives {query.shape[0]}-d text vectors, its image vectors in "
                          f"the database are {model.dim}-d")
    index = load_index(conn, db_path, model, progress=progress)
    ann = approximate_index(conn, index, exact=exact, progress=progress)
    results = _rank(index, query, top, filters, ann=ann)
    results.then = then
    return results


def search_image(conn: sqlite3.Connection, db_path: str | os.PathLike[str], image: str, *, top: int,
                 model_name: str | None = None, filters: Filters = Filters(), progress: Progress = no_progress,
                 embedder_factory: Callable[..., Embedder] | None = None, exact: bool = False) -> Results:
    """The images most like an image: its stored vector when it is indexed, else the image
    embedded now, decoded exactly as the indexer decodes (decode.prepare)."""
    model = choose_model(conn, model_name, where=str(absolute(db_path)))
    index = load_index(conn, db_path, model, progress=progress)
    path = str(absolute(image))
    row = index.paths.find(path)
    if row is not None:
        query = np.array(index.vectors[row])
    elif os.path.isfile(path):
        query = embed_image_file(_image_embedder(model.model, embedder_factory), path)
        if query.shape[0] != model.dim:
            raise SearchError(f"model {model.model} gives {query.shape[0]}-d image vectors, the database's are "
                              f"{model.dim}-d")
    else:
        raise SearchError(f"{image} is not indexed in {absolute(db_path)} and is not an image file")
    ann = approximate_index(conn, index, exact=exact, progress=progress)
    return _rank(index, query, top, filters, pin=row, ann=ann)


def embed_image_file(embedder: Embedder, path: str) -> np.ndarray:
    """One image file -> its vector, by the indexer's own path: decoded upright and resized
    to the model's input size in decode.prepare, then Embedder.embed_resized."""
    from .decode import DecodeOptions, prepare

    embedder.prepare()
    prepared = prepare(path, DecodeOptions(patch_size=embedder.patch_size, max_num_patches=embedder.max_num_patches))
    if prepared.error is not None:
        raise SearchError(f"cannot read {path}: {prepared.error}")
    return embedder.embed_resized([prepared.pixels])[0]


def _rank(index: VectorIndex, query: np.ndarray, top: int, filters: Filters, *, pin: int | None = None,
          ann: AnnIndex | None = None) -> Results:
    """top_k over the rows that pass the filters (or over the approximate index's
    candidates among them); a pinned row (the indexed query image) comes first, before an
    identical copy that ties with it (or, by rounding, beats it)."""
    started = time.perf_counter()
    rows = select(index, filters)
    k = top + (pin is not None)
    ranked = rows
    if ann is not None and (rows is None or len(rows) >= _exact_below()):
        candidates = ann.candidates(index, normalise(query, index.dim), k, rows)
        # Too few candidates (a filter that passes few rows of the cells scanned): exhaustive.
        if len(candidates) >= min(k, len(index) if rows is None else len(rows)):
            ranked = candidates
        else:
            ann = None
    else:
        ann = None
    hits = top_k(index, query, k, ranked)
    if pin is not None and (rows is None or pin in rows):
        path = index.paths[pin]
        score = next((h.score for h in hits if h.path == path), None)
        if score is None:
            score = float(np.asarray(index.vectors[pin]) @ normalise(query, index.dim))
        ranked = [(score, path)] + [(h.score, h.path) for h in hits if h.path != path]
        hits = [Hit(rank, s, p) for rank, (s, p) in enumerate(ranked, start=1)]
    hits = hits[:top]
    considered = len(index) if rows is None else len(rows)
    return Results(index.model, hits, considered, len(index), index.origin, time.perf_counter() - started,
                   approximate=ann is not None)


def _exact_below() -> int:
    from .ann import exact_below

    return exact_below()
