"""SigLIP 2 image embeddings through Hugging Face transformers; on a CPU the vision tower's
encoder may run in OpenVINO instead (openvino_vision.py). A text query's vector is
text_query.py's.

torch and transformers (and openvino) are imported only when a model is actually loaded,
so runs with nothing to embed (and --help) never pay for them. A CPU run whose converted
tower is already in OpenVINO's cache imports neither: the checkpoint's JSON configs and
its embeddings' tensors are read as files (model_files.py), the embeddings computed in
numpy (vision_embeddings.py).
"""

from __future__ import annotations

import gc
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from . import cpu, model_files, process_memory
from . import openvino_vision as ov_vision
from .config import BACKENDS, DTYPES
from .errors import BackendError
from .model_load import (  # noqa: F401 - quiet_transformers, _weights_options: imported from here by others
    _weights_options,
    gpu_possible,
    load_image_model,
    quiet_transformers,
    read_config,
    resolve_device,
    weights_identity,
)
from .backends import _resolve_dtype, resolve_backend, resolve_dtype  # noqa: F401 - _resolve_dtype: for old bench scripts
from .patches import PatchSpec

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from .vision_embeddings import VisionEmbeddings

log = logging.getLogger(__name__)


class _FileGeometry(NamedTuple):
    config: dict[str, Any]  # config.json
    model_type: str
    spec: PatchSpec  # the image processor's patch geometry and normalisation
    dim: int  # the vector's width


__all__ = ["BACKENDS", "DTYPES", "Embedder", "PatchSpec", "resolve_backend", "resolve_device", "resolve_dtype"]

CPU_CHUNK = 8


def _processor_config(name: str) -> dict[str, Any] | None:
    """The image processor's settings where transformers looks for them: the
    "image_processor" of processor_config.json (which a processor saved by transformers 5
    writes alone), else preprocessor_config.json."""
    combined = model_files.read_json(name, "processor_config.json")
    if combined is not None and "image_processor" in combined:
        nested = combined["image_processor"]
        return nested if isinstance(nested, dict) else None
    return model_files.read_json(name, "preprocessor_config.json")


def _numpy(value: Any) -> np.ndarray:
    """A CPU torch tensor (the processor's output) as numpy; numpy arrays as they are."""
    return value if type(value).__module__ == "numpy" else value.numpy()


def _unit(features: np.ndarray) -> np.ndarray:
    import numpy as np

    features = features.astype(np.float32, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    return (features / np.maximum(norms, np.float32(1e-12))).astype("<f4", copy=False)


def _slices(inputs: dict[str, Any], step: int) -> Iterator[dict[str, Any]]:
    """The batch's inputs, step images at a time."""
    n = len(next(iter(inputs.values())))
    for i in range(0, n, step):
        yield {key: value[i : i + step] for key, value in inputs.items()}


class Embedder:
    """Loads the model once and embeds batches of upright RGB images.

    Loading has two stages: prepare() reads the config and the image processor (fast; it
    gives the input geometry and the vector size, so decoding can start, and refuses a
    device or backend that cannot run), load() the weights (slow; it may run in a
    background thread while the first images decode).
    """

    def __init__(self, model_name: str, *, device: str = "auto", dtype: str = "auto", backend: str = "auto") -> None:
        self.model_name = model_name
        self.requested_device = device
        self.requested_dtype = dtype
        self.requested_backend = backend
        self.device: str | None = None
        self.backend: str | None = None
        self.dim: int | None = None
        self.dtype: Any = None
        self.precision: str | None = None  # what the tower computes in, for logs and benchmarks
        self._config: Any = None
        self._model: Any = None
        self._tower: Any = None  # OpenVINO: the compiled encoder and head
        self._processor: Any = None
        self._spec: PatchSpec | None = None
        self._prepared = False
        self._warm_ir: Any = None  # the cached IR found by a prepare() that read no transformers config
        self._vision_only = False
        self._loading = threading.Lock()

    # -- loading -----------------------------------------------------------------------
    def prepare(self) -> Embedder:
        """Resolve the device and backend, read the model's config and image processor."""
        if self._prepared:
            return self
        if self.requested_dtype not in DTYPES:
            raise BackendError(f"unknown dtype {self.requested_dtype!r} (choose {', '.join(DTYPES)})")
        if self.requested_backend == "openvino" and self.requested_device in ("cuda", "mps"):
            # Named before the device is looked for: the choice itself cannot run.
            ov_vision.check(self.requested_device, "", self.model_name)
        if not self._prepare_warm_openvino():
            config, processor = read_config(self.model_name)
            self._choose_device_and_backend(getattr(config, "model_type", ""))
            self._config = config
            vision = getattr(config, "vision_config", config)
            # SigLIP's image embedding is the vision tower's pooled output: hidden_size wide.
            self.dim = int(getattr(config, "projection_dim", None) or vision.hidden_size)
            self._processor = processor
            self._spec = PatchSpec.of(processor)
        self._prepared = True
        return self

    def prepare_if_warm(self) -> bool:
        """prepare() from the checkpoint's files alone, where OpenVINO's cache holds this
        model's tower (see _prepare_warm_openvino); whether it did. Nothing is prepared
        otherwise, and nothing is raised."""
        if not self._prepared:
            try:
                self._prepared = self._prepare_warm_openvino()
            except (BackendError, OSError):  # OpenVINO cannot start; a file gone meanwhile
                return False
        return self._warm_ir is not None

    def _choose_device_and_backend(self, model_type: str) -> None:
        if self.requested_backend == "openvino" and self.requested_device == "auto":
            self.device = "cpu"  # OpenVINO runs on the CPU, whatever GPU there is
        else:
            self.device = resolve_device(self.requested_device)
        self.backend = resolve_backend(self.requested_backend, self.device, model_type=model_type,
                                       model_name=self.model_name)

    def _prepare_warm_openvino(self) -> bool:
        """Prepare from the checkpoint's files alone, where OpenVINO will run a tower already
        in its cache: the CPU is the device, the JSON configs name a SigLIP 2 model and a
        standard naflex processor, and the embeddings' tensors are in safetensors. False
        (nothing kept) otherwise: the caller reads the config through transformers."""
        if self.requested_backend == "torch" or self.requested_device not in ("auto", "cpu"):
            return False
        if not ov_vision.installed():
            return False
        if self.requested_device == "auto" and self.requested_backend == "auto" and gpu_possible():
            return False  # torch decides whether there is a GPU to run on instead
        found = self._geometry_from_files()
        if found is None:
            return False
        config, model_type, spec, dim = found
        xml = ov_vision.cached_ir(config, dtype=self.requested_dtype, source=weights_identity(self.model_name),
                                  max_patches=spec.max_patches)
        if xml is None:
            return False
        # The device is the CPU (asked for, or no GPU driver here): torch is not asked.
        backend = resolve_backend(self.requested_backend, "cpu", model_type=model_type, model_name=self.model_name)
        if backend != "openvino":  # auto, where OpenVINO cannot start: torch, prepared as usual
            return False
        self.device, self.backend = "cpu", backend
        self.dim, self._spec, self._warm_ir = dim, spec, xml
        return True

    def _geometry_from_files(self) -> _FileGeometry | None:
        """What a SigLIP 2 checkpoint's JSON configs and safetensors headers alone say of
        it; None where they do not say it all."""
        config = model_files.read_json(self.model_name, "config.json")
        processor = _processor_config(self.model_name)
        if config is None or processor is None or config.get("projection_dim") or config.get("transformers_weights"):
            return None
        from .vision_embeddings import embedding_width

        model_type = str(config.get("model_type") or "")
        spec = PatchSpec.from_config(processor)
        dim = embedding_width(self.model_name)
        if model_type not in ov_vision.SUPPORTED or spec is None or dim is None:
            return None
        return _FileGeometry(config, model_type, spec, dim)

    def prepare_geometry(self) -> Embedder:
        """Only what a process that never runs the model needs (the Ray driver: the vector
        width and the patch geometry), from the checkpoint's files where they say it, so
        that neither torch nor transformers is imported; prepare() otherwise. Anything
        more (load(), embedding) still prepares in full first."""
        if not self._prepared:
            found = self._geometry_from_files()
            if found is None:
                return self.prepare()
            self._spec, self.dim = found.spec, found.dim
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
        if self.backend == "openvino":
            self._load_openvino()
        else:
            model, self._vision_only = load_image_model(self.model_name, self._config)
            self.dtype = resolve_dtype(self.requested_dtype, self.device)
            model.to(device=self.device, dtype=self.dtype)
            model.eval()
            self._model = model
            self.precision = str(self.dtype).replace("torch.", "")
        log.info("loaded %s on %s (%s, %s)", self.model_name, self.device, self.backend, self.precision)
        return self

    def _load_openvino(self) -> None:
        if self.requested_dtype == "auto":
            cpu.auto_dtype()  # logs what the CPU does natively; OpenVINO makes its own choice
        shape = {"max_patches": self.max_num_patches}
        # A warm prepare() found the IR already; otherwise it is looked for now.
        xml = self._warm_ir or ov_vision.cached_ir(model_files.read_json(self.model_name, "config.json"),
                                                   dtype=self.requested_dtype,
                                                   source=weights_identity(self.model_name), **shape)
        # With the encoder and head in the cache, only the embeddings' tensors are read from
        # the checkpoint: the rest would sit in memory (its mapped pages) next to OpenVINO's.
        embeddings = self._read_embeddings() if xml else None
        if embeddings is None:
            if self._config is None:  # prepared from the files alone, but they cannot be used
                self._config, self._processor = read_config(self.model_name)
            xml, embeddings = self._convert_openvino(shape)
        # Set only once compiled: a failed compile leaves the Embedder unloaded.
        self._tower = ov_vision.compile_tower(xml, dtype=self.requested_dtype)
        self._model = embeddings
        self.dtype = "float32"
        self.precision = self._tower.precision

    def _read_embeddings(self) -> VisionEmbeddings | None:
        from .vision_embeddings import VisionEmbeddings

        try:
            return VisionEmbeddings.from_checkpoint(self.model_name)
        except (OSError, ValueError) as e:
            log.info("%s: the vision embeddings alone cannot be read (%s); loading the whole tower",
                     self.model_name, e)
            return None

    def _convert_openvino(self, shape: dict[str, int]) -> tuple[Any, VisionEmbeddings]:
        """Load the whole tower, convert its encoder and head to OpenVINO IR in the cache,
        keep a copy of its embeddings' weights and let go of every other."""
        model, vision_only = load_image_model(self.model_name, self._config)
        model.eval()
        tower = model if vision_only else model.vision_model
        # Known only now for a hub model's first run: the load has just downloaded its files.
        source = weights_identity(self.model_name)
        xml = ov_vision.convert_tower(tower, dtype=self.requested_dtype, source=source, **shape)
        ov_vision.remember_ir(xml, model_files.read_json(self.model_name, "config.json"), source=source, **shape)
        from .vision_embeddings import VisionEmbeddings

        embeddings = VisionEmbeddings.from_module(tower.embeddings)
        # Every weight let go before OpenVINO compiles: the checkpoint stays mapped (its
        # pages resident) while any one tensor of it lives, so no name here may keep a
        # submodule, and the tracer's reference cycles are collected now.
        for module in (tower, model):
            for name in [n for n, _ in module.named_children()]:
                setattr(module, name, None)
        del model, tower, module
        gc.collect()
        process_memory.trim_heap()
        return xml, embeddings

    @property
    def patch_size(self) -> int:
        if self._spec is not None:
            return self._spec.patch
        return int(getattr(self._processor, "patch_size", 16) or 16)

    @property
    def max_num_patches(self) -> int:
        if self._spec is not None:
            return self._spec.max_patches
        return int(getattr(self._processor, "max_num_patches", 256) or 256)

    # -- inference ---------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """The model's own processor on upright RGB images."""
        self.prepare()
        if self._processor is None:  # prepared from the files alone: transformers now
            with self._loading:
                if self._processor is None:
                    self._processor = read_config(self.model_name)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(self._processor(images=list(images), return_tensors="pt"))

    def embed_resized(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Upright RGB uint8 arrays already at the processor's target size (decode.prepare
        makes them) -> (n, dim) vectors, the processor's last steps done by PatchSpec; any
        other processor, or an array not at a target size, goes through embed_images."""
        self.prepare()
        spec = self._spec
        if spec is None or not all(spec.fits(a) for a in arrays):
            from PIL import Image

            return self.embed_images([Image.fromarray(a, "RGB") for a in arrays])
        return self.embed_pixels(spec.pack(arrays), spec=spec)

    @property
    def _patch_spec(self) -> PatchSpec | None:
        self.prepare()
        return self._spec

    def embed_pixels(self, inputs: dict[str, Any], *, spec: PatchSpec | None = None) -> np.ndarray:
        """Forward pass on processor output (torch tensors) or PatchSpec.pack's (numpy
        arrays) -> (n, dim) float32, L2-normalised. With spec, pixel_values are uint8
        patches (a quarter of the bytes to copy), normalised on the device."""
        self.load()
        if self._tower is not None:
            return _unit(self._forward_openvino({k: _numpy(v) for k, v in inputs.items()}, spec))
        import torch

        moved = {}
        for key, value in inputs.items():
            value = torch.as_tensor(value)
            if self.device == "cuda":
                # Page-locked host memory lets the copy run asynchronously to the GPU.
                value = value.pin_memory()
            moved[key] = value.to(self.device, non_blocking=True)
        with torch.inference_mode():
            features = self._forward_torch(self._normalized(moved, spec)).float()
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype("<f4", copy=False)

    def _normalized(self, moved: dict[str, Any], spec: PatchSpec | None) -> dict[str, Any]:
        """Processor output with PatchSpec's uint8 patches normalised, floats in self.dtype."""
        if spec is not None:
            moved = {**moved, "pixel_values": spec.normalize(moved["pixel_values"], moved["pixel_attention_mask"])}
        return {key: value.to(self.dtype) if value.is_floating_point() else value for key, value in moved.items()}

    def _forward_torch(self, moved: dict[str, Any]) -> Any:
        import torch

        # On a CPU the forward pass is fastest in small chunks: the activations of a large
        # batch fall out of cache (docs/performance.md). A GPU takes the whole batch at once.
        step = CPU_CHUNK if self.device == "cpu" else len(next(iter(moved.values())))
        parts = []
        for chunk in _slices(moved, step):
            out = self._model(**chunk) if self._vision_only else self._model.get_image_features(**chunk)
            # transformers 5 returns an output object, 4.x returned the tensor itself.
            parts.append(out.pooler_output if hasattr(out, "pooler_output") else out)
        return torch.cat(parts)

    def _forward_openvino(self, inputs: dict[str, np.ndarray], spec: PatchSpec | None) -> np.ndarray:
        import numpy as np

        # The patch embedding and the position embeddings resized to each image's shape in
        # numpy, as transformers computes them; then the encoder and head in OpenVINO. One
        # of OpenVINO's chunks at a time: a whole batch's float pixels, embeddings and their
        # temporaries would be held at once, next to OpenVINO's own buffers.
        parts = []
        for chunk in _slices(inputs, self._tower.chunk):
            pixels, mask = chunk["pixel_values"], chunk["pixel_attention_mask"]
            if spec is not None:
                pixels = spec.normalize(pixels, mask)
            embeds = self._model(pixels.astype(np.float32, copy=False), chunk["spatial_shapes"])
            parts.append(self._tower(embeds, mask.astype(np.int64)))
        return np.concatenate(parts)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_pixels(self.preprocess(images))
