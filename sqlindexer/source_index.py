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
    """Admits only what pickle builds without importing anything: dict, list, tuple, str,
    bytes, int, float, bool and None. Any class or function reference is refused, so a
    crafted file cannot run code."""

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
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
                raise SourceIndexError(f"source index {path}: record {n + 1} is not a plain pickled record: {e}") from None
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
        if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict) or "vector" not in rec:
            raise _foreign(path, n, "it has no 'vector' and 'metadata'")
        meta = rec["metadata"]
        vec = rec["vector"]
        if not isinstance(vec, (list, tuple)) or not vec or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec
        ):
            raise _foreign(path, n, "'vector' is not a list of numbers")
        if dim is None:
            dim = len(vec)
        elif len(vec) != dim:
            raise SourceIndexError(
                f"source index {path}, record {n}: vector has {len(vec)} values, expected {dim} "
                "(an index of another model?)"
            )
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
        arr = np.asarray(vec, dtype="<f4")
        if not np.isfinite(arr).all():
            raise _foreign(path, n, "vector holds NaN or infinity")
        # Relative paths (written by the original tool from a relative -i) are taken
        # relative to the current directory, as that tool wrote them.
        file_path = str(absolute(p))
        try:
            st = os.stat(file_path)
        except (OSError, ValueError):
            continue
        # The record keeps microseconds at best; anything closer than 2 us is the same time.
        if st.st_size != size or abs(st.st_mtime_ns / 1e9 - mtime) > 2e-6:
            continue
        width, height = meta.get("width"), meta.get("height")
        exif = meta.get("exif")
        yield Imported(
            path=file_path,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            vector=arr.tobytes(),
            dim=len(vec),
            width=width if isinstance(width, int) and not isinstance(width, bool) else None,
            height=height if isinstance(height, int) and not isinstance(height, bool) else None,
            exif=_json_safe(exif) if isinstance(exif, dict) else {},
        )


def _json_safe(value: Any) -> Any:
    """The original tool stored EXIF values as Python text where JSON could not hold them;
    keep what JSON can hold and make the rest text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").replace("\x00", "")
    return str(value)
