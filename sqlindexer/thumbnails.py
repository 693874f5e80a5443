"""Small JPEG thumbnails of indexed images, for the results pages, and their cache.

A thumbnail is made from the image as the indexer sees it (images.decode: EXIF orientation
applied, JPEGs draft-decoded at a reduced scale), shrunk to NORMAL.side pixels on its long
side (SMALL.side on pages of more than MANY images). Made thumbnails are kept in a folder
beside the database

    <db>.thumbnails/<hash of the path>-<side>q<quality>-<hash of size and mtime>.jpg

so a second page of the same images reads them instead of decoding the originals. A file
that changes (its size or mtime) gets a new entry, and the entry of its old content is
removed when the new one is written. Where the folder cannot be written (the database's
folder is read-only), thumbnails are made in memory for the one page. An entry is written
through a temporary file renamed into place; the temporary files a crash left behind are
removed the first time a page writes into the cache, once they are STALE_TEMPORARY old.

Core code: no Click, no printing, no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_MAX_IMAGE_PIXELS, absolute
from .progress import Progress, no_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    """How thumbnails are made: the long side in pixels and the JPEG quality."""

    side: int
    quality: int

    @property
    def key(self) -> str:
        return f"{self.side}q{self.quality}"


# A page embeds every thumbnail, so its size grows with their number: past MANY images
# they are smaller and more compressed, so that a page of thousands still opens quickly.
NORMAL = Size(240, 72)
SMALL = Size(160, 60)
MANY = 500
# A writer keeps its temporary file only while it writes one small JPEG; one this old was
# left by a process that died, and removing it cannot take a live writer's file away.
STALE_TEMPORARY = 3600.0  # seconds
_TEMPORARY = ".tmp-"
# Written into each thumbnail's JPEG comment, with the source image's displayed size: a
# cached thumbnail then says how large its original is without the original being opened.
_COMMENT = "sqlindexer-thumbnail"


@dataclass(frozen=True)
class Thumbnail:
    """A thumbnail of one image, or the reason there is none."""

    path: str
    jpeg: bytes | None = None
    width: int = 0  # of the thumbnail
    height: int = 0
    source_width: int | None = None  # the image as displayed, after EXIF orientation
    source_height: int | None = None
    error: str | None = None
    origin: str = "memory"  # "cache" (read), "cached" (made and written) or "memory" (made, not written)


class ThumbnailCache:
    """Thumbnails kept in one folder; a folder of None keeps nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._usable: bool | None = None if folder is not None else False

    @classmethod
    def beside(cls, db_path: str | os.PathLike[str]) -> ThumbnailCache:
        db_path = absolute(db_path)
        return cls(db_path.with_name(f"{db_path.name}.thumbnails"))

    def entry(self, path: str, made: Size, size: int, mtime_ns: int) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{_path_key(path)}-{made.key}-{_content_key(size, mtime_ns)}.jpg"

    def read(self, entry: Path | None, path: str) -> Thumbnail | None:
        """The cached thumbnail, or None when there is none (or it is broken: remade)."""
        if entry is None:
            return None
        try:
            data = entry.read_bytes()
        except OSError:
            return None
        thumb = _from_jpeg(path, data)
        if thumb is None:
            log.debug("ignoring the broken cached thumbnail %s", entry)
        return thumb

    def write(self, entry: Path | None, jpeg: bytes) -> bool:
        """Put a thumbnail in place (atomically: a reader sees all of it or none); False when
        the folder cannot be written, and then nothing more is tried for this cache."""
        if entry is None or self._usable is False:
            return False
        tmp = entry.with_name(f"{entry.name}{_TEMPORARY}{os.getpid()}-{os.urandom(4).hex()}")
        first = self._usable is None
        try:
            if first:
                entry.parent.mkdir(exist_ok=True)
            tmp.write_bytes(jpeg)
            os.replace(tmp, entry)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._usable = False
            log.warning("cannot write the thumbnail cache beside the database (%s); making thumbnails in memory",
                        e.strerror or e)
            return False
        self._usable = True
        if first:
            remove_stale_temporaries(entry.parent)
        _remove_older(entry)
        return True


def size_for(count: int) -> Size:
    """How the thumbnails of a page of count images are made."""
    return NORMAL if count <= MANY else SMALL


def _path_key(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _content_key(size: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{size}\n{mtime_ns}".encode()).hexdigest()[:12]


def remove_stale_temporaries(folder: Path, *, older_than: float = STALE_TEMPORARY) -> int:
    """Remove the temporary files of writes that never finished, once older_than seconds
    old; returns how many were removed."""
    cutoff = time.time() - older_than
    removed = 0
    try:
        found = list(folder.glob(f"*.jpg{_TEMPORARY}*"))
    except OSError:
        return 0
    for tmp in found:
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except OSError:
            pass  # removed meanwhile by another page
    if removed:
        log.debug("removed %d temporary thumbnail files left by interrupted writes in %s", removed, folder)
    return removed


def _remove_older(entry: Path) -> None:
    """Remove the entries of the same path and Size for other contents of the file."""
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    try:
        others = [p for p in entry.parent.glob(f"{prefix}*.jpg") if p != entry]
    except OSError:
        return
    for other in others:
        try:
            other.unlink()
        except OSError:
            pass  # removed meanwhile by another page


def make(path: str, made: Size = NORMAL) -> Thumbnail:
    """A thumbnail of the file at path; never raises for a bad file (Thumbnail.error)."""
    from PIL import Image

    from .images import decode

    # decode() draft-decodes a JPEG to the smallest scale that keeps max_num_patches
    # patches of patch_size pixels: side * side pixels, so the long side keeps >= side.
    side = made.side
    decoded = decode(path, patch_size=1, max_num_patches=side * side, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    if decoded.image is None:
        return Thumbnail(path, error=decoded.error or "cannot be read")
    try:
        im = decoded.image
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        comment = f"{_COMMENT} {decoded.width}x{decoded.height}"
        im.save(out, "JPEG", quality=made.quality, optimize=True, comment=comment)
    except Exception as e:  # noqa: BLE001 - a file's failure, shown on its tile
        return Thumbnail(path, error=f"{type(e).__name__}: {e}")
    return Thumbnail(path, out.getvalue(), im.width, im.height, decoded.width, decoded.height)


def _from_jpeg(path: str, data: bytes) -> Thumbnail | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return None
            width, height = im.size
            comment = im.info.get("comment", b"")
        word, size = comment.decode("ascii").split(" ")
        source_width, source_height = (int(v) for v in size.split("x"))
    except Exception:  # noqa: BLE001 - a broken entry is remade
        return None
    if word != _COMMENT:
        return None
    return Thumbnail(path, data, width, height, source_width, source_height, origin="cache")


def cached_or_made(path: str, cache: ThumbnailCache, made: Size = NORMAL) -> Thumbnail:
    """The thumbnail of path from the cache when its file has not changed, else made now
    (and cached when the cache can be written)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Thumbnail(path, error="the file is gone (moved or deleted since it was indexed)")
    except OSError as e:
        return Thumbnail(path, error=f"cannot be read: {e.strerror or e}")
    entry = cache.entry(path, made, st.st_size, st.st_mtime_ns)
    found = cache.read(entry, path)
    if found is not None:
        return found
    thumb = make(path, made)
    if thumb.jpeg is not None and cache.write(entry, thumb.jpeg):
        return Thumbnail(**{**thumb.__dict__, "origin": "cached"})
    return thumb


def thumbnails(paths: Iterable[str], cache: ThumbnailCache, made: Size = NORMAL, *,
               progress: Progress = no_progress) -> dict[str, Thumbnail]:
    """The thumbnails of paths (each once), by path."""
    unique = list(dict.fromkeys(paths))
    out: dict[str, Thumbnail] = {}
    with progress("thumbnails", len(unique)) as tick:
        for path in unique:
            out[path] = cached_or_made(path, cache, made)
            tick(1)
    return out
