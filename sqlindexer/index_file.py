"""Write the index file from committed rows: jsonl or pkl, atomically.

The file is written to <output>.tmp in the same folder, flushed, fsynced and renamed into
place, so a reader sees the old index or the new one, never half of either. A jsonl index
can be written from the last one: the lines of records that did not change are copied
from it, the others serialised. The .tmp is
created fresh (O_EXCL | O_NOFOLLOW: a planted file or symlink there is never written
through), and the rename replaces whatever is at the output path, a symlink included,
without following it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import stat
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from .config import OUTPUT_FORMATS
from .errors import ExportError
from .records import ExportRow

log = logging.getLogger(__name__)

# The form of a jsonl line as _jsonl_line writes it. Lines are copied from an index only if
# it was written in this form: bump it whenever a record is written differently.
JSONL_LAYOUT = 1
_WRITE_BUFFER = 1 << 20
_PATH_KEY = b',"metadata":{"path":"'
_PATH_KEY_BYTES = np.frombuffer(_PATH_KEY, dtype=np.uint8)
_PATH_KEY_RANGE = np.arange(len(_PATH_KEY))
_SCAN_READ = 1 << 22
_WINDOW = 4096  # lines whose paths are read at once when a run of records is not one block


def iso_time(ns: int) -> str:
    """Local time without offset, as datetime.isoformat() writes it: the original tool's form.

    The original wrote datetime.fromtimestamp(st.st_mtime).isoformat(); os.stat() makes
    st_mtime as seconds + nanoseconds * 1e-9, which is not always the same float as
    ns / 1e9 and then rounds to another microsecond. Build the same float.
    """
    sec, nsec = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(sec + nsec * 1e-9).isoformat()


def vector_list(row: ExportRow) -> list[float]:
    return np.frombuffer(row.embedding, dtype="<f4", count=row.dim).tolist()


def metadata(row: ExportRow, *, exif: Any) -> dict[str, Any]:
    return {
        "path": row.path,
        "filename": os.path.basename(row.path),
        "size_bytes": row.size,
        "creation_time": iso_time(row.ctime_ns),
        "modification_time": iso_time(row.mtime_ns),
        "width": row.width,
        "height": row.height,
        "exif": exif,
    }


def record(row: ExportRow) -> dict[str, Any]:
    """The record as the original tool's README lays it out."""
    return {"vector": vector_list(row), "metadata": metadata(row, exif=json.loads(row.exif) if row.exif else {})}


def _write_jsonl(rows: Iterable[ExportRow], f: BinaryIO, tick: Callable[[int], None]) -> int:
    n = 0
    for row in rows:
        f.write(_jsonl_line(row))
        n += 1
        tick(1)
    return n


def _jsonl_line(row: ExportRow) -> bytes:
    # orjson writes the float32 array directly, each value in the shortest form that reads
    # back to the same float32: many times faster than json.dumps of a list, and half the
    # bytes (docs/performance.md). exif is already JSON in the database: spliced in, not re-parsed.
    vec = orjson.dumps(np.frombuffer(row.embedding, dtype="<f4", count=row.dim), option=orjson.OPT_SERIALIZE_NUMPY)
    meta = orjson.dumps(metadata(row, exif=None))
    return (b'{"vector":' + vec + b',"metadata":' + meta[: -len(b"null}")] + (row.exif or "{}").encode("utf-8")
            + b"}}\n")


def _write_jsonl_reusing(entries: Iterable[ExportRow | list[str]], f: BinaryIO, tick: Callable[[int], None], *,
                         previous: BinaryIO, load: Callable[[str], ExportRow]) -> int:
    """Write entries: rows serialised, and lists of the paths of records unchanged since
    previous was written, whose lines are copied from it (see _Previous.copy)."""
    old = _Previous(previous)
    n = copied = 0
    for entry in entries:
        if isinstance(entry, list):
            copied += old.copy(entry, f, load)
            n += len(entry)
            tick(len(entry))
        else:
            f.write(_jsonl_line(entry))
            n += 1
            tick(1)
    log.debug("copied %d of %d records from the last export in %d blocks (%d of its %d lines looked at)",
              copied, n, old.blocks, old.looked, old.count)
    return n


class _Previous:
    """A jsonl index that _jsonl_line wrote, read by line number.

    Where each line starts is found first, by numpy, in reads of a few megabytes (8 bytes
    a line are kept, not the file); a line's path is read only where it is looked at.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._fd = f.fileno()
        self._starts = _line_starts(self._fd)
        self.count = len(self._starts) - 1
        self._next = 0  # the first line not yet copied or passed over
        self.blocks = 0  # runs of consecutive lines copied, each with one read and write
        self.looked = 0  # lines whose path was read
        self._read_from, self._read = 0, []  # the paths of the lines of the last window

    def copy(self, paths: list[str], out: BinaryIO, load: Callable[[str], ExportRow]) -> int:
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
        return self._merge(paths, out, load)

    def _merge(self, paths: list[str], out: BinaryIO, load: Callable[[str], ExportRow]) -> int:
        i = copied = 0
        block = self._next  # the first line of the run of lines not yet copied
        while i < len(paths) and self._next < self.count:
            for found in self._window(2 * (len(paths) - i) + 16):
                while i < len(paths) and paths[i] < found:
                    self._copy_lines(block, self._next, out)
                    block = self._next
                    self._afresh(paths[i], out, load)
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
            self._afresh(path, out, load)
        return copied

    @staticmethod
    def _afresh(path: str, out: BinaryIO, load: Callable[[str], ExportRow]) -> None:
        log.debug("no line for %s in the last export; writing it afresh", path)
        out.write(_jsonl_line(load(path)))

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
        pos, stop = int(self._starts[first]), int(self._starts[end])
        while pos < stop:
            data = os.pread(self._fd, min(stop - pos, _WRITE_BUFFER), pos)
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


def _write_pkl(rows: Iterable[ExportRow], f: BinaryIO, tick: Callable[[int], None]) -> int:
    n = 0
    for row in rows:
        # One dump per record: readers pickle.load() until EOFError.
        pickle.dump(record(row), f, protocol=pickle.HIGHEST_PROTOCOL)
        n += 1
        tick(1)
    return n


def tmp_path(output: Path) -> Path:
    return output.with_name(output.name + ".tmp")


def write_index(
    rows: Iterable[ExportRow | list[str]],
    output: Path,
    fmt: str,
    *,
    tick: Callable[[int], None] = lambda n: None,
    previous: Path | None = None,
    load: Callable[[str], ExportRow] | None = None,
) -> int:
    """Write rows to output atomically; return the number of records written.

    With previous (jsonl only: an index this module wrote in JSONL_LAYOUT), rows may hold
    lists of paths instead of rows, in the same path order: records that did not change
    since previous was written, whose lines are copied from it. load gives the row of such
    a path if previous lacks it.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ExportError(f"unknown output format {fmt!r} (use jsonl or pkl)")
    output = Path(output)
    tmp = tmp_path(output)
    # One try from before the .tmp exists: a signal that lands just after it was created
    # still removes it.
    try:
        try:
            # A .tmp left by a crash is never read as the index, only replaced. Unlinking a
            # planted symlink removes the link, and O_EXCL then refuses to follow a new one.
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise ExportError(f"cannot create {tmp}: {e.strerror or e}") from None
        with os.fdopen(fd, "wb", buffering=_WRITE_BUFFER) as f:
            keep_mode(f.fileno(), output)
            if previous is not None:
                if fmt != "jsonl" or load is None:  # a caller's mistake, not a file we cannot use
                    raise TypeError("only a jsonl index is written from the last one, and it needs load")
                try:
                    old = open(previous, "rb", buffering=_WRITE_BUFFER)
                except OSError as e:
                    raise ValueError(f"cannot read it: {e.strerror or e}") from None
                with old:
                    count = _write_jsonl_reusing(rows, f, tick, previous=old, load=load)
            else:
                writer = _write_jsonl if fmt == "jsonl" else _write_pkl
                count = writer(rows, f, tick)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {output}: {e.strerror or e}") from None
        raise
    _fsync_dir(output.parent)
    return count


def keep_mode(fd: int, output: Path) -> None:
    """Give the new file the permissions of the index it replaces, as `sed -i` does, so an
    index chmod'ed 600 stays private; a first index gets 0o666 less the umask. A symlink
    at the output path is replaced by the new file (os.replace renames over the link, the
    link's target is left as it was) and lends it nothing."""
    try:
        st = os.lstat(output)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o777)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
