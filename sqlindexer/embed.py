"""SigLIP 2 image embeddings through Hugging Face transformers.

torch and transformers are imported only when a model is actually loaded, so runs with
nothing to embed (and --help) never pay for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
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
# Likewise the text tower alone, for text queries (its pooled output is get_text_features).
_TEXT_ONLY = {"siglip2": "Siglip2TextModel", "siglip": "SiglipTextModel"}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load reports (e.g. the table of unused text weights), the hub client's
    warnings (a line per retry of a download that then fails) and progress bars: what
    goes wrong ends in our one line. Both libraries set their loggers' levels when they
    are imported, after the CLI has set its own, so they are set here."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    levels = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
        if bars:  # bars turned off before (HF_HUB_DISABLE_PROGRESS_BARS) stay off
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


_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def _has_safetensors(name: str) -> bool | None:
    """Whether the checkpoint (a local folder, or a hub snapshot already in the cache) has
    safetensors weights; None when that is not known before downloading."""
    if os.path.isdir(name):
        return any(os.path.isfile(os.path.join(name, f)) for f in _SAFETENSORS)
    try:
        from huggingface_hub import try_to_load_from_cache

        return True if any(isinstance(try_to_load_from_cache(name, f), str) for f in _SAFETENSORS) else None
    except Exception:  # noqa: BLE001 - not a valid hub id: from_pretrained says why
        return None


def _weights_options(name: str) -> dict[str, Any]:
    """from_pretrained options that keep a checkpoint from running code: never the
    checkpoint's own Python (trust_remote_code), safetensors whenever it has them (plain
    tensors, no pickle), and for a checkpoint with only pickle weights (pytorch_model.bin)
    torch's weights_only unpickler, which admits tensors and plain containers and refuses
    any other global. (None leaves transformers to try safetensors first, then .bin.)"""
    has_safetensors = _has_safetensors(name)
    if has_safetensors is False:
        log.info("%s has no safetensors weights: reading its pickle weights with torch's weights_only unpickler",
                 name)
    return {"trust_remote_code": False, "use_safetensors": has_safetensors, "weights_only": True}


def _load_error(name: str, e: Exception) -> ModelLoadError:
    """One line naming the checkpoint, for any failure to load its weights."""
    if isinstance(e, ModelLoadError):
        return e
    if isinstance(e, pickle.UnpicklingError):
        return ModelLoadError(f"cannot load model {name!r}: its pickle weights file was refused by torch's "
                              f"weights_only unpickler ({_unpickling_detail(e)})")
    return ModelLoadError(f"cannot load model {name!r}: {_one_line(e)}")


def _unpickling_detail(e: BaseException) -> str:
    # torch's message opens with advice to retry with weights_only=False; the line that
    # names what was refused is further down.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith(("Trying", "Unsupported")):
            return line.rstrip(".")
    return lines[0].rstrip(".") if lines else type(e).__name__


DTYPES = ("auto", "float32", "float16", "bfloat16")
CPU_CHUNK = 8


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
        get = lambda name: getattr(processor, name, None)  # noqa: E731
        if not type(processor).__name__.startswith("Siglip2ImageProcessor"):
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

    def pack(self, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
        """uint8 (H, W, 3) arrays -> the processor's three inputs, pixel values still uint8."""
        import numpy as np
        import torch

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
        return {"pixel_values": torch.from_numpy(values), "pixel_attention_mask": torch.from_numpy(mask),
                "spatial_shapes": torch.from_numpy(shapes)}

    def normalize(self, values: Any, mask: Any) -> Any:
        """uint8 patches -> float32 as the processor makes them: x * rescale, minus mean, over
        std, per channel (channels are the fastest-varying axis of a patch row); padding 0."""
        import torch

        d = values.shape[-1]
        mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device).repeat(d // 3)
        std = torch.tensor(self.std, dtype=torch.float32, device=values.device).repeat(d // 3)
        x = (values.to(torch.float32) * self.rescale - mean) / std
        return x * mask.unsqueeze(-1).to(x.dtype)


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
        self._loading = threading.Lock()

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
        with quiet_transformers():
            try:
                config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
                processor = transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
                raise ModelLoadError(f"cannot load model {name!r}: {_one_line(e)}") from None
        self._config = config
        vision = getattr(config, "vision_config", config)
        # SigLIP's image embedding is the vision tower's pooled output: hidden_size wide.
        self.dim = int(getattr(config, "projection_dim", None) or vision.hidden_size)
        self._processor = processor
        return self

    def load(self) -> Embedder:
        """Load the weights (after prepare()); safe to call again, from any thread: a call
        while another thread loads waits for that load."""
        with self._loading:
            return self._load()

    def _load(self) -> Embedder:
        if self._model is not None:
            return self
        self.prepare()
        import torch
        import transformers

        name, config = self.model_name, self._config
        with quiet_transformers():
            try:
                options = _weights_options(name)
                cls_name = _VISION_ONLY.get(getattr(config, "model_type", ""))
                if cls_name and hasattr(transformers, cls_name):
                    model = getattr(transformers, cls_name).from_pretrained(name, **options)
                    self._vision_only = True
                elif getattr(config, "model_type", "").endswith("_vision_model"):
                    model = transformers.AutoModel.from_pretrained(name, **options)
                    self._vision_only = True
                else:
                    model = transformers.AutoModel.from_pretrained(name, **options)
                    if not hasattr(model, "get_image_features"):
                        raise ModelLoadError(f"model {name!r} has no image tower (get_image_features)")
            except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
                raise _load_error(name, e) from None
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

    def embed_resized(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Upright RGB uint8 arrays already at the processor's target size (decode.prepare
        makes them) -> (n, dim) vectors, the processor's last steps done by PatchSpec; any
        other processor, or an array not at a target size, goes through embed_images."""
        self.prepare()
        spec = self._patch_spec
        if spec is None or not all(spec.fits(a) for a in arrays):
            from PIL import Image

            return self.embed_images([Image.fromarray(a, "RGB") for a in arrays])
        return self.embed_pixels(spec.pack(arrays), spec=spec)

    @property
    def _patch_spec(self) -> PatchSpec | None:
        if not hasattr(self, "_spec"):
            self._spec = PatchSpec.of(self._processor)
        return self._spec

    def embed_pixels(self, inputs: dict[str, Any], *, spec: PatchSpec | None = None) -> np.ndarray:
        """Forward pass on processor output -> (n, dim) float32, L2-normalised. With spec,
        pixel_values are PatchSpec.pack's uint8 patches (a quarter of the bytes to copy),
        normalised on the device."""
        import torch

        self.load()
        moved = {}
        for key, value in inputs.items():
            if self.device == "cuda":
                # Page-locked host memory lets the copy run asynchronously to the GPU.
                value = value.pin_memory()
            moved[key] = value.to(self.device, non_blocking=True)
        if spec is not None:
            moved["pixel_values"] = spec.normalize(moved["pixel_values"], moved["pixel_attention_mask"])
        for key, value in moved.items():
            moved[key] = value.to(self.dtype) if value.is_floating_point() else value
        n = len(next(iter(moved.values())))
        # On a CPU the forward pass is fastest in small chunks (measured on the base shape,
        # 2 cores: 3.1 images/s at 4-8 images, 1.6-2.4 at 32): the activations of a large
        # batch fall out of cache. A GPU takes the whole batch at once.
        step = CPU_CHUNK if self.device == "cpu" else n
        parts = []
        with torch.inference_mode():
            for i in range(0, n, step):
                chunk = {k: v[i : i + step] for k, v in moved.items()}
                if self._vision_only:
                    out = self._model(**chunk)
                else:
                    out = self._model.get_image_features(**chunk)
                # transformers 5 returns an output object, 4.x returned the tensor itself.
                parts.append(out.pooler_output if hasattr(out, "pooler_output") else out)
            features = torch.cat(parts).float()
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype("<f4", copy=False)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_pixels(self.preprocess(images))

    # -- text queries ------------------------------------------------------------------
    # The text tower and its tokenizer are loaded only when a text is embedded (search).
    _text_model: Any = None
    _tokenizer: Any = None
    _text_only = False
    TEXT_LENGTH = 64

    def load_text(self) -> Embedder:
        """Load the tokenizer and the text tower; safe to call again."""
        if self._text_model is not None:
            return self
        import transformers

        name = self.model_name
        if _looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise ModelLoadError(f"cannot load model {name!r}: no such folder")
        self.device = self.device or resolve_device(self.requested_device)
        with quiet_transformers():
            try:
                config = self._config or transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
                tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
                raise ModelLoadError(f"cannot load the tokenizer of model {name!r}: {_one_line(e)}") from None
            try:
                options = _weights_options(name)
                cls_name = _TEXT_ONLY.get(getattr(config, "model_type", ""))
                if cls_name and hasattr(transformers, cls_name):
                    model = getattr(transformers, cls_name).from_pretrained(name, **options)
                    text_only = True
                else:
                    model = transformers.AutoModel.from_pretrained(name, **options)
                    if not hasattr(model, "get_text_features"):
                        raise ModelLoadError(f"model {name!r} has no text tower (get_text_features)")
                    text_only = False
            except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
                raise _load_error(name, e) from None
        model.to(device=self.device, dtype=_resolve_dtype(self.requested_dtype, self.device))
        model.eval()
        # SigLIP 2 pads on the right (the checkpoints' tokenizer config says so; some
        # tokenizer classes default to the left): the text must sit at the positions it
        # was trained at.
        tokenizer.padding_side = "right"
        self._tokenizer, self._text_model, self._text_only = tokenizer, model, text_only
        return self

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text tower -> (n, dim) float32, L2-normalised, comparable with the image vectors
        by cosine (Siglip2Model.get_text_features)."""
        import torch

        self.load_text()
        # As SigLIP 2 was trained: lower-cased text, padded to exactly 64 tokens
        # (padding="max_length", max_length=64; longer text is cut), and no attention mask:
        # the text tower attends to the padding too and pools the last position, so
        # dynamic padding or a mask would give other vectors than training did.
        batch = self._tokenizer([t.lower() for t in texts], padding="max_length", max_length=self.TEXT_LENGTH,
                                truncation=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        with torch.inference_mode():
            if self._text_only:
                out = self._text_model(input_ids=ids)
            else:
                out = self._text_model.get_text_features(input_ids=ids)
            # transformers 5 returns an output object, 4.x returned the tensor itself.
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            features = features.float()
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype("<f4", copy=False)
