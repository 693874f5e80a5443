"""The vector of a text query (`search`), by SigLIP 2's text tower: through OpenVINO where an
earlier search kept the tower converted (openvino_text.py: neither torch nor transformers
is imported), else through torch, after which the tower is kept for the next search.

As SigLIP 2 was trained: lower-cased text, padded to exactly 64 tokens (padding=
"max_length"; longer text is cut), and no attention mask: the text tower attends to the
padding too and pools the last position, so dynamic padding or a mask would give other
vectors than training did. On the CPU and in float32 either way: a query is one short
text, which the CPU answers sooner than a GPU could be set up; casting the tower to
bfloat16 costs about what its one forward pass saves; and every image vector is compared
with this one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import one_line
from .model_load import load_text_model

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# As SigLIP 2 was trained: every text padded (or cut) to exactly this many tokens.
TEXT_LENGTH = 64


def query_text(text: str) -> str:
    """A query as the tokenizer gets it: lower-cased, as SigLIP 2 was trained."""
    return text.lower()


def embed_query(model_name: str, text: str) -> tuple[np.ndarray, Callable[[], bool] | None]:
    """The (dim,) float32 vector of text, L2-normalised, comparable with the image vectors by
    cosine (Siglip2Model.get_text_features); and what is left to do once the answer is
    shown: keeping the tower for OpenVINO after a search through torch (it takes seconds
    and twice the memory, so it waits until the hits are out), which says whether it
    kept it. None where nothing is left."""
    from . import openvino_text

    kept = openvino_text.TextTower.find(model_name)
    if kept is not None:
        try:
            return kept.embed_texts([text])[0], None
        except Exception as e:  # noqa: BLE001 - a weights file replaced since, OpenVINO failing: torch answers
            log.info("openvino: the kept text tower failed (%s); using torch", one_line(e))
            if not isinstance(e, MemoryError) and kept.broken():
                log.info("openvino: it fails on any text: it is kept anew")
                kept.discard()
    tower = TorchText(model_name).load()
    vector = tower.embed_texts([text])[0]
    return vector, (tower.keep_for_openvino if openvino_text.would_keep(model_name) else None)


class TorchText:
    """The tokenizer and text tower loaded through transformers, on the CPU in float32."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._tokenizer: Any = None
        self._model: Any = None
        self._text_only = False

    def load(self) -> TorchText:
        """Load the tokenizer and the text tower; safe to call again."""
        if self._model is None:
            import torch

            tokenizer, model, self._text_only = load_text_model(self.model_name, None)
            model.to(device="cpu", dtype=torch.float32)
            model.eval()
            # SigLIP 2 pads on the right (the checkpoints' tokenizer config says so; some
            # tokenizer classes default to the left): the text must sit at the positions it
            # was trained at.
            tokenizer.padding_side = "right"
            self._tokenizer, self._model = tokenizer, model
        return self

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (n, dim) float32, L2-normalised."""
        import torch

        self.load()
        batch = self._tokenizer([query_text(t) for t in texts], padding="max_length", max_length=TEXT_LENGTH,
                                truncation=True, return_tensors="pt")
        with torch.inference_mode():
            if self._text_only:
                out = self._model(input_ids=batch["input_ids"])
            else:
                out = self._model.get_text_features(input_ids=batch["input_ids"])
            # transformers 5 returns an output object, 4.x returned the tensor itself.
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            features = features.float()
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype("<f4", copy=False)

    def keep_for_openvino(self) -> bool:
        """Keep the tower for OpenVINO, for the next search (openvino_text.keep); whether it
        is kept."""
        from . import openvino_text

        self.load()
        return openvino_text.keep(self.model_name, self._tokenizer, self._model, self.embed_texts) is not None
