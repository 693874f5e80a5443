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

import json
import logging
import os
import pickle
import stat
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from .errors import ExportError
from .state import ExportRow

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "pkl")
# The form of a jsonl line as _jsonl_line writes it. Lines are copied from an index only if
# it was written in this form: bump it whenever a record is written differently.
JSONL_LAYOUT = 1
_WRITE_BUFFER = 1 << 20
_PATH_KEY = b',"metadata":{"path":"'


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
    # back to the same float32: about 25x faster than json.dumps of a list, and half the
    # bytes. exif is already JSON in the database: spliced in, not re-parsed.
    vec = orjson.dumps(np.frombuffer(row.embedding, dtype="<f4", count=row.dim), option=orjson.OPT_SERIALIZE_NUMPY)
    meta = orjson.dumps(metadata(row, exif=None))
    return (b'{"vector":' + vec + b',"metadata":' + meta[: -len(b"null}")] + (row.exif or "{}").encode("utf-8")
            + b"}}\n")


def _write_jsonl_reusing(entries: Iterable[ExportRow | str], f: BinaryIO, tick: Callable[[int], None], *,
                         previous: BinaryIO, load: Callable[[str], ExportRow]) -> int:
    """Write entries, copying the line of each unchanged one (a path) from previous.

    Both are in path order, so previous is read once, side by side: its lines for paths
    that are no longer exported, or changed, are passed over. An unchanged path without a
    line there (which the caller's bookkeeping rules out) is loaded and written afresh.
    """
    old = _lines_by_path(previous)
    current = next(old, None)
    n = copied = 0
    for entry in entries:
        if isinstance(entry, str):
            while current is not None and current[0] < entry:
                current = next(old, None)
            if current is not None and current[0] == entry:
                line = current[1]
                copied += 1
                current = next(old, None)
            else:
                log.debug("no line for %s in the last export; writing it afresh", entry)
                line = _jsonl_line(load(entry))
        else:
            line = _jsonl_line(entry)
        f.write(line)
        n += 1
        tick(1)
    log.debug("copied %d of %d records from the last export", copied, n)
    return n


def _lines_by_path(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(path, line) of each line of a jsonl index that _jsonl_line wrote."""
    for line in f:
        start = line.find(_PATH_KEY)
        if start < 0 or not line.endswith(b"\n"):
            raise ValueError("not a line of this layout")
        start += len(_PATH_KEY)
        raw = line[start : line.find(b'"', start)]
        # A path with a quote, a backslash or a control character is escaped: parse it.
        yield (raw.decode("utf-8") if b"\\" not in raw else json.loads(line)["metadata"]["path"]), line


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
    rows: Iterable[ExportRow | str],
    output: Path,
    fmt: str,
    *,
    tick: Callable[[int], None] = lambda n: None,
    previous: Path | None = None,
    load: Callable[[str], ExportRow] | None = None,
) -> int:
    """Write rows to output atomically; return the number of records written.

    With previous (jsonl only: an index this module wrote in JSONL_LAYOUT), rows may hold
    paths instead of rows: records that did not change since previous was written, whose
    lines are copied from it. load gives the row of such a path if previous lacks it.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown output format {fmt!r} (use jsonl or pkl)")
    output = Path(output)
    tmp = tmp_path(output)
    try:
        # A .tmp left by a crash is never read as the index, only replaced. Unlinking a
        # planted symlink removes the link, and O_EXCL then refuses to follow a new one.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise ExportError(f"cannot create {tmp}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb", buffering=_WRITE_BUFFER) as f:
            _keep_mode(f.fileno(), output)
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
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {output}: {e.strerror or e}") from None
        raise
    _fsync_dir(output.parent)
    return count


def _keep_mode(fd: int, output: Path) -> None:
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
