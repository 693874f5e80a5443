"""The last steps of SigLIP 2's naflex image processor, done on a batch of images that the
decode workers already resized: patching, padding, rescaling and normalising."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


class PatchSpec:
    """What is left of SigLIP 2's naflex processor once an image is at its target size.

    The processor resizes (done by the decode workers already), rescales, normalises,
    cuts 16x16 patches and pads to max_num_patches. Patching and padding are a reshape of
    the uint8 pixels; rescale and normalise are one affine map per channel, applied on the
    device to the whole batch. On a GPU that main-process step was the bound: the processor
    ran at about 76 images/s next to 16 busy decode workers, against the model's 2,000.
    """

    def __init__(self, patch: int, max_patches: int, rescale: float, mean: Sequence[float], std: Sequence[float]):
        self.patch = patch
        self.max_patches = max_patches
        self.rescale = float(rescale)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    @classmethod
    def of(cls, processor: Any) -> PatchSpec | None:
        """The spec of a SigLIP 2 naflex processor whose steps are the standard ones; None for
        anything else, which then goes through the processor itself."""
        return cls._from(type(processor).__name__, lambda name: getattr(processor, name, None))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PatchSpec | None:
        """The spec of a checkpoint's preprocessor_config.json, read without transformers:
        only one that names a SigLIP 2 processor and spells out every step (a key left to
        the processor's defaults is left to the processor itself)."""
        needed = ("do_rescale", "do_normalize", "image_mean", "image_std", "rescale_factor", "patch_size",
                  "max_num_patches", "resample")
        if not all(config.get(key) is not None for key in needed):
            return None
        try:
            return cls._from(str(config.get("image_processor_type") or ""), config.get)
        except (TypeError, ValueError):  # a value of the wrong kind: the processor says what is wrong
            return None

    @classmethod
    def _from(cls, kind: str, get: Any) -> PatchSpec | None:
        if not kind.startswith("Siglip2ImageProcessor"):
            return None
        if not (get("do_rescale") and get("do_normalize") and get("do_resize") is not False):
            return None
        mean, std = get("image_mean"), get("image_std")
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) == 3):
            return None
        if int(get("resample") if get("resample") is not None else 2) != 2:  # PIL BILINEAR, as decode.prepare
            return None
        return cls(int(get("patch_size") or 16), int(get("max_num_patches") or 256), get("rescale_factor") or 1 / 255,
                   mean, std)

    def fits(self, pixels: np.ndarray) -> bool:
        """Whether pixels are at the size the processor resizes them to (its resize is then
        the identity, which is what decode.prepare's output is)."""
        from .images import naflex_size

        if pixels.ndim != 3 or pixels.shape[2] != 3:
            return False
        h, w = pixels.shape[:2]
        return naflex_size(h, w, patch_size=self.patch, max_num_patches=self.max_patches) == (h, w)

    def pack(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 (H, W, 3) arrays -> the processor's three inputs as numpy arrays, pixel
        values still uint8."""
        import numpy as np

        p, n = self.patch, len(arrays)
        values = np.zeros((n, self.max_patches, p * p * 3), dtype=np.uint8)
        mask = np.zeros((n, self.max_patches), dtype=np.int32)
        shapes = np.zeros((n, 2), dtype=np.int64)
        for i, a in enumerate(arrays):
            h, w = a.shape[0] // p, a.shape[1] // p
            # (H, W, C) -> (h, w, p, p, C) -> rows of p*p*C: the processor's patch layout.
            values[i, : h * w] = a.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
            mask[i, : h * w] = 1
            shapes[i] = (h, w)
        return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def normalize(self, values: Any, mask: Any) -> Any:
        """uint8 patches -> float32 as the processor makes them: x * rescale, minus mean, over
        std, per channel (channels are the fastest-varying axis of a patch row); padding 0.
        numpy arrays give a numpy array; torch tensors a tensor, on their device."""
        import numpy as np

        d = values.shape[-1]
        if isinstance(values, np.ndarray):
            mean = np.tile(np.asarray(self.mean, dtype=np.float32), d // 3)
            std = np.tile(np.asarray(self.std, dtype=np.float32), d // 3)
            x = (values.astype(np.float32) * np.float32(self.rescale) - mean) / std
            return x * np.asarray(mask, dtype=np.float32)[..., None]
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device).repeat(d // 3)
        std = torch.tensor(self.std, dtype=torch.float32, device=values.device).repeat(d // 3)
        x = (values.to(torch.float32) * self.rescale - mean) / std
        return x * mask.unsqueeze(-1).to(x.dtype)
