"""Walk the input folders and yield the image files in them, with the stat we already have.

No SQL and no Click here: the caller decides what a file's state means.
"""

from __future__ import annotations

import bisect
import logging
import os
from stat import S_ISREG
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

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
    # Which file it is, for telling a renamed file from a new one (state.py).
    dev: int | None = None
    ino: int | None = None


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

    Files come in path order, the order of the working database's path index (a string
    comparison, which for UTF-8 text is SQLite's BINARY order too): the same on every run,
    and the caller can compare the walk with its rows range by range. Directories that
    could not be listed, and files that were listed but could not be stat'ed, are
    collected in `unreadable`: they were not seen, which must not be taken to mean they
    were deleted.
    """

    roots: Iterable[str | os.PathLike[str]]
    include_hidden: bool = False
    follow_symlinks: bool = False
    # gitignore-style patterns, relative to each root: an excluded folder is not walked.
    exclude: Sequence[str] = ()
    unreadable: list[str] = field(default_factory=list)
    skipped: int = 0

    def __iter__(self) -> Iterator[FileRecord]:
        return chain.from_iterable(self._runs())

    def batches(self, size: int) -> Iterator[list[FileRecord]]:
        """The same records in lists of `size` (the last one shorter): a folder's files
        are handed over as one list, not one by one."""
        buf: list[FileRecord] = []
        for run in self._runs():
            buf += run
            if len(buf) >= size:
                full = len(buf) - len(buf) % size
                for i in range(0, full, size):
                    yield buf[i : i + size]
                buf = buf[full:]
        if buf:
            yield buf

    def _runs(self) -> Iterator[list[FileRecord]]:
        """Lists of consecutive records, in path order."""
        roots = _distinct_roots([os.path.abspath(os.fspath(r)) for r in self.roots])
        # Identities of the directories walked (loops and a folder reached twice through a
        # followed symlink) and of the files yielded (a file reached through a link as well).
        self._dirs: set[tuple[int, int]] = set()
        self._files: set[int | tuple[int, int]] = set()
        self._dev: int | None = None  # files on this device are keyed by inode alone
        spec = exclude_spec(self.exclude) if self.exclude else None
        for root in roots:
            # A path relative to the root is the path from this index on.
            self._excluded = None if spec is None else _matcher(spec, len(root.rstrip(os.sep)) + 1)
            yield from self._walk(root)

    def _walk(self, top: str) -> Iterator[list[FileRecord]]:
        if _SCANDIR_FD:
            try:
                fd = os.open(top, _DIR_FLAGS)
            except OSError as e:
                self._unreadable(top, e)
                return
            try:
                listed = self._list(top, fd)
            finally:
                os.close(fd)
        else:
            listed = self._list(top, None)
        if listed is None:
            return
        names, records, subdirs = listed
        if not subdirs:
            if records:
                yield records
            return
        # A folder sorts as its name + "/" among the files ("a.jpg" < "a/" < "a0.jpg"):
        # walking it at that place keeps the whole walk in path order.
        subdirs.sort()  # "a-b/" < "a/", though "a" < "a-b"
        start = 0
        for sub_name, sub_path in subdirs:
            end = bisect.bisect_left(names, sub_name, lo=start)
            if end > start:
                yield records[start:end]
            start = end
            yield from self._walk(sub_path)
        if start < len(records):
            yield records[start:]

    def _list(self, top: str, fd: int | None) -> tuple[list[str], list[FileRecord], list[tuple[str, str]]] | None:
        """The names and records of the image files in folder top (open as fd, if not
        None), in name order, and its subfolders as (name + "/", path); None if it was
        walked already or cannot be listed."""
        entries = self._entries(top, fd)
        return None if entries is None else self._sort_out(top, entries)

    def _entries(self, top: str, fd: int | None) -> list[os.DirEntry] | None:
        """Folder top's entries in name order; None if it was walked already (a link
        back up, a bind mount) or cannot be listed."""
        try:
            st = os.stat(top) if fd is None else os.fstat(fd)
        except OSError as e:
            self._unreadable(top, e)
            return None
        key = (st.st_dev, st.st_ino)
        if key in self._dirs:
            return None
        self._dirs.add(key)
        if self._dev is None:
            self._dev = st.st_dev
        try:
            # Listed through the folder's descriptor, an entry's stat() is an fstatat() of
            # its bare name: the kernel does not look up every folder of the path again for
            # each file.
            with os.scandir(top if fd is None else fd) as it:
                return sorted(it, key=_NAME)
        except OSError as e:
            self._unreadable(top, e)
            return None

    def _sort_out(self, top: str, entries: list[os.DirEntry]) -> tuple[list[str], list[FileRecord],
                                                                        list[tuple[str, str]]]:
        """The image files among entries (names and records) and the subfolders."""
        prefix = top if top.endswith(os.sep) else top + os.sep
        # This loop runs once per file of the tree: a no-change re-index is mostly this
        # walk, so the common case is kept to a few cheap tests.
        top_utf8 = _utf8(top)
        hidden, follow, seen, dev = self.include_hidden, self.follow_symlinks, self._files, self._dev
        excluded = self._excluded
        names: list[str] = []
        records: list[FileRecord] = []
        subdirs: list[tuple[str, str]] = []  # (name + "/", path): where the folder sorts among files
        denied = False
        for entry in entries:
            name = entry.name
            if name[0] == "." and not hidden:
                continue
            path = prefix + name
            try:
                if entry.is_dir(follow_symlinks=False) or \
                        (follow and entry.is_symlink() and entry.is_dir(follow_symlinks=True)):
                    if excluded is None or not excluded(path + "/"):
                        subdirs.append((name + "/", path))
                    continue
                if not is_image_name(name) or (excluded is not None and excluded(path)):
                    continue
                st = entry.stat()  # through a link: a link to a photo is indexed
            except PermissionError as e:
                # Listed but not looked at: the folder lacks search (x) permission, or a
                # link points into one. Not seen is not deleted: keep what we had for it.
                self.unreadable.append(path)
                if not denied:
                    log.warning("cannot read %s: %s (files that cannot be read are kept as they were)",
                                path, e.strerror or e)
                denied = True
                continue
            except OSError as e:
                # A dangling link or a file that vanished since listing: nothing to index.
                log.debug("skipping %s: %s", path, e.strerror or e)
                continue
            if not S_ISREG(st.st_mode):
                continue
            if not (top_utf8 and (name.isascii() or _utf8(name))):
                self.skipped += 1
                log.warning("skipping %r: its name is not valid UTF-8", path)
                continue
            # A file reached twice (a link to it, a hard link): the first path wins. Keyed
            # by inode alone on the first root's device, which saves a tuple per file.
            key = st.st_ino if st.st_dev == dev else (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            names.append(name)
            # tuple.__new__: a NamedTuple's own __new__ is a Python call, once per file.
            records.append(_new_tuple(FileRecord, (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev,
                                                   st.st_ino)))
        return names, records, subdirs

    def _unreadable(self, path: str, error: OSError) -> None:
        self.unreadable.append(path)
        log.warning("cannot list %s: %s (its files are kept as they were)", path, error.strerror or error)


_NAME = attrgetter("name")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_SCANDIR_FD = os.scandir in os.supports_fd  # not on Windows, whose listing gives each entry's stat
_new_tuple = tuple.__new__


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _distinct_roots(roots: list[str]) -> list[str]:
    """Drop repeated roots and roots inside another root (they are walked anyway)."""
    out: list[str] = []
    # Sorted as their files' paths sort: "/a/b/x.jpg" comes after "/a/b-c/y.jpg".
    for root in sorted(set(roots), key=lambda r: r.rstrip(os.sep) + os.sep):
        if not any(is_under(root, kept) for kept in out):
            out.append(root)
    return out


def exclude_spec(patterns: Sequence[str]) -> Any:
    """The patterns as one gitignore matcher (pathspec); ValueError names a malformed one."""
    import pathspec

    for pattern in patterns:
        try:
            pathspec.GitIgnoreSpec.from_lines([pattern])
        except (ValueError, TypeError) as e:  # GitIgnorePatternError is a ValueError
            raise ValueError(f"{pattern!r} is not a valid gitignore pattern ({e})") from None
    return pathspec.GitIgnoreSpec.from_lines(list(patterns))


def _matcher(spec: Any, cut: int) -> Callable[[str], bool]:
    """Whether an absolute path under the root (a folder's ends with "/") is excluded;
    cut: the length of the root and its separator."""
    match = spec.match_file
    return lambda path: match(path[cut:])


def walk_paths(roots: Iterable[str | os.PathLike[str]], **options: bool) -> list[Path]:
    """All image paths under roots, in scan order (a convenience for tests and benchmarks)."""
    return [Path(r.path) for r in Scanner(roots, **options)]
