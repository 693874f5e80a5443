"""Where each record's line is in the last jsonl export: the line map beside the database.

An index run's jsonl export also writes `<database>.export-lines`: the ids of the
rows whose records it wrote, in line order, and where each line ends. The next export
finds the line of each record that did not change since from its row's id, and copies
every run of such lines that lie one after another in the old file as one block, without
reading a path from the old file (index_file's path-reading copy is the fallback where
the map is missing or not that of the file on disk: the first export after an upgrade, a
map that could not be written).

The map names the file it describes (path, size, mtime, inode) and the database its ids
are of; one that names anything else is not used. It is a cache: written after the index
file is in place and not fsynced, so a crash leaves it stale or absent, never wrong for a
file it names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_FORMAT = 1
_HEAD_MAX = 1 << 16  # bytes of the header line read at most (it names a path)


@dataclass(frozen=True)
class Block:
    """Lines first to end-1 of the last export, copied as they are."""

    first: int
    end: int


@dataclass(frozen=True)
class LineMap:
    ids: np.ndarray  # int64: the row of each line
    ends: np.ndarray  # int64: the offset just past each line's newline
    file: tuple[int, int, int] | None = None  # (size, mtime_ns, inode) of the file it was read for

    def describes(self, st: os.stat_result) -> bool:
        """Whether st (of the file opened to copy from) is the file this map was read for."""
        return self.file is None or self.file == (st.st_size, st.st_mtime_ns, st.st_ino)

    def start(self, line: int) -> int:
        return int(self.ends[line - 1]) if line else 0

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ends, prepend=0)


class Lengths:
    """The lengths of the lines an export writes, in the order written: the ends of the new
    line map."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._run: list[int] = []

    def line(self, length: int) -> None:
        self._run.append(length)

    def lines(self, lengths: np.ndarray) -> None:
        self._flush()
        self._parts.append(np.asarray(lengths, dtype=np.int64))

    def ends(self) -> np.ndarray:
        self._flush()
        return np.cumsum(np.concatenate(self._parts)) if self._parts else np.zeros(0, dtype=np.int64)

    def line_map(self, ids: np.ndarray) -> LineMap | None:
        """The map of the lines written, of rows ids in line order; None if they are not
        one line each."""
        ends = self.ends()
        return LineMap(ids, ends) if len(ends) == len(ids) else None

    def _flush(self) -> None:
        if self._run:
            self._parts.append(np.array(self._run, dtype=np.int64))
            self._run = []


def identity(database_id: str, output: Path, st: os.stat_result) -> dict[str, Any]:
    """What a map must name to be that of the file at output (stat result st)."""
    return {"format": _FORMAT, "database_id": database_id, "path": str(output), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def read(path: Path, want: dict[str, Any]) -> LineMap | None:
    """The map at path if it names want (identity()), else None. Only a regular file is
    read (a link, a FIFO or a device is refused), and only as many bytes as it says."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            line = f.readline(_HEAD_MAX)
            head = json.loads(line)
            n = head.get("count")
            if head != {**want, "count": n} or not isinstance(n, int) or n < 0 \
                    or st.st_size != len(line) + 16 * n:
                return None
            data = f.read(16 * n)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if len(data) != 16 * n:
        return None
    ids = np.frombuffer(data, dtype="<i8", count=n).astype(np.int64)
    ends = np.frombuffer(data, dtype="<i8", count=n, offset=8 * n).astype(np.int64)
    if not n:
        return LineMap(ids, ends, _file(want)) if want["size"] == 0 else None
    # Unique by a sort: np.unique hashes, many times slower on a hundred thousand ids.
    by_id = np.sort(ids)
    if ends[-1] != want["size"] or (np.diff(ends, prepend=0) <= 0).any() or by_id[0] < 1 \
            or (by_id[1:] == by_id[:-1]).any():
        return None  # not a map an export wrote (row ids are positive and unique)
    return LineMap(ids, ends, _file(want))


def _file(want: dict[str, Any]) -> tuple[int, int, int]:
    return (want["size"], want["mtime_ns"], want["ino"])


def load(path: Path, database_id: str, output: Path) -> LineMap | None:
    """The map at path if it is that of the file now at output, else None."""
    try:
        return read(path, identity(database_id, output, output.stat()))
    except OSError:
        return None


def keep(path: Path, database_id: str, output: Path, st: os.stat_result, lines: LineMap | None) -> None:
    """Leave at path the map of the file just written at output (stat result st); with
    none to leave (its lines were not all accounted for), remove the old one."""
    if lines is None:
        with contextlib.suppress(OSError):
            path.unlink()
        return
    write(path, identity(database_id, output, st), lines)


def write(path: Path, ident: dict[str, Any], lines: LineMap) -> None:
    """Replace the map at path; one that cannot be written is removed, and logged."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        # As for the index's .tmp: a planted file or link there is removed, never written through.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps({**ident, "count": len(lines.ids)}).encode() + b"\n")
            f.write(lines.ids.astype("<i8").tobytes())
            f.write(lines.ends.astype("<i8").tobytes())
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot write the export's line map %s (%s)", path, e.strerror or e)
        for p in (tmp, path):
            with contextlib.suppress(OSError):
                p.unlink()


def plan(old: LineMap, ids: np.ndarray, changed: np.ndarray) -> Iterator[Block | int]:
    """The new export, ids (its rows in path order) with changed (those changed since the
    old one was written), as blocks of the old export's lines and the ids of the rows to
    serialise. A row not changed whose id has no line there is serialised too."""
    # Each row's old line, by a binary search of the old ids (any ids: no table as long as
    # the largest of them).
    order = np.argsort(old.ids, kind="stable")
    sorted_ids = old.ids[order]
    at = np.searchsorted(sorted_ids, ids)
    found = at < len(sorted_ids)
    found[found] = sorted_ids[at[found]] == ids[found]
    keep = found & ~changed
    line = np.full(len(ids), -1, dtype=np.int64)
    line[keep] = order[at[keep]]
    fresh = line < 0
    # A segment starts at every row but a kept line that follows the kept line before it:
    # a row to serialise is a segment of its own, a block is a run of lines in order.
    n = len(ids)
    starts = np.ones(n, dtype=bool)
    starts[1:] = ~((line[1:] == line[:-1] + 1) & ~fresh[1:] & ~fresh[:-1])
    first = np.flatnonzero(starts)
    sizes = np.diff(first, append=n).tolist()
    for is_fresh, old_line, row, size in zip(fresh[first].tolist(), line[first].tolist(), ids[first].tolist(),
                                             sizes):
        yield row if is_fresh else Block(old_line, old_line + size)
