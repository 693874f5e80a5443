"""The lines of the last jsonl export found by their paths: the export's fallback where it
has no line map of that file (line_map.py), e.g. the first export after an upgrade.

The file was written by index_file in its line layout, in path order, each path once. Where
each line starts is found by numpy; a line's path is read where the copy must look at it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from .line_map import Lengths
from .records import ExportRow

log = logging.getLogger(__name__)

_PATH_KEY = b',"metadata":{"path":"'
_PATH_KEY_BYTES = np.frombuffer(_PATH_KEY, dtype=np.uint8)
_PATH_KEY_RANGE = np.arange(len(_PATH_KEY))
_SCAN_READ = 1 << 22
_WINDOW = 4096  # lines whose paths are read at once when a run of records is not one block
_READ = 1 << 20  # bytes of a block copied per read


class ByPath:
    """A jsonl index that _jsonl_line wrote, read by line number.

    Where each line starts is found first, by numpy, in reads of a few megabytes (8 bytes
    a line are kept, not the file); a line's path is read only where it is looked at.
    """

    def __init__(self, f: BinaryIO, lengths: Lengths | None = None) -> None:
        self._fd = f.fileno()
        self._lengths = lengths
        self._starts = _line_starts(self._fd)
        self.count = len(self._starts) - 1
        self._next = 0  # the first line not yet copied or passed over
        self.blocks = 0  # runs of consecutive lines copied, each with one read and write
        self.looked = 0  # lines whose path was read
        self._read_from, self._read = 0, []  # the paths of the lines of the last window

    def copy(self, paths: list[str], out: BinaryIO, afresh: Callable[[ExportRow], None],
             load: Callable[[str], ExportRow]) -> int:
        """Write the records of paths (unchanged since previous was written, in path
        order, after those of earlier calls) to out; return how many were copied.

        previous is in path order and holds each path once: it was written from the
        ordered, unique paths of the database. Lines before the first path (records no
        longer exported, or changed) are passed over. If the line k-1 after the first
        path's is that of the last, the k lines between are those of the k paths, and are
        copied as one block after two paths were looked at. Otherwise (lines of records
        deleted or changed since lie among them) the paths and the lines are merged, the
        lines' paths read a window at a time, and each run of consecutive lines copied as
        one block; a path without a line (which the caller's bookkeeping rules out) is
        loaded and written afresh.
        """
        k = len(paths)
        if self._seek(paths[0]) and self._next + k <= self.count and self._path(self._next + k - 1) == paths[-1]:
            self._copy_lines(self._next, self._next + k, out)
            self._next += k
            return k
        return self._merge(paths, out, afresh, load)

    def _merge(self, paths: list[str], out: BinaryIO, afresh: Callable[[ExportRow], None],
               load: Callable[[str], ExportRow]) -> int:
        i = copied = 0
        block = self._next  # the first line of the run of lines not yet copied
        while i < len(paths) and self._next < self.count:
            for found in self._window(2 * (len(paths) - i) + 16):
                while i < len(paths) and paths[i] < found:
                    self._copy_lines(block, self._next, out)
                    block = self._next
                    self._afresh(paths[i], afresh, load)
                    i += 1
                if i == len(paths):
                    break
                if found == paths[i]:
                    i += 1
                    copied += 1
                else:  # the line of a record not in paths: passed over
                    self._copy_lines(block, self._next, out)
                    block = self._next + 1
                self._next += 1
                if i == len(paths):
                    break
        self._copy_lines(block, self._next, out)
        for path in paths[i:]:
            self._afresh(path, afresh, load)
        return copied

    @staticmethod
    def _afresh(path: str, afresh: Callable[[ExportRow], None], load: Callable[[str], ExportRow]) -> None:
        log.debug("no line for %s in the last export; writing it afresh", path)
        afresh(load(path))

    def _seek(self, path: str) -> bool:
        """Pass over the lines of paths before path; whether the next line is path's."""
        while self._next < self.count:
            found = self._path(self._next)
            if found >= path:
                return found == path
            self._next += 1
        return False

    def _path(self, i: int) -> str:
        if self._read_from <= i < self._read_from + len(self._read):
            return self._read[i - self._read_from]
        return self._paths(i, i + 1)[0]

    def _window(self, want: int) -> list[str]:
        """The paths of the next lines, up to want of them (or _WINDOW): those read last
        time if they are still ahead, so that no line's path is read twice."""
        ahead = self._read_from + len(self._read) - self._next
        if ahead > 0:
            return self._read[len(self._read) - ahead :]
        self._read_from = self._next
        self._read = self._paths(self._next, min(self._next + min(want, _WINDOW), self.count))
        return self._read

    def _paths(self, first: int, end: int) -> list[str]:
        """The paths of lines first to end-1, from one read: each line's path follows the
        first "]" of its line (the end of its vector), where the layout puts its key."""
        self.looked += end - first
        base, stop = int(self._starts[first]), int(self._starts[end])
        buf = os.pread(self._fd, stop - base, base)
        if len(buf) != stop - base:
            raise ValueError("it was truncated while it was read")
        data = np.frombuffer(buf, dtype=np.uint8)
        starts, ends = self._starts[first:end] - base, self._starts[first + 1 : end + 1] - base
        closes = np.flatnonzero(data == ord("]"))
        at = np.searchsorted(closes, starts)
        if at.size and at[-1] >= closes.size:
            raise ValueError("not a line of this layout")
        keys = closes[at] + 1
        if (keys + len(_PATH_KEY) >= ends).any() or \
                not (data[keys[:, None] + _PATH_KEY_RANGE] == _PATH_KEY_BYTES).all():
            raise ValueError("not a line of this layout")
        paths = []
        for head, a, b in zip((keys + len(_PATH_KEY)).tolist(), starts.tolist(), ends.tolist()):
            tail = buf.find(b'"', head, b)
            if tail < 0:
                raise ValueError("not a line of this layout")
            raw = buf[head:tail]
            # A path with a quote, a backslash or a control character is escaped: parse its line.
            paths.append(raw.decode("utf-8") if b"\\" not in raw else _escaped_path(buf[a:b]))
        return paths

    def _copy_lines(self, first: int, end: int, out: BinaryIO) -> None:
        if first >= end:
            return
        self.blocks += 1
        if self._lengths is not None:
            self._lengths.lines(np.diff(self._starts[first : end + 1]))
        pos, stop = int(self._starts[first]), int(self._starts[end])
        while pos < stop:
            data = os.pread(self._fd, min(stop - pos, _READ), pos)
            if not data:
                raise ValueError("it was truncated while it was read")
            out.write(data)
            pos += len(data)


def _line_starts(fd: int) -> np.ndarray:
    """The offset of each line's start, then that of the end of the file."""
    parts = [np.zeros(1, dtype=np.int64)]
    pos = 0
    while chunk := os.pread(fd, _SCAN_READ, pos):
        parts.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + (pos + 1))
        pos += len(chunk)
    starts = np.concatenate(parts)
    if starts[-1] != pos:
        raise ValueError("not a line of this layout (its last line does not end)")
    return starts


def _escaped_path(line: bytes) -> str:
    """The path of a line whose path is escaped; a line that is not a record of this layout
    (a hand-edited file) is a ValueError like any other layout mismatch."""
    try:
        path = json.loads(line)["metadata"]["path"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a line of this layout ({e!r})") from None
    if not isinstance(path, str):
        raise ValueError("not a line of this layout (a path that is not a string)")
    return path
