"""SigLIP 2's vision embeddings in numpy: the patch embedding (a linear map of each patch's
pixels) plus the learned grid of position embeddings resized to each image's grid of
patches, computed as transformers' Siglip2VisionEmbeddings computes them.

The OpenVINO backend runs the rest of the tower (openvino_vision.py). With this part in
numpy and its three tensors read straight from the checkpoint's safetensors, a run whose
converted tower is in the cache imports neither torch nor transformers.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from . import model_files

# Where a checkpoint keeps the tensors: the full model and the vision tower alone both
# under vision_model.; a bare tower's state dict without it.
PREFIXES = ("vision_model.embeddings.", "embeddings.")
NAMES = ("patch_embedding.weight", "patch_embedding.bias", "position_embedding.weight")
# Resized position grids kept, by image shape: a collection has few aspect ratios.
KEPT_SHAPES = 8


class VisionEmbeddings:
    """(n, P, K) float32 patch pixels and the (n, 2) patch grid of each image -> (n, P, D)
    embedded patches; positions past an image's patches get its first position."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, positions: np.ndarray) -> None:
        grid = math.isqrt(len(positions))
        if weight.ndim != 2 or bias.shape != weight.shape[:1] or positions.ndim != 2 \
                or positions.shape[1] != weight.shape[0] or grid * grid != len(positions):
            raise ValueError(f"vision embeddings of unexpected shapes {weight.shape}, {bias.shape}, {positions.shape}")
        self.weight_t = np.ascontiguousarray(weight.T, dtype=np.float32)  # (K, D): x @ W.T, as nn.Linear
        self.bias = np.asarray(bias, dtype=np.float32)
        self.positions = np.asarray(positions, dtype=np.float32)  # (grid * grid, D)
        self.grid = grid
        self._resized: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, name: str) -> VisionEmbeddings | None:
        """The three tensors read from the checkpoint's safetensors (nothing else of it is
        read); None where it has no such tensors on disk. ValueError or OSError for a file
        that cannot be read."""
        found = _find(model_files.tensors(name, PREFIXES))
        if found is None:
            return None
        return cls(*(model_files.read_tensor(found[n]) for n in NAMES))

    @classmethod
    def from_module(cls, module: Any) -> VisionEmbeddings:
        """Copies of a loaded Siglip2VisionEmbeddings module's weights."""
        state = {k: v.detach().float().cpu().numpy().copy() for k, v in module.state_dict().items()}
        return cls(*(state[n] for n in NAMES))

    def __call__(self, pixels: np.ndarray, shapes: np.ndarray) -> np.ndarray:
        n, length, values = pixels.shape
        out = (pixels.reshape(-1, values).astype(np.float32, copy=False) @ self.weight_t).reshape(n, length, -1)
        out += self.bias
        for i, (h, w) in enumerate(np.asarray(shapes).tolist()):
            out[i] += self._positions(int(h), int(w), length)
        return out

    def _positions(self, h: int, w: int, length: int) -> np.ndarray:
        key = (h, w, length)
        with self._lock:
            found = self._resized.get(key)
            if found is not None:
                self._resized.move_to_end(key)
                return found
        found = resize_weights(self.grid, h, w, length) @ self.positions
        with self._lock:
            self._resized[key] = found
            if len(self._resized) > KEPT_SHAPES:
                self._resized.popitem(last=False)
        return found


def embedding_width(name: str) -> int | None:
    """D, the width of the embedded patches (and of the pooled vector), from the tensors'
    headers alone; None where the checkpoint's safetensors do not have them."""
    try:
        found = _find(model_files.tensors(name, PREFIXES))
    except (OSError, ValueError):
        return None
    if found is None or len(found["patch_embedding.bias"].shape) != 1:
        return None
    return found["patch_embedding.bias"].shape[0]


def _find(infos: dict[str, model_files.TensorInfo]) -> dict[str, model_files.TensorInfo] | None:
    """The three tensors by their short names, under the first prefix that has them all."""
    for prefix in PREFIXES:
        found = {n: infos[prefix + n] for n in NAMES if prefix + n in infos}
        if len(found) == len(NAMES):
            return found
    return None


def resize_weights(grid: int, h: int, w: int, length: int) -> np.ndarray:
    """(length, grid * grid): each output position's weights over the position grid, those
    of F.interpolate(mode="bilinear", align_corners=False, antialias=True) to h x w along
    each axis, in float32 as transformers computes them; positions from h * w on take
    position 0's."""
    positions = np.arange(length, dtype=np.float32)
    sizes = np.array([h, w], dtype=np.float32)
    rows = np.floor(positions / sizes[1])
    index = np.stack([rows, positions - rows * sizes[1]], axis=-1)
    index *= (positions < sizes[0] * sizes[1])[:, None]
    scale = np.float32(grid) / sizes
    support = np.maximum(scale, np.float32(1))
    center = (index + np.float32(0.5)) * scale - np.float32(0.5)  # (length, 2)
    source = np.arange(grid, dtype=np.float32)
    weights = np.clip(1 - np.abs(source - center[..., None]) / support[:, None], 0, None)  # (length, 2, grid)
    weights /= weights.sum(-1, keepdims=True)
    return (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(length, grid * grid)
