"""Build randomly initialised SigLIP 2 checkpoints offline, for tests and benchmarks.

The model code is the real transformers code; only the weights are random. Nothing is
downloaded: the config, image processor and a small byte-level tokenizer are built here.
"""

from __future__ import annotations

from pathlib import Path

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# The exact shape of google/siglip2-base-patch16-naflex: times like the real model.
BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def _tokenizer_vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for word in ("▁a", "▁photo", "▁of", "▁red", "▁car", "▁cat", "▁dog", "▁at", "▁night"):
        vocab[word] = len(vocab)
    return vocab


def build_random_siglip2(
    folder: str | Path,
    *,
    shape: dict[str, int] = TINY,
    seed: int = 0,
    max_num_patches: int = 256,
    patch_size: int = 16,
    with_tokenizer: bool = True,
) -> Path:
    """save_pretrained a random SigLIP 2 (model, image processor, tokenizer) into folder."""
    import torch
    from transformers import Siglip2Config, Siglip2Model

    from .embed import quiet_transformers

    folder = Path(folder)
    vocab = _tokenizer_vocab()
    torch.manual_seed(seed)
    text = dict(shape, vocab_size=len(vocab), max_position_embeddings=64,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = dict(shape, num_patches=max_num_patches, patch_size=patch_size)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    # Saving compares the config with a default one, whose own bos/eos ids lie outside its
    # vocabulary: transformers warns about its defaults, not about this checkpoint. Nor is
    # a progress bar for writing one small file of use.
    with quiet_transformers():
        model.save_pretrained(folder)
    _image_processor(max_num_patches=max_num_patches, patch_size=patch_size).save_pretrained(folder)
    if with_tokenizer:
        from transformers import Siglip2Tokenizer

        Siglip2Tokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


def _image_processor(**kwargs: int):
    import transformers

    # Without torchvision transformers 5 only has the PIL backend; both give the same output.
    cls = getattr(transformers, "Siglip2ImageProcessorPil", None)
    try:
        import torchvision  # noqa: F401

        cls = transformers.Siglip2ImageProcessor
    except ImportError:
        cls = cls or transformers.Siglip2ImageProcessor
    return cls(**kwargs)
