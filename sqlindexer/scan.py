"""Walk the input folders and yield the image files in them, with the stat we already have.

No SQL and no Click here: the caller decides what a file's state means.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

# Case-insensitive. hif is the HEIF suffix of Canon and Sony cameras, mpo the multi-picture
# JPEG of stereo cameras; both decode through the same plugins as heic and jpg.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
     ".heic", ".heif", ".hif", ".avif", ".mpo"}
)


class FileRecord(NamedTuple):
    # A tuple: cheap to make a hundred thousand times, and SQLite takes it as parameters.
    path: str  # absolute and normalised
    size: int
    mtime_ns: int
    ctime_ns: int


def is_image_name(name: str) -> bool:
    # os.path.splitext's rule, without its cost (it runs once per file of the walk):
    # leading dots do not start an extension.
    dot = name.rfind(".")
    if dot <= 0 or (name[0] == "." and not name[:dot].lstrip(".")):
        return False
    return name[dot:].lower() in IMAGE_EXTENSIONS


def is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class Scanner:
    """Iterate once over FileRecords of all image files under roots, each file once.

    Directories are walked in sorted name order, so the order is the same on every run.
    Directories that could not be listed, and files that were listed but could not be
    stat'ed, are collected in `unreadable`: they were not seen, which must not be taken to
    mean they were deleted.
    """

    roots: Iterable[str | os.PathLike[str]]
    include_hidden: bool = False
    follow_symlinks: bool = False
    unreadable: list[str] = field(default_factory=list)
    skipped: int = 0

    def __iter__(self) -> Iterator[FileRecord]:
        roots = _distinct_roots([os.path.abspath(os.fspath(r)) for r in self.roots])
        # Identities of the directories walked (loops and a folder reached twice through a
        # followed symlink) and of the files yielded (a file reached through a link as well).
        self._dirs: set[tuple[int, int]] = set()
        self._files: set[tuple[int, int]] = set()
        for root in roots:
            yield from self._walk(root)

    def _walk(self, top: str) -> Iterator[FileRecord]:
        try:
            st = os.stat(top)
        except OSError as e:
            self._unreadable(top, e)
            return
        key = (st.st_dev, st.st_ino)
        if key in self._dirs:
            return
        self._dirs.add(key)
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=_NAME)
        except OSError as e:
            self._unreadable(top, e)
            return
        subdirs = []
        denied = False
        for entry in entries:
            if not self.include_hidden and entry.name.startswith("."):
                continue
            try:
                is_link = entry.is_symlink()
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                    continue
                if is_link and self.follow_symlinks and entry.is_dir(follow_symlinks=True):
                    subdirs.append(entry.path)
                    continue
                if not is_image_name(entry.name):
                    continue
                st = entry.stat(follow_symlinks=True)
            except PermissionError as e:
                # Listed but not looked at: the folder lacks search (x) permission, or a
                # link points into one. Not seen is not deleted: keep what we had for it.
                self.unreadable.append(entry.path)
                if not denied:
                    log.warning("cannot read %s: %s (files that cannot be read are kept as they were)",
                                entry.path, e.strerror or e)
                denied = True
                continue
            except OSError as e:
                # A dangling link or a file that vanished since listing: nothing to index.
                log.debug("skipping %s: %s", entry.path, e.strerror or e)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if not _utf8(entry.path):
                self.skipped += 1
                log.warning("skipping %r: its name is not valid UTF-8", entry.path)
                continue
            key = (st.st_dev, st.st_ino)
            if key in self._files:
                continue
            self._files.add(key)
            yield FileRecord(entry.path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        for sub in subdirs:
            yield from self._walk(sub)

    def _unreadable(self, path: str, error: OSError) -> None:
        self.unreadable.append(path)
        log.warning("cannot list %s: %s (its files are kept as they were)", path, error.strerror or error)


_NAME = attrgetter("name")


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _distinct_roots(roots: list[str]) -> list[str]:
    """Drop repeated roots and roots inside another root (they are walked anyway)."""
    out: list[str] = []
    for root in sorted(set(roots)):
        if not any(is_under(root, kept) for kept in out):
            out.append(root)
    return out


def walk_paths(roots: Iterable[str | os.PathLike[str]], **options: bool) -> list[Path]:
    """All image paths under roots, in scan order (a convenience for tests and benchmarks)."""
    return [Path(r.path) for r in Scanner(roots, **options)]
