"""A checkpoint's files on disk, read without transformers or torch: where they are (a
local folder, or a hub snapshot already in the cache, never downloaded here), their
identity, their JSON configs, and single tensors (or rows of one) of their safetensors
weights.

A warm OpenVINO run needs nothing more of the checkpoint than this (embed.py, and
openvino_text.py for a text query), so it imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")

# safetensors dtype names -> (numpy dtype, bytes per value); bfloat16 has no numpy type and
# is widened by hand (its bits are a float32's upper half).
_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
# A header larger than this is not a safetensors file (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


def local_file(name: str, file: str) -> str | None:
    """The path of one of the checkpoint's files: in a local folder, or in the hub's cache
    (never downloaded here); None where it is not on disk."""
    if os.path.isdir(os.path.expanduser(name)):
        path = os.path.join(os.path.expanduser(name), file)
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, file)
            path = found if isinstance(found, str) else ""
        except Exception:  # noqa: BLE001 - not a hub id
            path = ""
    return path if path and os.path.isfile(path) else None


def has_safetensors(name: str) -> bool | None:
    """Whether the checkpoint has safetensors weights; None when that is not known before
    downloading."""
    if os.path.isdir(name):
        return any(os.path.isfile(os.path.join(name, f)) for f in SAFETENSORS)
    return True if any(local_file(name, f) for f in SAFETENSORS) else None


def read_json(name: str, file: str) -> dict[str, Any] | None:
    """One of the checkpoint's JSON files (config.json, preprocessor_config.json) as a
    dict; None where it is not on disk or not a JSON object."""
    path = local_file(name, file)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def weights_identity(name: str) -> str:
    """The checkpoint's weight files as "file size mtime_ns" lines (a local folder, or a hub
    snapshot in the cache, whose files are named by their content hash); "" where unknown."""
    return files_identity(name, (*SAFETENSORS, "pytorch_model.bin", "pytorch_model.bin.index.json", *shards(name)))


def files_identity(name: str, files: Sequence[str]) -> str:
    """Those of the checkpoint's files that are on disk, as "file size mtime_ns" lines."""
    lines = []
    for file in files:
        path = local_file(name, file)
        if path:
            real = Path(path).resolve()
            st = real.stat()
            lines.append(f"{real} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(lines)


def shards(name: str) -> list[str]:
    """The weight files a sharded checkpoint's index names: new weights in a shard leave
    the index as it was."""
    found: set[str] = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        value = read_json(name, index)
        if value is None:
            continue
        try:
            found.update(str(v) for v in value["weight_map"].values())
        except (KeyError, TypeError, AttributeError):
            pass  # an index that cannot be read: the load itself says so
    return sorted(found)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


def tensors(name: str, prefixes: tuple[str, ...]) -> dict[str, TensorInfo]:
    """The tensors whose names start with one of prefixes, in the checkpoint's safetensors
    file or the shards its index names; {} where it has none on disk. ValueError for a file
    that is not valid safetensors."""
    # The single file first, as transformers looks for them.
    single = local_file(name, "model.safetensors")
    index = None if single else read_json(name, "model.safetensors.index.json")
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError("model.safetensors.index.json has no weight_map")
        files = {shard for key, shard in weight_map.items() if key.startswith(prefixes)}
        paths = [local_file(name, str(shard)) for shard in sorted(files)]
        if not all(paths):
            return {}
    else:
        paths = [single] if single else []
    out: dict[str, TensorInfo] = {}
    for path in paths:
        out.update({k: v for k, v in read_header(str(path)).items() if k.startswith(prefixes)})
    return out


def read_header(path: str) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds: its header alone is read (8 bytes of length,
    then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
        size = os.fstat(f.fileno()).st_size
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not an object)")
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (8 + length + int(x) for x in entry["data_offsets"])
            info = TensorInfo(path, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), start, end)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if not 8 + length <= start <= end <= size:
            raise ValueError(f"{path}: tensor {key!r} lies outside the file")
        out[key] = info
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor's values as float32, read from its bytes alone (the file is not mapped:
    its pages would stay in the process's memory)."""
    import numpy as np

    width = _width(info)
    count = int(np.prod(info.shape, dtype=np.int64))
    if info.end - info.start != count * width:
        raise ValueError(f"{info.file}: a tensor's size does not match its shape {info.shape}")
    with open(info.file, "rb") as f:
        f.seek(info.start)
        data = f.read(info.end - info.start)
    if len(data) != count * width:
        raise ValueError(f"{info.file} ends inside a tensor")
    return _float32(data, info.dtype).reshape(info.shape)


def read_rows(info: TensorInfo, rows: Sequence[int]) -> np.ndarray:
    """Rows of a 2-D tensor as float32, (len(rows), width): each read from its own bytes
    alone, so a text's few tokens are looked up without reading a vocabulary's table."""
    width = _width(info)
    if len(info.shape) != 2:
        raise ValueError(f"{info.file}: a table of rows must be 2-D, not of shape {info.shape}")
    count, columns = info.shape
    step = columns * width
    if info.end - info.start != count * step:
        raise ValueError(f"{info.file}: a tensor's size does not match its shape {info.shape}")
    parts = []
    with open(info.file, "rb") as f:
        for row in rows:
            if not 0 <= row < count:
                raise ValueError(f"{info.file}: row {row} is outside a table of {count}")
            f.seek(info.start + row * step)
            data = f.read(step)
            if len(data) != step:
                raise ValueError(f"{info.file} ends inside a tensor")
            parts.append(data)
    return _float32(b"".join(parts), info.dtype).reshape(len(parts), columns)


def _width(info: TensorInfo) -> int:
    """Bytes per value of the tensor's dtype; ValueError for a dtype not read here."""
    if info.dtype not in _DTYPES:
        raise ValueError(f"{info.file}: tensors of dtype {info.dtype} are not read here")
    return _DTYPES[info.dtype][1]


def _float32(data: bytes, dtype: str) -> np.ndarray:
    import numpy as np

    values = np.frombuffer(data, dtype=_DTYPES[dtype][0])
    if dtype == "BF16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)
