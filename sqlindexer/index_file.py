"""Write the index file from committed rows: jsonl or pkl, atomically.

The file is written to <output>.tmp in the same folder, flushed, fsynced and renamed into
place, so a reader sees the old index or the new one, never half of either. A jsonl index
can be written from the last one: the lines of records that did not change are copied
from it (found by its line map, line_map.py, else by their paths, previous_lines.py), the
others serialised. The .tmp is created fresh (O_EXCL | O_NOFOLLOW: a planted file or
symlink there is never written through), and the rename replaces whatever is at the output
path, a symlink included, without following it.
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
from .line_map import Block, Lengths, LineMap
from .previous_lines import ByPath
from .records import ExportRow

log = logging.getLogger(__name__)

# The form of a jsonl line as _jsonl_line writes it. Lines are copied from an index only if
# it was written in this form: bump it whenever a record is written differently.
JSONL_LAYOUT = 1
_WRITE_BUFFER = 1 << 20


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


def _write_jsonl(rows: Iterable[ExportRow], f: BinaryIO, tick: Callable[[int], None],
                 lengths: Lengths | None) -> int:
    n = 0
    for row in rows:
        _write_row(row, f, lengths)
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


def _write_jsonl_reusing(entries: Iterable[ExportRow | list[str] | Block], f: BinaryIO,
                         tick: Callable[[int], None], *, previous: BinaryIO, load: Callable[[str], ExportRow],
                         lines: LineMap | None, lengths: Lengths | None) -> int:
    """Write entries: rows serialised, blocks of lines of previous (by lines, its line
    map) and lists of the paths of records unchanged since previous was written, whose
    lines are found by their paths (previous_lines.ByPath, the fallback without a map)."""
    by_path = None
    n = copied = blocks = 0
    if lines is not None and not lines.describes(os.fstat(previous.fileno())):
        # Replaced between the check and the open (an `export` to the same path).
        raise ValueError("it is not the file its line map describes")
    for entry in entries:
        if isinstance(entry, Block):
            if lines is None:
                raise TypeError("blocks of lines need the line map of previous")
            _copy_block(previous, lines, entry, f)
            if lengths is not None:
                lengths.lines(lines.lengths[entry.first : entry.end])
            k = entry.end - entry.first
            n, copied, blocks = n + k, copied + k, blocks + 1
            tick(k)
        elif isinstance(entry, list):
            if by_path is None:
                by_path = ByPath(previous, lengths)
            copied += by_path.copy(entry, f, lambda row: _write_row(row, f, lengths), load)
            n += len(entry)
            tick(len(entry))
        else:
            _write_row(entry, f, lengths)
            n += 1
            tick(1)
    if by_path is not None:
        log.debug("copied %d of %d records from the last export in %d blocks (%d of its %d lines looked at)",
                  copied, n, by_path.blocks, by_path.looked, by_path.count)
    else:
        log.debug("copied %d of %d records from the last export in %d blocks (by its line map)", copied, n, blocks)
    return n


def _copy_block(previous: BinaryIO, lines: LineMap, block: Block, out: BinaryIO) -> None:
    # Blocks come in the order of the old file's lines (unchanged records keep their
    # order), so the buffered reads go forward through it.
    start, end = lines.start(block.first), int(lines.ends[block.end - 1])
    previous.seek(start)
    while start < end:
        data = previous.read(min(end - start, _WRITE_BUFFER))
        if not data:
            raise ValueError("it was truncated while it was read")
        out.write(data)
        start += len(data)
    if not data.endswith(b"\n"):
        raise ValueError("a line of its line map does not end there")


def _write_row(row: ExportRow, f: BinaryIO, lengths: Lengths | None) -> None:
    line = _jsonl_line(row)
    f.write(line)
    if lengths is not None:
        lengths.line(len(line))


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
    rows: Iterable[ExportRow | list[str] | Block],
    output: Path,
    fmt: str,
    *,
    tick: Callable[[int], None] = lambda n: None,
    previous: Path | None = None,
    load: Callable[[str], ExportRow] | None = None,
    lines: LineMap | None = None,
    lengths: Lengths | None = None,
) -> int:
    """Write rows to output atomically; return the number of records written.

    With previous (jsonl only: an index this module wrote in JSONL_LAYOUT), rows may hold,
    in the same path order, records that did not change since previous was written, whose
    lines are copied from it: blocks of its lines (lines: its line map), or lists of their
    paths (found by path; load gives the row of such a path if previous lacks it).
    lengths (jsonl): collects the length of every line written, for the new line map.
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
                    count = _write_jsonl_reusing(rows, f, tick, previous=old, load=load, lines=lines,
                                                 lengths=lengths)
            elif fmt == "jsonl":
                count = _write_jsonl(rows, f, tick, lengths)  # type: ignore[arg-type]
            else:
                count = _write_pkl(rows, f, tick)  # type: ignore[arg-type]
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


