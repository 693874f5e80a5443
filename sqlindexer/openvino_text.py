"""A text query's vector through OpenVINO, without torch or transformers.

`search` embeds one short text. Through torch that means importing torch and transformers
and loading the text tower, which costs far more than the forward pass itself. So the
first search of a checkpoint, on a CPU where OpenVINO is installed, runs the text tower in
torch as before (text_query.py) and then keeps, in OpenVINO's cache folder, what a later
search needs instead:

- the tokenizer as transformers set it up (its `tokenizers` object, saved as JSON), kept
  only if it gives transformers' own ids for every one of PROBES;
- the encoder, final layer norm and head as OpenVINO IR, float32;
- where the token and position embeddings lie in the checkpoint's safetensors: a text's
  64 rows are read from the file, never the vocabulary's whole table.

All of it is kept only if its vectors for PROBES are within MIN_COSINE of torch's. It
computes in float32, as the torch path does: a query is one forward pass, and every image
vector is compared with it. A later search finds it by key(): the checkpoint's weight,
config and tokenizer files and the installed versions, read without loading anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kept_folder, model_files, process_memory
from . import openvino_vision as ov
from .errors import one_line
from .text_query import TEXT_LENGTH, query_text

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
# Texts the kept tokenizer must encode as transformers does, and the kept tower embed as
# torch does: cased, accented, non-Latin and emoji text, odd spacing, nothing, and a text
# longer than TEXT_LENGTH tokens (the tokenizer's own special tokens are added to them).
PROBES = (
    "a photo of a red car",
    "",
    "A Dog at NIGHT, 3 km/h; 100% sure?",
    "café crème, naïve façade, Straße",
    "東京の夜景 🌃 👍🏽",
    "tab\there,  two spaces, a new\nline",
    " ".join(["a long text that is cut after sixty-four tokens"] * 12),
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                    "merges.txt")
# Bumped when what is kept changes, so that an older folder is not used.
_FORMAT = 1
_META = "text.json"  # written last: a folder without it was never finished
# Keeps left unfinished (kept_folder.unfinished) after which no search tries again until
# they age.
_MOST_UNFINISHED = 2


def key(name: str) -> str | None:
    """The name of what is kept for checkpoint name; None where its files are not known."""
    source = model_files.weights_identity(name)
    config = model_files.read_json(name, "config.json")
    tokenizer = model_files.files_identity(name, _TOKENIZER_FILES)
    if not source or config is None or not tokenizer:
        return None
    text = json.dumps([_FORMAT, TEXT_LENGTH, *map(ov.package_version, ("openvino", "transformers", "torch",
                                                                      "tokenizers")),
                       source, tokenizer, json.dumps(config, sort_keys=True)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def folder_for(name: str, cache: Path | None = None) -> Path | None:
    found = key(name)
    return None if found is None else (cache or ov.cache_root()) / "text" / found


class TextTower:
    """A kept text tower: texts -> (n, dim) float32 vectors, L2-normalised, as torch's."""

    def __init__(self, folder: Path, meta: dict[str, Any], name: str, *, cache: Path | None = None,
                 keep_compiled: bool = True) -> None:
        import numpy as np

        tables = model_files.tensors(name, (meta["token"], meta["position"]))
        self._token = tables[meta["token"]]
        self._positions = model_files.read_tensor(tables[meta["position"]])[:TEXT_LENGTH][None]
        self._tokenizer = _tokenizer(folder / "tokenizer.json", meta)
        root = cache or ov.cache_root()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if keep_compiled:  # OpenVINO's model cache: a later search reads the compiled blob
            config["CACHE_DIR"] = str(root / "compiled")
        self.folder = folder
        self._compiled = ov.core().compile_model(str(folder / "text.xml"), "CPU", config)
        # Nothing of OpenVINO runs now: the pages of the files it read may go (see
        # process_memory), it reads back what it needs.
        process_memory.release_mapped_files(root)
        self._np = np

    @classmethod
    def find(cls, name: str, *, cache: Path | None = None) -> TextTower | None:
        """The tower an earlier search kept for checkpoint name; None where there is none
        or it cannot be used (torch answers then; a kept folder that cannot be used is
        removed, so that it is kept anew)."""
        if not ov.installed() or importlib.util.find_spec("tokenizers") is None:
            return None
        folder = folder_for(name, cache)
        if folder is None:
            return None
        try:
            meta = json.loads((folder / _META).read_text())
        except (OSError, ValueError):
            return None
        try:
            return cls(folder, meta, name, cache=cache)
        except Exception as e:  # noqa: BLE001 - a damaged folder, a changed file, OpenVINO refusing
            log.info("openvino: cannot use the text tower kept in %s (%s); using torch", folder, one_line(e))
            kept_folder.remove(folder)
            return None

    def broken(self) -> bool:
        """Whether the tower fails on a plain text too, not only on one query (nor for want
        of memory, which passes)."""
        try:
            self.embed_texts([PROBES[0]])
        except MemoryError:
            return False
        except Exception:  # noqa: BLE001 - whatever made the query fail
            return True
        return False

    def discard(self) -> None:
        """Remove the kept folder (it is broken): the next search keeps it anew from torch.
        (kept_folder.remove: moved aside first.)"""
        self._compiled = None  # its files may not be removed while OpenVINO holds them open
        kept_folder.remove(self.folder)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        np = self._np
        ids = _encode(self._tokenizer, [query_text(t) for t in texts])
        rows = model_files.read_rows(self._token, ids.reshape(-1).tolist())
        embeds = rows.reshape(len(texts), TEXT_LENGTH, -1) + self._positions
        features = np.asarray(self._compiled(embeds.astype(np.float32))[0], dtype=np.float32)
        norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return (features / norms).astype("<f4", copy=False)


def would_keep(name: str, *, cache: Path | None = None) -> bool:
    """Whether keep() would try: OpenVINO installed, a cache folder that can be written,
    nothing kept or refused for name yet, and not two keeps killed within the last hour
    (a machine that cannot hold the conversion would otherwise pay it, and be killed, at
    every search)."""
    if not ov.installed():
        return False
    try:
        folder = folder_for(name, cache)
        return folder is not None and not (folder / _META).is_file() and _may_keep(name, folder)
    except OSError:
        return False


def _may_keep(name: str, folder: Path) -> bool:
    """Whether folder (not kept yet) is to be kept now (would_keep)."""
    why = kept_folder.refusal(folder)
    if why is not None:
        log.debug("openvino: text queries stay in torch for %s (%s)", name, why)
        return False
    if not kept_folder.writable_parent(folder):
        log.info("openvino: cannot keep the text tower of %s (%s cannot be written)", name, folder.parent)
        return False
    return kept_folder.unfinished(folder) < _MOST_UNFINISHED


def keep(name: str, tokenizer: Any, model: Any, torch_vectors: Callable[[Sequence[str]], np.ndarray], *,
         cache: Path | None = None) -> Path | None:
    """After a search embedded its text in torch: keep what a later search needs (see the
    module's text), from the loaded tokenizer and model (a text tower, or a whole model
    with one) and torch_vectors (texts -> torch's vectors). Returns the folder; None where
    nothing is kept (logged: the search itself is not affected). What cannot be kept for a
    reason that would hold next time too is recorded, and not tried again."""
    if not ov.installed():
        return None
    try:
        folder = folder_for(name, cache)
        if folder is None or (folder / _META).is_file():
            return folder
        if not _may_keep(name, folder):
            return None
        tmp = kept_folder.start(folder)
    except OSError as e:  # a cache folder that cannot be read or written
        log.info("openvino: cannot keep the text tower of %s (%s)", name, one_line(e))
        return None
    try:
        _keep(name, tokenizer, model, torch_vectors, tmp, cache)
        kept_folder.install(tmp, folder, marker=_META)
        return folder
    except (OSError, MemoryError) as e:  # the disk (full, read-only), memory: tried again next time
        log.info("openvino: cannot keep the text tower of %s (%s); text queries stay in torch", name, one_line(e))
    except Exception as e:  # noqa: BLE001 - tokens or vectors not torch's, tracing and conversion errors
        why = str(e) if isinstance(e, _NotKept) else one_line(e)
        log.info("openvino: text queries stay in torch for %s (%s)", name, why)
        kept_folder.refuse(folder, why)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


class _NotKept(Exception):
    """The kept tower would not give torch's tokens or vectors: nothing is kept."""


def _keep(name: str, tokenizer: Any, model: Any, torch_vectors: Callable[[Sequence[str]], np.ndarray],
          tmp: Path, cache: Path | None) -> None:
    import numpy as np

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = _text_transformer(model)
    if backend is None or text is None:
        raise _NotKept("its tokenizer or text tower is not of the kind converted here")
    meta = {"format": _FORMAT, **_tables(name, text), "pad_id": int(tokenizer.pad_token_id),
            "pad_token": str(tokenizer.pad_token), "pad_type_id": int(getattr(tokenizer, "pad_token_type_id", 0)),
            "truncation_side": str(getattr(tokenizer, "truncation_side", "right")),
            "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False))}
    import tokenizers

    plain = tokenizers.Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    plain.save(str(tmp / "tokenizer.json"))
    # The special tokens the tower has rows for (a tokenizer may name more than its model has).
    rows = int(text.embeddings.token_embedding.num_embeddings)
    specials = " ".join(str(t) for t in getattr(tokenizer, "all_special_tokens", ())
                        if 0 <= _token_id(tokenizer, t) < rows)
    probes = [query_text(p) for p in PROBES] + [f"a {specials} b", specials]
    want = tokenizer(probes, padding="max_length", max_length=TEXT_LENGTH, truncation=True)["input_ids"]
    if _encode(_tokenizer(tmp / "tokenizer.json", meta), probes).tolist() != [list(ids) for ids in want]:
        raise _NotKept("its tokenizer, called directly, gives other tokens than through transformers")
    log.info("openvino: converting the text tower, once (kept in %s)", tmp.parent)
    ov.save_ir(_convert(text), tmp / "text.xml", compress_to_fp16=False)
    # Not compiled into OpenVINO's model cache from here: the folder is renamed next.
    got = TextTower(tmp, meta, name, cache=cache, keep_compiled=False).embed_texts(probes)
    cosine = float(np.min(np.sum(got * torch_vectors(probes), axis=1)))
    if not cosine >= MIN_COSINE:
        raise _NotKept(f"the converted tower's vectors differ from torch's (cosine {cosine:.6f})")
    (tmp / _META).write_text(json.dumps(meta))


def _token_id(tokenizer: Any, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    return found if isinstance(found, int) else -1


def _tokenizer(path: Path, meta: dict[str, Any]) -> Any:
    """The kept tokenizer, padding and cutting as transformers' call in text_query does."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=TEXT_LENGTH, direction=meta["truncation_side"])
    tok.enable_padding(direction="right", pad_id=meta["pad_id"], pad_type_id=meta["pad_type_id"],
                       pad_token=meta["pad_token"], length=TEXT_LENGTH)
    # transformers sets this on its tokenizer at every call; the saved JSON does not hold it.
    tok.encode_special_tokens = meta["split_special_tokens"]
    return tok


def _encode(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    import numpy as np

    return np.array([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=np.int64).reshape(-1, TEXT_LENGTH)


def _text_transformer(model: Any) -> Any:
    """The module with the embeddings, encoder, final layer norm and head: the model itself
    (a text tower in transformers 5) or one it holds (a whole model, or transformers 4)."""
    for m in (model, getattr(model, "text_model", None), getattr(getattr(model, "text_model", None), "text_model",
                                                                   None)):
        if m is not None and all(hasattr(m, a) for a in ("embeddings", "encoder", "final_layer_norm", "head")):
            return m
    return None


def _tables(name: str, text: Any) -> dict[str, str]:
    """The names, in the checkpoint's safetensors, of the token and position embeddings the
    loaded tower holds; _NotKept where the files do not hold those very values."""
    import numpy as np

    found = model_files.tensors(name, ("text_model.embeddings.", "embeddings."))
    out = {}
    for part, module in (("token", text.embeddings.token_embedding), ("position", text.embeddings.position_embedding)):
        names = sorted((k for k in found if k.endswith(f"embeddings.{part}_embedding.weight")), key=len, reverse=True)
        weight = module.weight.detach().float().numpy()
        if not names or found[names[0]].shape != weight.shape:
            raise _NotKept(f"the checkpoint's safetensors hold no {part} embeddings of the tower's shape")
        info = found[names[0]]
        sample = sorted({0, len(weight) // 2, len(weight) - 1})
        if not np.array_equal(model_files.read_rows(info, sample), weight[sample]):
            raise _NotKept(f"the {part} embeddings in the checkpoint's files are not those loaded")
        out[part] = names[0]
    return out


def _convert(text: Any) -> Any:
    openvino = ov.openvino_module()
    import torch
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    class EncoderHead(torch.nn.Module):
        """The text tower after its embeddings: no attention mask, as SigLIP 2 was trained
        (it attends to the padding too), and the last position pooled."""

        def __init__(self) -> None:
            super().__init__()
            self.text = text

        def forward(self, embeds: torch.Tensor) -> torch.Tensor:
            out = self.text.encoder(inputs_embeds=embeds)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            return self.text.head(self.text.final_layer_norm(hidden)[:, -1, :])

    from .model_load import quiet_transformers

    width = int(text.config.hidden_size)
    # The tracer warns about each Python branch of transformers' code, and transformers
    # about attributes the tracer reads (its loss function).
    with torch.inference_mode(False), torch.no_grad(), quiet_transformers(), ov.converter_without_telemetry():
        # As openvino_vision converts: without torch's trace check (a second trace held
        # beside the first), the constants pointing at the tower's weights (no copy).
        decoder = TorchScriptPythonDecoder(EncoderHead().eval(), example_input=(torch.zeros(1, TEXT_LENGTH, width),),
                                           shared_memory=True, trace_kwargs={"check_trace": False})
        return openvino.convert_model(decoder, input=[openvino.PartialShape([-1, TEXT_LENGTH, width])])
