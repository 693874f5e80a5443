"""SigLIP 2 image embeddings through Hugging Face transformers.

torch and transformers are imported only when a model is actually loaded, so runs with
nothing to embed (and --help) never pay for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import DeviceError, ModelLoadError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

# The vision tower alone is a quarter of the full checkpoint's weights; the text tower is
# only needed to embed text queries.
_VISION_ONLY = {"siglip2": "Siglip2VisionModel", "siglip": "SiglipVisionModel"}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports (e.g. the table of unused text weights) and progress bars."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def resolve_device(requested: str) -> str:
    """auto -> cuda, then mps, then cpu; a device asked for by name must exist."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA GPU (use --device auto or cpu)")
    if requested == "mps" and not mps:
        raise DeviceError("--device mps was asked for, but this torch build has no MPS backend")
    return requested


def _resolve_dtype(requested: str, device: str | None) -> Any:
    """auto: bfloat16 on CUDA GPUs that support it, else float16 on CUDA; float32 elsewhere
    (on CPUs without AMX/AVX512-BF16, bfloat16 is several times slower than float32)."""
    import torch

    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, requested)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name"; anything absolute, relative-dotted or home-based is a folder.
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.sep + os.sep in name


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


DTYPES = ("auto", "float32", "float16", "bfloat16")


class Embedder:
    """Loads the model once and embeds batches of upright RGB images.

    Loading has two stages: prepare() reads the config and the image processor (fast; it
    gives the input geometry and the vector size, so decoding can start), load() the
    weights (slow; it may run in a background thread while the first images decode).
    """

    def __init__(self, model_name: str, *, device: str = "auto", dtype: str = "auto") -> None:
        self.model_name = model_name
        self.requested_device = device
        self.requested_dtype = dtype
        self.device: str | None = None
        self.dim: int | None = None
        self.dtype: Any = None
        self._config: Any = None
        self._model: Any = None
        self._processor: Any = None
        self._vision_only = False

    # -- loading -----------------------------------------------------------------------
    def prepare(self) -> Embedder:
        """Resolve the device, read the model's config and image processor."""
        if self._processor is not None:
            return self
        import transformers

        self.device = resolve_device(self.requested_device)
        name = self.model_name
        if _looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise ModelLoadError(f"cannot load model {name!r}: no such folder")
        with _quiet_transformers():
            try:
                config = transformers.AutoConfig.from_pretrained(name)
                processor = transformers.AutoImageProcessor.from_pretrained(name)
            except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
                raise ModelLoadError(f"cannot load model {name!r}: {_one_line(e)}") from None
        self._config = config
        vision = getattr(config, "vision_config", config)
        # SigLIP's image embedding is the vision tower's pooled output: hidden_size wide.
        self.dim = int(getattr(config, "projection_dim", None) or vision.hidden_size)
        self._processor = processor
        return self

    def load(self) -> Embedder:
        """Load the weights (after prepare()); safe to call again."""
        if self._model is not None:
            return self
        self.prepare()
        import torch
        import transformers

        name, config = self.model_name, self._config
        with _quiet_transformers():
            try:
                cls_name = _VISION_ONLY.get(getattr(config, "model_type", ""))
                if cls_name and hasattr(transformers, cls_name):
                    model = getattr(transformers, cls_name).from_pretrained(name)
                    self._vision_only = True
                elif getattr(config, "model_type", "").endswith("_vision_model"):
                    model = transformers.AutoModel.from_pretrained(name)
                    self._vision_only = True
                else:
                    model = transformers.AutoModel.from_pretrained(name)
                    if not hasattr(model, "get_image_features"):
                        raise ModelLoadError(f"model {name!r} has no image tower (get_image_features)")
            except ModelLoadError:
                raise
            except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
                raise ModelLoadError(f"cannot load model {name!r}: {_one_line(e)}") from None
        self.dtype = _resolve_dtype(self.requested_dtype, self.device)
        model.to(device=self.device, dtype=self.dtype)
        model.eval()
        self._model = model
        log.info("loaded %s on %s (%s)", name, self.device, str(self.dtype).replace("torch.", ""))
        return self

    @property
    def patch_size(self) -> int:
        return int(getattr(self._processor, "patch_size", 16) or 16)

    @property
    def max_num_patches(self) -> int:
        return int(getattr(self._processor, "max_num_patches", 256) or 256)

    # -- inference ---------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """The model's own processor on upright RGB images."""
        self.prepare()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(self._processor(images=list(images), return_tensors="pt"))

    def embed_pixels(self, inputs: dict[str, Any]) -> np.ndarray:
        """Forward pass on processor output -> (n, dim) float32, L2-normalised."""
        import torch

        self.load()
        moved = {}
        for key, value in inputs.items():
            if self.device == "cuda":
                # Page-locked host memory lets the copy run asynchronously to the GPU.
                value = value.pin_memory()
            value = value.to(self.device, non_blocking=True)
            moved[key] = value.to(self.dtype) if value.is_floating_point() else value
        with torch.inference_mode():
            if self._vision_only:
                out = self._model(**moved)
            else:
                out = self._model.get_image_features(**moved)
            # transformers 5 returns an output object, 4.x returned the tensor itself.
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            features = features.float()
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype("<f4", copy=False)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_pixels(self.preprocess(images))
