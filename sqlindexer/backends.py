"""What runs the model on a device: the dtype --dtype auto stands for, and the backend of
the vision tower (--backend), each a one-line BackendError for a choice that cannot run."""

from __future__ import annotations

import logging
from typing import Any

from . import cpu
from . import openvino_vision as ov_vision
from .config import BACKENDS, DTYPES
from .errors import BackendError

log = logging.getLogger(__name__)


def resolve_dtype(requested: str, device: str | None) -> Any:
    """auto: bfloat16 on CUDA GPUs that support it, else float16 on CUDA; on a CPU,
    bfloat16 where it has native bf16 arithmetic and float32 otherwise (cpu.py); float32
    elsewhere (MPS)."""
    import torch

    if requested not in DTYPES:
        raise BackendError(f"unknown dtype {requested!r} (choose {', '.join(DTYPES)})")
    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "cpu":
            return getattr(torch, cpu.auto_dtype())
        return torch.float32
    return getattr(torch, requested)


_resolve_dtype = resolve_dtype  # the name bench scripts of earlier versions import


def resolve_backend(requested: str, device: str, *, model_type: str, model_name: str) -> str:
    """torch or openvino for the vision tower on this device; BackendError, in one line,
    for a choice that cannot run. auto: OpenVINO where it is installed, the device is the
    CPU and the model is one it can run, torch otherwise."""
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r} (choose {', '.join(BACKENDS)})")
    if requested == "torch":
        return "torch"
    if requested == "openvino":
        ov_vision.check(device, model_type, model_name)
        return "openvino"
    if device != "cpu" or not ov_vision.installed():
        return "torch"
    try:
        ov_vision.check(device, model_type, model_name)
    except BackendError as e:
        log.info("backend auto: torch, since %s", str(e).removeprefix("--backend openvino").lstrip(": "))
        return "torch"
    return "openvino"
