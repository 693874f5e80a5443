"""Loading a checkpoint safely and quietly: device choice, from_pretrained options that run
no code of the checkpoint's, and one-line errors for every way a load fails."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from .config import looks_like_path
from .errors import DeviceError, ModelLoadError, one_line
from .model_files import has_safetensors, weights_identity  # noqa: F401 - weights_identity: imported from here

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
    if requested == "cpu":
        return "cpu"
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


# What a GPU driver leaves on Linux, loaded or used: NVIDIA's (CUDA; Jetson's nvhost), AMD's
# (ROCm, which torch reaches as cuda) and WSL 2's (CUDA on Windows' driver).
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/sys/module/nvidia",
                     "/dev/nvhost-ctrl-gpu", "/dev/kfd", "/sys/module/amdgpu", "/dev/dxg")


def gpu_possible(platform: str = sys.platform, exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Whether torch might find a GPU here: False only on Linux with no trace of a GPU
    driver, where `--device auto` is the CPU without importing torch to ask (the warm
    OpenVINO path, embed.py); True elsewhere (macOS has MPS; other systems are asked)."""
    if not platform.startswith("linux"):
        return True
    return any(exists(path) for path in _GPU_DEVICE_FILES)


def _weights_options(name: str) -> dict[str, Any]:
    """from_pretrained options that keep a checkpoint from running code: never the
    checkpoint's own Python (trust_remote_code), safetensors whenever it has them (plain
    tensors, no pickle), and for a checkpoint with only pickle weights (pytorch_model.bin)
    torch's weights_only unpickler, which admits tensors and plain containers and refuses
    any other global. (None leaves transformers to try safetensors first, then .bin.)"""
    safetensors = has_safetensors(name)
    if safetensors is False:
        log.info("%s has no safetensors weights: reading its pickle weights with torch's weights_only unpickler",
                 name)
    return {"trust_remote_code": False, "use_safetensors": safetensors, "weights_only": True}


def _load_error(name: str, e: Exception) -> ModelLoadError:
    """One line naming the checkpoint, for any failure to load its weights."""
    if isinstance(e, ModelLoadError):
        return e
    if isinstance(e, pickle.UnpicklingError):
        return ModelLoadError(f"cannot load model {name!r}: its pickle weights file was refused by torch's "
                              f"weights_only unpickler ({_unpickling_detail(e)})")
    return ModelLoadError(f"cannot load model {name!r}: {one_line(e)}")


def _unpickling_detail(e: BaseException) -> str:
    # torch's message opens with advice to retry with weights_only=False; the line that
    # names what was refused is further down.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith(("Trying", "Unsupported")):
            return line.rstrip(".")
    return lines[0].rstrip(".") if lines else type(e).__name__


def check_name(name: str) -> None:
    """A name that is a path must be a folder: from_pretrained would take it for a hub id."""
    if looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelLoadError(f"cannot load model {name!r}: no such folder")


def read_config(name: str) -> tuple[Any, Any]:
    """The checkpoint's config and image processor (small files: no weights)."""
    import transformers

    check_name(name)
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
            processor = transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
            raise ModelLoadError(f"cannot load model {name!r}: {one_line(e)}") from None
    return config, processor


def load_image_model(name: str, config: Any) -> tuple[Any, bool]:
    """(model, vision_only): the vision tower alone where the checkpoint has a class for
    it, else the full model (which must have get_image_features)."""
    import transformers

    with quiet_transformers():
        try:
            options = _weights_options(name)
            cls_name = _VISION_ONLY.get(getattr(config, "model_type", ""))
            if cls_name and hasattr(transformers, cls_name):
                return getattr(transformers, cls_name).from_pretrained(name, **options), True
            if getattr(config, "model_type", "").endswith("_vision_model"):
                return transformers.AutoModel.from_pretrained(name, **options), True
            model = transformers.AutoModel.from_pretrained(name, **options)
            if not hasattr(model, "get_image_features"):
                raise ModelLoadError(f"model {name!r} has no image tower (get_image_features)")
            return model, False
        except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
            raise _load_error(name, e) from None


def load_text_model(name: str, config: Any | None) -> tuple[Any, Any, bool]:
    """(tokenizer, model, text_only): the text tower alone where the checkpoint has a class
    for it, else the full model (which must have get_text_features)."""
    import transformers

    check_name(name)
    with quiet_transformers():
        try:
            config = config or transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
            raise ModelLoadError(f"cannot load the tokenizer of model {name!r}: {one_line(e)}") from None
        try:
            options = _weights_options(name)
            cls_name = _TEXT_ONLY.get(getattr(config, "model_type", ""))
            if cls_name and hasattr(transformers, cls_name):
                return tokenizer, getattr(transformers, cls_name).from_pretrained(name, **options), True
            model = transformers.AutoModel.from_pretrained(name, **options)
            if not hasattr(model, "get_text_features"):
                raise ModelLoadError(f"model {name!r} has no text tower (get_text_features)")
            return tokenizer, model, False
        except Exception as e:  # noqa: BLE001 - hub, file and format errors alike
            raise _load_error(name, e) from None
