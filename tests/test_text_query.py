"""A text query's vector: torch on a checkpoint's first search, which then keeps the tower for
OpenVINO; later searches import neither torch nor transformers and give torch's vectors
(float32: within 0.9999) and its ranking. What would not give torch's tokens or vectors is
never kept, and a changed checkpoint is never answered from an old folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_photo

from sqlindexer import model_files, openvino_text
from sqlindexer import openvino_vision as ov_vision
from sqlindexer.text_query import TorchText

needs_openvino = pytest.mark.skipif(not ov_vision.installed(), reason="openvino is not installed (the openvino extra)")

TEXTS = ["a red car", "A CAT at night", "ümlaut ß ø 漢字 🐈", "", "x" * 300, "photo  of\ta dog"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "openvino-cache"
    monkeypatch.setenv(ov_vision.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def model(tmp_path):
    """A tiny model of its own: the tests change its files."""
    from sqlindexer.testing import build_random_siglip2

    return build_random_siglip2(tmp_path / "model", seed=3)


def _kept(model, **kwargs):
    torch_text = TorchText(str(model)).load()
    return torch_text, openvino_text.keep(str(model), torch_text._tokenizer, torch_text._model, torch_text.embed_texts,
                                          **kwargs)


@needs_openvino
def test_the_kept_tower_gives_torch_float32_vectors_and_transformers_tokens(model, cache):
    torch_text, folder = _kept(model)
    assert folder is not None and (folder / "text.json").is_file()
    kept = openvino_text.TextTower.find(str(model))
    assert kept is not None
    got, want = kept.embed_texts(TEXTS), torch_text.embed_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert float(np.min(np.sum(got * want, axis=1))) >= openvino_text.MIN_COSINE
    texts = [openvino_text.query_text(t) for t in TEXTS]
    ids = torch_text._tokenizer(texts, padding="max_length", max_length=64, truncation=True)["input_ids"]
    assert openvino_text._encode(kept._tokenizer, texts).tolist() == ids


@needs_openvino
def test_a_tokenizer_that_pads_otherwise_keeps_nothing(model, cache, caplog):
    """Padded on the left, transformers' call gives other ids than the kept tokenizer
    (always on the right, as SigLIP 2 was trained): nothing is kept."""
    torch_text = TorchText(str(model)).load()
    torch_text._tokenizer.padding_side = "left"
    with caplog.at_level(logging.INFO, logger="sqlindexer.openvino_text"):
        assert openvino_text.keep(str(model), torch_text._tokenizer, torch_text._model, torch_text.embed_texts) is None
    assert "other tokens" in caplog.text
    assert openvino_text.TextTower.find(str(model)) is None
    # Not even a half-made folder; the reason is recorded, and not tried again.
    folder = openvino_text.folder_for(str(model))
    assert [p.name for p in (cache / "text").iterdir()] == [folder.name + ".not-kept"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sqlindexer.openvino_text"):
        assert openvino_text.keep(str(model), torch_text._tokenizer, torch_text._model, torch_text.embed_texts) is None
    assert "converting" not in caplog.text and "other tokens" not in caplog.text


@needs_openvino
def test_a_tokenizer_that_splits_special_tokens_is_kept_as_it_splits_them(model, cache):
    torch_text = TorchText(str(model)).load()
    torch_text._tokenizer.split_special_tokens = True
    folder = openvino_text.keep(str(model), torch_text._tokenizer, torch_text._model, torch_text.embed_texts)
    assert folder is not None
    kept = openvino_text.TextTower.find(str(model))
    texts = ["a photo <eos> of <pad> a </s> cat"]
    want = torch_text._tokenizer(texts, padding="max_length", max_length=64, truncation=True)["input_ids"]
    assert openvino_text._encode(kept._tokenizer, texts).tolist() == want
    plain = torch_text._tokenizer.__class__.from_pretrained(str(model))
    assert plain(texts, padding="max_length", max_length=64, truncation=True)["input_ids"] != want


@needs_openvino
def test_a_tower_whose_vectors_differ_from_torchs_keeps_nothing(model, cache, caplog):
    torch_text = TorchText(str(model)).load()
    with caplog.at_level(logging.INFO, logger="sqlindexer.openvino_text"):
        folder = openvino_text.keep(str(model), torch_text._tokenizer, torch_text._model,
                                    lambda texts: -torch_text.embed_texts(texts))
    assert folder is None and "differ from torch's" in caplog.text
    assert openvino_text.TextTower.find(str(model)) is None


@needs_openvino
@pytest.mark.parametrize("changed", ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"])
def test_changed_checkpoint_files_are_never_answered_from_the_old_folder(model, cache, changed):
    """Weight and tokenizer files by path, size and mtime; config.json by its content."""
    _, folder = _kept(model)
    assert openvino_text.TextTower.find(str(model)) is not None
    path = model / changed
    if changed == "config.json":
        path.write_text(json.dumps({**json.loads(path.read_text()), "edited": True}))
    else:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert openvino_text.folder_for(str(model)) != folder
    assert openvino_text.TextTower.find(str(model)) is None


@needs_openvino
def test_a_damaged_kept_tower_falls_back_to_torch_and_is_kept_anew(model, cache, caplog):
    _, folder = _kept(model)
    (folder / "text.bin").write_bytes(b"\0" * 16)
    with caplog.at_level(logging.INFO, logger="sqlindexer.openvino_text"):
        assert openvino_text.TextTower.find(str(model)) is None
    assert "cannot use the text tower" in caplog.text and not folder.exists()
    assert _kept(model)[1] == folder
    assert openvino_text.TextTower.find(str(model)) is not None


@needs_openvino
@pytest.mark.parametrize("failing", ["every text", "this query", "for want of memory"])
def test_a_kept_tower_that_fails_is_answered_by_torch(model, cache, monkeypatch, caplog, failing):
    """Torch answers; the kept folder is removed and kept anew only where it fails on a
    plain text too (not for one query's sake, nor for want of memory)."""
    from sqlindexer.text_query import embed_query

    torch_text, folder = _kept(model)
    real = openvino_text.TextTower.embed_texts

    def fails(self, texts):
        if failing == "for want of memory":
            raise MemoryError()
        if failing == "every text" or texts == ["a red car"]:
            raise RuntimeError("Exception from src/inference: the request failed")
        return real(self, texts)

    with caplog.at_level(logging.INFO, logger="sqlindexer"):
        with monkeypatch.context() as m:
            m.setattr(openvino_text.TextTower, "embed_texts", fails)
            got, then = embed_query(str(model), "a red car")
        assert "the kept text tower failed" in caplog.text
        assert np.array_equal(got, torch_text.embed_texts(["a red car"])[0])  # torch's own vector
        if failing != "every text":
            assert then is None and (folder / "text.json").is_file()
            return
        assert not folder.exists() and [p.name for p in (cache / "text").iterdir()] == []
        assert then()
    assert "converting the text tower" in caplog.text
    assert (folder / "text.json").is_file() and not folder.with_name(folder.name + ".not-kept").exists()
    assert float(openvino_text.TextTower.find(str(model)).embed_texts(["a red car"])[0] @ got) >= 0.9999


@needs_openvino
def test_what_a_removal_cut_short_left_under_the_name_is_replaced(model, cache):
    _, folder = _kept(model)
    (folder / "text.json").unlink()  # as a removal killed half-way left it, before removals went aside
    assert openvino_text.TextTower.find(str(model)) is None
    # What a removal killed half-way leaves now: it is not a keep killed, and goes at the next keep.
    aside = folder.with_name(f".{folder.name}.removing-0123")
    (aside / "partial").mkdir(parents=True)
    assert openvino_text.would_keep(str(model))
    assert _kept(model)[1] == folder and openvino_text.TextTower.find(str(model)) is not None
    assert [p.name for p in (cache / "text").iterdir()] == [folder.name]


@needs_openvino
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), MemoryError()])
def test_a_full_disk_or_memory_keeps_nothing_and_is_tried_again(model, cache, monkeypatch, error):
    def fails(*args, **kwargs):
        raise error

    with monkeypatch.context() as m:
        m.setattr(ov_vision, "save_ir", fails)
        assert _kept(model)[1] is None
    assert [p.name for p in (cache / "text").iterdir()] == []  # no half-made folder, no lasting refusal
    assert _kept(model)[1] is not None


def test_a_cache_that_cannot_be_written_leaves_search_to_torch(tmp_path, tiny_model, monkeypatch):
    from click.testing import CliRunner
    from conftest import run_cli

    photos = tmp_path / "photos"
    for i in range(3):
        make_photo(photos / f"p{i}.jpg", seed=60 + i)
    runner = CliRunner()
    run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", tiny_model, "--backend", "torch"])
    (tmp_path / "a-file").write_text("where the cache folder would be\n")
    monkeypatch.setenv(ov_vision.CACHE_ENV, str(tmp_path / "a-file"))
    assert not openvino_text.would_keep(str(tiny_model))  # no conversion to pay for
    done = run_cli(runner, ["search", "a red car", "--db", tmp_path / "index.sqlite", "--json"])
    assert len(done.stdout.splitlines()) == 3
    assert "kept" not in done.stderr, done.stderr


@needs_openvino
def test_ctrl_c_while_keeping_leaves_the_hits_and_nothing_half_kept(tmp_path, tiny_model, monkeypatch):
    from click.testing import CliRunner
    from conftest import run_cli

    photos = tmp_path / "photos"
    for i in range(3):
        make_photo(photos / f"p{i}.jpg", seed=70 + i)
    cache = tmp_path / "openvino-cache"
    monkeypatch.setenv(ov_vision.CACHE_ENV, str(cache))
    runner = CliRunner()
    run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", tiny_model, "--backend", "torch"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ov_vision, "save_ir", interrupted)  # in the middle of the keep
    done = run_cli(runner, ["search", "a red car", "--db", tmp_path / "index.sqlite", "--json"], ok=False)
    assert done.exit_code == 130 and len(done.stdout.splitlines()) == 3
    assert done.stderr.splitlines()[-1].startswith("interrupted while keeping the text tower"), done.stderr
    assert [p.name for p in (cache / "text").iterdir()] == []


def test_rows_are_read_alone_in_each_dtype_a_checkpoint_may_hold(tmp_path):
    from safetensors.torch import save_file

    table = torch.randn(50, 6)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({"t": table.to(dtype)}, str(path))
        info = model_files.read_header(str(path))["t"]
        rows = [7, 0, 49, 7]
        assert np.array_equal(model_files.read_rows(info, rows), table.to(dtype).float().numpy()[rows])
        with pytest.raises(ValueError, match="row 50 is outside"):
            model_files.read_rows(info, [50])


PROBE = """
import sys
from sqlindexer.cli import cli
try:
    cli({args!r})
except SystemExit as e:
    assert not e.code, e.code
print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)
"""


@needs_openvino
def test_a_second_search_imports_neither_torch_nor_transformers_and_ranks_the_same(tmp_path, tiny_model,
                                                                                  monkeypatch):
    from click.testing import CliRunner
    from conftest import run_cli

    photos = tmp_path / "photos"
    for i in range(8):
        make_photo(photos / f"p{i}.jpg", size=(60 + 9 * i, 50), seed=40 + i)
    cache = tmp_path / "openvino-cache"
    monkeypatch.setenv(ov_vision.CACHE_ENV, str(cache))
    runner = CliRunner()
    run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", tiny_model, "--backend", "torch"])
    search = ["search", "a red car at night", "--db", str(tmp_path / "index.sqlite"), "--top", "8", "--json"]
    first = run_cli(runner, search)  # torch, then the tower is kept
    assert list((cache / "text").glob("*/text.json"))
    # Kept after the answer is out: the hits, then the summary, then the line saying so.
    said = first.stderr.splitlines()
    assert said[-1].startswith("kept the text tower") and said[-2].startswith("8 of 8 images"), said
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    second = subprocess.run([sys.executable, "-c", PROBE.format(args=search)], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "[]" in second.stderr.splitlines(), second.stderr
    assert "kept the text tower" not in second.stderr, second.stderr
    hits = [[json.loads(line) for line in out.splitlines()] for out in (first.stdout, second.stdout)]
    assert [h["path"] for h in hits[0]] == [h["path"] for h in hits[1]] and len(hits[0]) == 8
    assert max(abs(a["score"] - b["score"]) for a, b in zip(*hits)) <= 1e-4


@needs_openvino
def test_what_a_killed_search_left_half_kept_is_removed(model, cache):
    folder = openvino_text.folder_for(str(model))
    old, recent = folder.with_name(f".{folder.name}.old"), folder.with_name(f".{folder.name}.recent")
    for left in (old, recent):
        (left / "partial").mkdir(parents=True)
    hours_ago = os.stat(old).st_mtime - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    _kept(model)
    # The recent one may be another search's, still keeping it.
    assert not old.exists() and recent.exists() and (folder / "text.json").is_file()


@needs_openvino
def test_after_two_keeps_killed_within_the_hour_searches_stop_trying(model, cache):
    """A machine whose memory cannot hold the conversion would otherwise pay it, and have
    the search killed, every time."""
    folder = openvino_text.folder_for(str(model))
    assert openvino_text.would_keep(str(model))
    killed = [folder.with_name(f".{folder.name}.killed{i}") for i in range(2)]
    for left in killed:
        (left / "partial").mkdir(parents=True)
    assert not openvino_text.would_keep(str(model))
    hours_ago = os.stat(killed[0]).st_mtime - 2 * 3600
    os.utime(killed[0], (hours_ago, hours_ago))
    assert openvino_text.would_keep(str(model))
    _kept(model)
    assert not openvino_text.would_keep(str(model))  # kept now
