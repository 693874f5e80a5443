"""Loading a checkpoint safely and quietly: device choice, from_pretrained options that run
no code of the checkpoint's, and one-line errors for every way a load fails."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

from .config import looks_like_path
from .errors import DeviceError, ModelLoadError, one_line

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


def _local_file(name: str, file: str) -> str | None:
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


def weights_identity(name: str) -> str:
    """The checkpoint's weight files as "file size mtime_ns" lines (a local folder, or a hub
    snapshot in the cache, whose files are named by their content hash); "" where unknown."""
    from pathlib import Path

    lines = []
    for file in (*_SAFETENSORS, "pytorch_model.bin", "pytorch_model.bin.index.json", *_shards(name)):
        path = _local_file(name, file)
        if path:
            real = Path(path).resolve()
            st = real.stat()
            lines.append(f"{real} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(lines)


def _shards(name: str) -> list[str]:
    """The weight files a sharded checkpoint's index names: new weights in a shard leave
    the index as it was."""
    import json

    shards: set[str] = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = _local_file(name, index)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    shards.update(str(v) for v in json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # an index that cannot be read: the load itself says so
    return sorted(shards)


def load_vision_embeddings(name: str, config: Any) -> Any | None:
    """The SigLIP 2 vision tower's embeddings alone (patch embedding, position embeddings),
    float32, their weights copied out of the checkpoint's safetensors and nothing else read
    from it: what the OpenVINO backend runs in torch once the rest of the tower is in its
    cache. None where the checkpoint has no such tensors on disk (the caller loads the
    whole tower instead)."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    vision = getattr(config, "vision_config", config)
    if getattr(vision, "model_type", "") not in ("siglip2_vision_model", "siglip2"):
        return None
    try:
        files = _embedding_files(name)
        if not files:
            return None
        found: dict[str, Any] = {}
        for file, keys in files.items():
            # safe_open maps the whole file; only the pages of these tensors are read, and
            # the clone lets the mapping go when the block ends.
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    found[key.split("embeddings.", 1)[1]] = f.get_tensor(key).to(torch.float32).clone()
        with quiet_transformers(), torch.device("meta"):
            module = Siglip2VisionEmbeddings(vision)
        module.load_state_dict(found, strict=True, assign=True)
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as e:
        log.info("%s: the vision embeddings alone cannot be read (%s); loading the whole tower", name, one_line(e))
        return None
    return module.eval()


def _embedding_files(name: str) -> dict[str, list[str]]:
    """safetensors file -> the vision embeddings' tensor names in it (one file, or the
    shards that the index names)."""
    import json

    def wanted(key: str) -> bool:
        return key.startswith(("vision_model.embeddings.", "embeddings."))

    index = _local_file(name, "model.safetensors.index.json")
    if index:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        folder = os.path.dirname(index)
        out: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if wanted(key):
                path = _local_file(name, shard) or os.path.join(folder, shard)
                out.setdefault(path, []).append(key)
        return out
    single = _local_file(name, "model.safetensors")
    if not single:
        return {}
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        keys = [k for k in f.keys() if wanted(k)]
    return {single: keys} if keys else {}


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
