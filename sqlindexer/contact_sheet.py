"""Results pages (--html): one self-contained HTML file of thumbnails for search, similar
and duplicates.

A page needs nothing but itself: the CSS is inline, every thumbnail is a data: URI (a
JPEG from thumbnails.py), and a Content-Security-Policy lets it load nothing else, so it
still works when moved or mailed. Each image links to its original by a file:// URL. Every
name, path and query is HTML-escaped. The file is written as the index is: to FILE.tmp,
fsynced, then renamed over FILE.

Core code: no Click, no printing. The page's markup is in contact_sheet_html.py.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, records
from . import contact_sheet_html as markup
from .config import absolute, why_unwritable
from .errors import PageError
from .index_file import keep_mode
from .progress import Progress, no_progress
from .thumbnails import Size, Thumbnail, ThumbnailCache, size_for, thumbnails


@dataclass(frozen=True)
class Tile:
    """One image on a page: where it ranks, what the database knows of it, its thumbnail."""

    path: str
    score: float | None
    rank: int | None
    facts: records.ImageFacts | None
    thumbnail: Thumbnail

    @property
    def pixels(self) -> tuple[int, int] | None:
        """(width, height) as displayed: of the file now when it could be read, else as indexed."""
        t, f = self.thumbnail, self.facts
        if t.source_width and t.source_height:
            return t.source_width, t.source_height
        if f is not None and f.width and f.height:
            return f.width, f.height
        return None

    @property
    def size(self) -> int | None:
        if self.facts is not None:
            return self.facts.size
        try:
            return os.stat(self.path).st_size
        except OSError:
            return None


@dataclass(frozen=True)
class Page:
    """What was written: for the command's one-line report."""

    path: Path
    images: int
    unreadable: int
    bytes: int
    from_cache: int  # thumbnails read from the cache
    made: int  # thumbnails made now (cached or not)
    cached: bool  # whether the made ones were written to the cache


def check_output(output: str | os.PathLike[str], db_path: str | os.PathLike[str]) -> Path:
    """The page's absolute path, when a page can be written there (checked before any
    query runs, so a typo costs no wait); PageError otherwise."""
    out = absolute(output)
    if problem := why_unwritable(out, f"--html {output}"):
        raise PageError(problem)
    database = absolute(db_path)
    if out in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm", "-journal"))):
        raise PageError(f"--html {output} is the working database")
    return out


# -- the pages ---------------------------------------------------------------------------
def results_page(conn: sqlite3.Connection, db_path: str | os.PathLike[str], output: str | os.PathLike[str],
                 hits: Sequence, *, title: str, summary: str, query_image: str | None = None,
                 progress: Progress = no_progress) -> Page:
    """A grid of hits (search.Hit) in rank order; for similar, its query image first (and
    not again in the grid, where the indexed query image ranks first)."""
    query = str(absolute(query_image)) if query_image is not None else None
    entries = [(h.path, h.score, h.rank) for h in hits if h.path != query]
    paths = [p for p, _, _ in entries] + ([query] if query is not None else [])
    made = size_for(len(set(paths)))
    facts, thumbs, cache = _gather(conn, db_path, paths, made, progress)
    tiles = [Tile(p, s, r, facts.get(p), thumbs[p]) for p, s, r in entries]
    query_tile = Tile(query, None, None, facts.get(query), thumbs[query]) if query is not None else None
    body = markup.results_body(tiles, query_tile)
    all_tiles = tiles + ([query_tile] if query_tile is not None else [])
    return _write(output, markup.document(title, summary + _stamp(), body, made.side), all_tiles, cache)


def duplicates_page(conn: sqlite3.Connection, db_path: str | os.PathLike[str], output: str | os.PathLike[str],
                    groups: Sequence, *, title: str, summary: str, progress: Progress = no_progress) -> Page:
    """One row per group (duplicates.Group), largest first, each copy with its resolution,
    file size and folder, and the copy of the most pixels marked."""
    paths = [path for group in groups for path, _ in group.members]
    made = size_for(len(set(paths)))
    facts, thumbs, cache = _gather(conn, db_path, paths, made, progress)
    rows = [[Tile(p, s, None, facts.get(p), thumbs[p]) for p, s in group.members] for group in groups]
    body = markup.duplicates_body(rows, [best_copy(row) for row in rows])
    tiles = [tile for row in rows for tile in row]
    return _write(output, markup.document(title, summary + _stamp(), body, made.side), tiles, cache)


def best_copy(tiles: Sequence[Tile]) -> int | None:
    """The copy to keep by default: the most pixels, then the largest file, then the
    first; None when no copy's size is known."""
    known = [(p[0] * p[1], t.size or 0, -i) for i, t in enumerate(tiles) if (p := t.pixels) is not None]
    return -max(known)[2] if known else None


def _gather(conn: sqlite3.Connection, db_path: str | os.PathLike[str], paths: list[str], made: Size,
            progress: Progress) -> tuple[dict[str, records.ImageFacts], dict[str, Thumbnail], ThumbnailCache]:
    facts = records.image_facts(conn, paths)
    cache = ThumbnailCache.beside(db_path)
    return facts, thumbnails(paths, cache, made, progress=progress), cache


def _stamp() -> str:
    now = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M")
    return f" · written {now} by image-indexer {__version__}"


# -- writing -----------------------------------------------------------------------------
def _write(output: str | os.PathLike[str], html: str, tiles: list[Tile], cache: ThumbnailCache) -> Page:
    out = absolute(output)
    data = html.encode("utf-8")
    write_atomic(out, data)
    origins = [t.thumbnail.origin for t in tiles if t.thumbnail.jpeg is not None]
    return Page(out, len(tiles), sum(t.thumbnail.jpeg is None for t in tiles), len(data),
                origins.count("cache"), len(origins) - origins.count("cache"), "cached" in origins)


def write_atomic(output: Path, data: bytes) -> None:
    """Write data to output.tmp, fsync it and rename it over output: a reader sees the old
    page or the new one, never half of one."""
    tmp = output.with_name(output.name + ".tmp")
    try:
        # A planted symlink at the .tmp is removed, and O_EXCL refuses to follow a new one.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise PageError(f"cannot create {tmp}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            keep_mode(f.fileno(), output)  # a page replacing one chmod'ed 600 stays private
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise PageError(f"cannot write {output}: {e.strerror or e}") from None
        raise
