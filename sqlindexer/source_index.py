"""Read an existing index file (ours or the original tool's, jsonl or pkl) for --source-index."""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .config import absolute
from .errors import SourceIndexError
from .state import Imported


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without importing anything: dict, list, str, int,
    float, bool and None, and the inert containers tuple, bytes, bytearray, set and
    frozenset (their opcodes build them directly; they hold data and nothing callable).
    Every class or function reference (GLOBAL, STACK_GLOBAL, INST, registered extension
    codes) goes through find_class and is refused, and persistent ids and out-of-band
    buffers are refused by pickle itself, so a crafted file cannot run code: REDUCE, BUILD
    and NEWOBJ have nothing callable to call."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain values are accepted")


def detect_format(path: Path) -> str:
    """'jsonl' or 'pkl', from the content: a JSON line starts with '{', a pickle with its
    protocol opcode (or '(' / '}' / ']' for the old text protocols)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        return "empty"
    if head[:1] == b"{":
        return "jsonl"
    if head[:1] in (b"\x80", b"(", b"}", b"]"):
        return "pkl"
    raise SourceIndexError(f"source index {path} is neither a jsonl nor a pkl index")


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, raw record) for every record in the file, 1-based."""
    fmt = detect_format(path)
    if fmt == "empty":
        return
    if fmt == "jsonl":
        with open(path, "rb") as f:
            n = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n += 1
                try:
                    yield n, json.loads(line)
                except RecursionError:
                    raise SourceIndexError(f"source index {path}, line {lineno}: not valid JSON (nested too deeply)") \
                        from None
                except ValueError as e:  # bad JSON, bad UTF-8, an integer of thousands of digits
                    raise SourceIndexError(f"source index {path}, line {lineno}: not valid JSON ({e})") from None
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = 0
        while True:
            start = f.tell()
            if start >= size:
                return
            try:
                obj = _RestrictedUnpickler(f).load()
            except EOFError:
                raise SourceIndexError(f"source index {path}: truncated after record {n}") from None
            except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                    MemoryError, OverflowError, UnicodeDecodeError, RecursionError) as e:
                why = " ".join(str(e).split()) or type(e).__name__  # pickle's own messages span lines
                raise SourceIndexError(f"source index {path}: record {n + 1} is not a plain pickled record: {why}") \
                    from None
            # Some writers pickle the whole list of records in one dump.
            if isinstance(obj, list):
                for item in obj:
                    n += 1
                    yield n, item
            else:
                n += 1
                yield n, obj


def parse_time(value: Any) -> float:
    """Seconds since the epoch from an ISO 8601 string (naive = local time, as written)."""
    if not isinstance(value, str):
        raise ValueError("not a string")
    return datetime.fromisoformat(value).timestamp()


def _foreign(path: Path, n: int, why: str) -> SourceIndexError:
    return SourceIndexError(f"source index {path}, record {n}: {why}; not an image-indexer index")


def matching_records(path: Path, *, expected_dim: int | None) -> Iterator[Imported]:
    """Records whose file still exists with the size and modification time they record.

    Every record is validated, matching or not: a record that does not have the layout of
    an image-indexer index makes the whole file refused, so a foreign file is never taken
    for an empty index.
    """
    dim = expected_dim
    for n, rec in read_records(path):
        meta, arr, size, mtime = _checked(path, n, rec)
        if dim is None:
            dim = len(arr)
        elif len(arr) != dim:
            raise SourceIndexError(
                f"source index {path}, record {n}: vector has {len(arr)} values, expected {dim} "
                "(an index of another model?)"
            )
        # Relative paths (written by the original tool from a relative -i) are taken
        # relative to the current directory, as that tool wrote them.
        file_path = str(absolute(meta["path"]))
        try:
            file_path.encode("utf-8")  # the scan skips names that are not UTF-8: so does the import
            st = os.stat(file_path)
        except (OSError, ValueError):
            continue
        # The record keeps microseconds at best; anything closer than 2 us is the same time.
        if st.st_size != size or abs(st.st_mtime_ns / 1e9 - mtime) > 2e-6:
            continue
        exif = meta.get("exif")
        try:
            exif = _json_safe(exif) if isinstance(exif, dict) else {}
        except _Unfit as e:
            raise _foreign(path, n, str(e)) from None
        yield Imported(path=file_path, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                       vector=arr.tobytes(), dim=len(arr), width=_dimension(meta.get("width")),
                       height=_dimension(meta.get("height")), exif=exif)


def _checked(path: Path, n: int, rec: Any) -> tuple[dict[str, Any], np.ndarray, int, float]:
    """(metadata, vector as float32, size, mtime in seconds) of record n, or a
    SourceIndexError naming what does not fit an image-indexer record."""
    if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict) or "vector" not in rec:
        raise _foreign(path, n, "it has no 'vector' and 'metadata'")
    meta = rec["metadata"]
    vec = rec["vector"]
    if not isinstance(vec, (list, tuple)) or not vec or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec
    ):
        raise _foreign(path, n, "'vector' is not a list of numbers")
    p = meta.get("path")
    size = meta.get("size_bytes")
    if not isinstance(p, str) or not p:
        raise _foreign(path, n, "metadata.path is missing")
    if isinstance(size, bool) or not isinstance(size, int):
        raise _foreign(path, n, "metadata.size_bytes is not an integer")
    try:
        mtime = parse_time(meta.get("modification_time"))
    except (ValueError, TypeError, OverflowError, OSError):
        raise _foreign(path, n, "metadata.modification_time is not an ISO 8601 time") from None
    try:
        with np.errstate(over="ignore"):
            arr = np.asarray(vec, dtype="<f4")
    except (OverflowError, ValueError):  # an integer too large for any float
        raise _foreign(path, n, "'vector' holds a number out of range") from None
    if not np.isfinite(arr).all():
        raise _foreign(path, n, "vector holds NaN or infinity")
    return meta, arr, size, mtime


def _dimension(value: Any) -> int | None:
    """A width or height as recorded, or None when it is not a plausible one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31:
        return value
    return None


# A record's EXIF is copied into the database, so it is copied with bounds: a pickle can
# share one object many times (a list of nine references to a list of nine references to
# ...: a billion values in a few hundred bytes) or contain itself.
MAX_EXIF_VALUES = 100_000
MAX_EXIF_DEPTH = 32
_INT64 = 1 << 63


class _Unfit(ValueError):
    """An EXIF value that no image-indexer (or the original tool) ever wrote."""


def _json_safe(value: Any) -> Any:
    """The original tool stored EXIF values as Python text where JSON could not hold them;
    keep what JSON can hold and make the rest text. Raises _Unfit past the bounds above."""
    count = 0

    def key(k: Any) -> str:
        if isinstance(k, str):
            return _text(k)
        if isinstance(k, (bytes, bytearray)):
            return bytes(k).decode("utf-8", "replace").replace("\x00", "")
        if isinstance(k, int) and not -_INT64 <= k < _INT64:
            raise _Unfit("metadata.exif holds an integer out of range")
        if k is None or isinstance(k, (int, float)):
            return str(k)
        raise _Unfit(f"metadata.exif has a key that is a {type(k).__name__}")

    def copy(v: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > MAX_EXIF_VALUES:
            raise _Unfit(f"metadata.exif holds more than {MAX_EXIF_VALUES} values")
        if depth > MAX_EXIF_DEPTH:
            raise _Unfit(f"metadata.exif is nested more than {MAX_EXIF_DEPTH} levels deep")
        if isinstance(v, dict):
            return {key(k): copy(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return [copy(x, depth + 1) for x in v]
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, int) and not isinstance(v, bool) and not -_INT64 <= v < _INT64:
            raise _Unfit("metadata.exif holds an integer out of range")
        if isinstance(v, str):
            return _text(v)
        if v is None or isinstance(v, (int, bool)):
            return v
        if isinstance(v, (bytes, bytearray)):
            return bytes(v).decode("utf-8", "replace").replace("\x00", "")
        return str(v)

    return copy(value, 0)


def _text(s: str) -> str:
    """s, with lone surrogates (which pickle and JSON escapes can hold, and UTF-8 cannot)
    replaced."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")
    return s
