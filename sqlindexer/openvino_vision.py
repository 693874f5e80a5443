"""The SigLIP 2 vision tower's encoder and head, run by OpenVINO on the CPU.

The patch embedding and the naflex position-embedding resize depend on each image's
spatial shape and are a small part of the tower's work: they run in numpy
(vision_embeddings.py).
What follows them (the encoder layers, the post-layernorm and the attention-pooling
head) sees one shape for every batch, since batches are padded to max_num_patches: it is
converted once with openvino.convert_model, saved as OpenVINO IR in a cache folder, and
compiled with OpenVINO's model cache there, so a later run pays neither the conversion
nor the compile.

openvino is imported only here, and only when this backend is used; torch and
transformers only to convert a tower the cache does not hold yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import process_memory
from .errors import BackendError, one_line

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "SQLINDEXER_OPENVINO_CACHE"
# --dtype -> OpenVINO's INFERENCE_PRECISION_HINT; auto leaves OpenVINO its own choice for
# the CPU (bf16 where the CPU has native bf16 arithmetic, f32 otherwise).
PRECISIONS = {"auto": None, "float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# Images per inference request in a 16-bit computation; a float32 one takes half as many,
# the same bytes of activations per request. The batch dimension is dynamic, so the last,
# shorter chunk of a batch is not padded (docs/performance-cpu.md has the measurements).
CHUNK = 8
# OpenVINO's names of the 16-bit precisions.
SIXTEEN = ("bf16", "f16")
# The architectures whose tower has the parts converted here (embeddings, encoder,
# post_layernorm, a head that takes the patch mask).
SUPPORTED = ("siglip2", "siglip2_vision_model")
# Bumped when the converted graph changes, so that old IR in the cache is not reused.
_FORMAT = 3


def installed() -> bool:
    """Whether openvino can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def check_choice(device: str) -> None:
    """What can be told of --backend openvino before any work: the device and the install."""
    if device not in ("cpu", "auto"):
        raise BackendError(f"--backend openvino runs on the CPU only, not --device {device} "
                           "(use --device cpu, or --backend torch for the GPU)")
    if not installed():
        raise BackendError("--backend openvino: OpenVINO is not installed (pip install 'image-indexer[openvino]', "
                           "or use --backend torch)")


def check(device: str, model_type: str, model_name: str) -> None:
    """Raise BackendError, in one line, where --backend openvino cannot run."""
    check_choice(device)
    if device != "cpu":
        raise BackendError(f"--backend openvino runs on the CPU only, not --device {device} "
                           "(use --device cpu, or --backend torch for the GPU)")
    if model_type not in SUPPORTED:
        raise BackendError(f"--backend openvino supports SigLIP 2 models only; {model_name!r} is a "
                           f"{model_type or 'model of unknown type'} (use --backend torch)")
    try:
        devices = core().available_devices
    except Exception as e:  # noqa: BLE001 - a broken install, or a CPU its plugin refuses
        raise BackendError(f"--backend openvino: OpenVINO cannot start ({one_line(e)}); use --backend torch") from None
    if "CPU" not in devices:
        raise BackendError("--backend openvino: OpenVINO's CPU plugin refuses this CPU (use --backend torch)")


def cache_root() -> Path:
    """Where converted models and compiled blobs are kept: $SQLINDEXER_OPENVINO_CACHE,
    else image-indexer/openvino in the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "image-indexer" / "openvino"


_core_lock = threading.Lock()
_core_instance: Any = None


def openvino_module() -> Any:
    """The openvino module, imported with no telemetry: every import of it here goes
    through this."""
    no_telemetry()
    import openvino

    return openvino


def no_telemetry() -> None:
    """Keep OpenVINO from sending usage events: importing openvino imports its converter,
    which sends one to Google Analytics at import time (and more while converting),
    each from a process it forks for the purpose. Nothing an indexer of private photos
    should send, and a fork of this multi-threaded process can inherit a lock another
    thread holds: the forked sender then never ends, and this process waits for it at
    exit. With the telemetry package unimportable, OpenVINO takes its own stand-in, as
    where it is not installed. Call before the first import of openvino (a package
    imported earlier by someone else is left alone; converter_without_telemetry still covers the
    converter then)."""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


def core() -> Any:
    global _core_instance
    with _core_lock:
        if _core_instance is None:
            _core_instance = openvino_module().Core()
        return _core_instance


class Tower:
    """The compiled encoder and head: (n, P, D) float32 embedded patches and the (n, P)
    patch mask -> (n, D) float32 pooled features (not normalised)."""

    def __init__(self, compiled: Any, *, chunk: int | None = None) -> None:
        openvino = openvino_module()

        self._compiled = compiled
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"
        self.chunk = chunk if chunk is not None else CHUNK if self.precision in SIXTEEN else CHUNK // 2
        requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = openvino.AsyncInferQueue(compiled, max(1, requests))
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """One padded image through the model, so that its one-time work (repacking the
        weights) is done before the first batch."""
        import numpy as np

        shape = self._compiled.input(0).get_partial_shape()
        patches, width = shape[1].get_length(), shape[2].get_length()
        self(np.zeros((1, patches, width), np.float32), np.ones((1, patches), np.int64))

    def __call__(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import numpy as np

        n = len(embeds)
        out: list[Any] = [None] * ((n + self.chunk - 1) // self.chunk)

        def done(request: Any, index: int) -> None:
            out[index] = request.get_output_tensor(0).data.copy()

        # One batch at a time: the queue's requests are shared state.
        with self._lock:
            self._queue.set_callback(done)
            for index, i in enumerate(range(0, n, self.chunk)):
                self._queue.start_async([embeds[i : i + self.chunk], mask[i : i + self.chunk]], index)
            self._queue.wait_all()
        return np.concatenate(out).astype(np.float32, copy=False)


def convert_tower(tower: Any, *, max_patches: int, dtype: str, source: str = "", cache: Path | None = None) -> Path:
    """tower (a transformers Siglip2VisionModel, float32) -> the OpenVINO IR of its encoder
    and head for --dtype, converted now or read from the cache folder.

    A 16-bit computation gets IR whose weights are stored as float16: a bf16 computation
    rounds them further anyway, and the smaller file is what OpenVINO maps into memory next
    to its own bf16 copy. float32 gets float32 weights. source names the checkpoint's files
    (model_load.weights_identity)."""
    folder = (cache or cache_root()) / "ir" / _key(tower, max_patches, source)
    try:
        xml = _variant(folder, dtype)
        if xml is None:
            xml = _ir_name(folder, dtype)
            save_ir(_convert(tower, max_patches, folder), xml, compress_to_fp16=_sixteen(dtype))
    except Exception as e:  # noqa: BLE001 - tracing, conversion and disk errors alike
        raise BackendError(f"--backend openvino: cannot convert the vision tower ({one_line(e)})") from None
    return xml


def cached_ir(config: dict[str, Any] | None, *, max_patches: int, dtype: str, source: str,
              cache: Path | None = None) -> Path | None:
    """The IR that an earlier run converted from this checkpoint, found from its files'
    identity (source) and its config.json alone, so that no weight of the tower is read;
    None where there is none (or the checkpoint's files are not known)."""
    if not source or config is None:
        return None
    root = cache or cache_root()
    try:
        name = (root / "by-source" / _source_key(config, max_patches, source)).read_text().strip()
        return _variant(root / "ir" / name, dtype) if name else None
    except Exception:  # noqa: BLE001 - a missing or unreadable link, a broken IR: convert again
        return None


def remember_ir(xml: Path, config: dict[str, Any] | None, *, max_patches: int, source: str,
                cache: Path | None = None) -> None:
    """Link the checkpoint's files and config.json to its converted IR, for cached_ir. A
    failure to write only costs the next run a full load."""
    if not source or config is None:
        return
    link = (cache or cache_root()) / "by-source" / _source_key(config, max_patches, source)
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{os.getpid()}.{link.name}")
        tmp.write_text(xml.parent.name + "\n")
        tmp.replace(link)
    except OSError as e:
        log.info("openvino: cannot record the converted tower's source (%s)", one_line(e))


def _sixteen(dtype: str) -> bool:
    return _compute_precision(dtype) in SIXTEEN


def _ir_name(folder: Path, dtype: str) -> Path:
    return folder / ("encoder_head_f16.xml" if _sixteen(dtype) else "encoder_head.xml")


def _variant(folder: Path, dtype: str) -> Path | None:
    """The IR for dtype in folder: there already, or re-saved from the other variant (much
    quicker than converting); None where folder holds neither."""
    xml = _ir_name(folder, dtype)
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    other = folder / ("encoder_head.xml" if _sixteen(dtype) else "encoder_head_f16.xml")
    # Only float32 weights can be re-saved without loss; float16 ones are not widened back.
    if _sixteen(dtype) and other.is_file():
        save_ir(core().read_model(str(other)), xml, compress_to_fp16=True)
        return xml
    return None


def _source_key(config: dict[str, Any], max_patches: int, source: str) -> str:
    # The installed versions as their packages record them: importing torch and
    # transformers to ask would cost a warm run more than all its other loading.
    text = json.dumps([_FORMAT, max_patches, *map(package_version, ("openvino", "transformers", "torch")), source,
                       json.dumps(config, sort_keys=True)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def package_version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _compute_precision(dtype: str) -> str:
    """What OpenVINO will compute in for --dtype: the hint, or for auto the CPU plugin's
    own default on this CPU."""
    hint = PRECISIONS[dtype]
    return hint or core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def compile_tower(xml: Path, *, dtype: str, cache: Path | None = None) -> Tower:
    """The IR compiled for the CPU at --dtype's precision, through OpenVINO's model cache (a
    second run reads the compiled blob instead of compiling)."""
    config = {"CACHE_DIR": str((cache or cache_root()) / "compiled"), "PERFORMANCE_HINT": "LATENCY"}
    hint = PRECISIONS[dtype]
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    # OpenVINO compiles from the mapped IR (or imports the mapped compiled blob), then, on
    # the first inference, repacks the weights for this CPU into a copy of its own; the
    # file's pages it read stay mapped, counted in our memory. They are let go after each
    # step, between OpenVINO's calls (never while it runs: it may unmap a file and reuse
    # the addresses), and one image goes through now, while the batches are still to come.
    root = cache or cache_root()
    try:
        compiled = core().compile_model(str(xml), "CPU", config)
        process_memory.release_mapped_files(root)
        tower = Tower(compiled)
        tower.warm_up()
    except Exception as e:  # noqa: BLE001 - disk and plugin errors alike
        raise BackendError(f"--backend openvino: cannot compile the vision tower ({one_line(e)})") from None
    process_memory.release_mapped_files(root)
    return tower


def _wrapper(tower: Any) -> Any:
    """The part of the tower after the embeddings, as a module of (embeds, mask)."""
    import torch

    class EncoderHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.post_layernorm, self.head = tower.encoder, tower.post_layernorm, tower.head

        def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # The additive mask transformers builds for the encoder's attention: padding
            # positions are never attended to. Built here, from the mask alone, so the
            # graph has no branch on its values.
            blocked = (mask[:, None, None, :] == 0).to(embeds.dtype)
            additive = blocked * torch.finfo(embeds.dtype).min
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
            return self.head(self.post_layernorm(hidden), mask)

    return EncoderHead().eval()


def _convert(tower: Any, max_patches: int, folder: Path) -> Any:
    openvino = openvino_module()
    import torch
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    width = int(tower.config.hidden_size)
    # One image, its second half padding: the batch dimension is dynamic anyway, and every
    # further example image adds its activations to what the tracer holds. The padding
    # makes any branch the model's own code takes on the mask (transformers skips an
    # all-ones mask) the one traced.
    embeds = torch.randn(1, max_patches, width)
    mask = torch.ones(1, max_patches, dtype=torch.int64)
    mask[0, max_patches // 2 :] = 0
    log.info("openvino: converting the vision tower (once; kept in %s)", folder)
    # The tracer warns about each Python branch of transformers' code; the example's
    # padding above is what makes those branches the right ones.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), converter_without_telemetry():
        warnings.simplefilter("ignore")
        # What openvino.convert_model builds from a module, less torch's trace check: that
        # check traces the module a second time and holds both traces at once; the tests
        # compare the converted tower's vectors with torch's instead. shared_memory: the
        # converted constants point at the tower's weights rather than copying them.
        decoder = TorchScriptPythonDecoder(_wrapper(tower), example_input=(embeds, mask), shared_memory=True,
                                           trace_kwargs={"check_trace": False})
        return openvino.convert_model(decoder, input=[openvino.PartialShape([-1, max_patches, width]),
                                                      openvino.PartialShape([-1, max_patches])])


@contextlib.contextmanager
def converter_without_telemetry() -> Iterator[None]:
    """Run OpenVINO's converter with its own stand-in for the telemetry package (what it
    uses where that package is not installed). Otherwise, unless the user has opted out,
    it sends usage events to Google Analytics, forking this whole process once per event
    to do so: nothing an indexer of private photos should send, and each fork counts the
    parent's memory again while it lives."""
    try:
        from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils, utils
    except ImportError:  # an OpenVINO laid out otherwise (tests/test_openvino_convert.py notices)
        modules, telemetry_stub = [], None
    else:
        modules = [m for m in (convert_impl, telemetry_utils, utils) if hasattr(m, "tm")]
    saved = [m.tm for m in modules]
    for m in modules:
        m.tm = telemetry_stub
    try:
        yield
    finally:
        for m, tm in zip(modules, saved):
            m.tm = tm


def save_ir(model: Any, xml: Path, *, compress_to_fp16: bool) -> None:
    openvino = openvino_module()

    xml.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a run killed while saving leaves no
    # half-written IR for the next run to trust.
    tmp = xml.with_name(f".{os.getpid()}.{xml.name}")
    openvino.save_model(model, str(tmp), compress_to_fp16=compress_to_fp16)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)


def _key(tower: Any, max_patches: int, source: str) -> str:
    """A name for the converted IR: the tower's config, the shape, the versions of the
    converting libraries, the checkpoint's files (path, size, mtime) and an even sample of
    every weight tensor's values. Only a sample: the weights are memory-mapped, and reading
    them all would bring the whole checkpoint into memory next to OpenVINO's copy."""
    openvino = openvino_module()
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT, max_patches, openvino.__version__, transformers.__version__,
                         torch.__version__, source, tower.config.to_json_string()]).encode())
    for name, tensor in tower.state_dict().items():
        if name.startswith("embeddings."):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(name.encode() + str(tuple(tensor.shape)).encode())
        h.update(flat[::step].to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]
