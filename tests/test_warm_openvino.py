"""A warm OpenVINO run without torch or transformers: the vision embeddings in numpy against
transformers' own module, the checkpoint's files read by hand (safetensors headers and
tensors, JSON configs), the device found without torch, and a real run that imports
neither and gives the vectors of torch float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, make_photo, read_jsonl, run_cli

from sqlindexer import model_files, model_load
from sqlindexer import openvino_vision as ov_vision
from sqlindexer.patches import PatchSpec
from sqlindexer.vision_embeddings import VisionEmbeddings, embedding_width, resize_weights

needs_openvino = pytest.mark.skipif(not ov_vision.installed(), reason="openvino is not installed (the openvino extra)")


@pytest.fixture(scope="module")
def tower_embeddings(tiny_model):
    """transformers' Siglip2VisionEmbeddings of the tiny model, loaded by transformers."""
    from transformers import Siglip2VisionModel

    model = Siglip2VisionModel.from_pretrained(tiny_model).eval()
    return getattr(model, "vision_model", model).embeddings


def test_numpy_embeddings_equal_transformers_for_every_grid(tiny_model, tower_embeddings):
    """The resized positions for every patch grid an image can have (h x w <= the grid's
    positions, so the position grid is enlarged along one axis and shrunk along the other,
    with antialiasing), padded positions included; the whole embeddings on a sample."""
    ours = VisionEmbeddings.from_checkpoint(str(tiny_model))
    length = ours.grid ** 2
    grids = [(h, w) for h in range(1, length + 1) for w in range(1, length // h + 1)]
    assert len(grids) > 1000 and (1, length) in grids and (length, 1) in grids
    grid = torch.from_numpy(ours.positions).reshape(ours.grid, ours.grid, -1)
    worst = 0.0
    for i in range(0, len(grids), 128):
        shapes = grids[i : i + 128]
        want = tower_embeddings.resize_positional_embeddings(grid, torch.tensor(shapes), length).numpy()
        got = np.stack([ours._positions(h, w, length) for h, w in shapes])
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst < 1e-6, worst
    rng = np.random.default_rng(0)
    shapes = np.array(grids[:: len(grids) // 40])
    pixels = rng.standard_normal((len(shapes), length, ours.weight_t.shape[0])).astype(np.float32)
    with torch.no_grad():
        want = tower_embeddings(torch.from_numpy(pixels), torch.from_numpy(shapes)).numpy()
    assert float(np.abs(ours(pixels, shapes) - want).max() / np.abs(want).max()) < 1e-6


def test_resize_weights_are_interpolate_antialias(tower_embeddings):
    """The weights alone against F.interpolate itself, on a grid of one-hot positions."""
    grid = 16
    eye = torch.eye(grid * grid).reshape(grid * grid, grid, grid)[None]  # each channel one position
    for h, w in [(16, 16), (8, 32), (32, 8), (1, 256), (7, 9), (20, 12)]:
        want = torch.nn.functional.interpolate(eye, size=(h, w), mode="bilinear", align_corners=False,
                                               antialias=True)[0].reshape(grid * grid, h * w).T.numpy()
        got = resize_weights(grid, h, w, 256)
        assert np.abs(got[: h * w] - want).max() < 1e-6, (h, w)
        assert (got[h * w :] == got[0]).all()  # padding takes position 0's weights


def test_embeddings_from_the_checkpoint_equal_those_of_the_loaded_module(tiny_model, tower_embeddings):
    a = VisionEmbeddings.from_checkpoint(str(tiny_model))
    b = VisionEmbeddings.from_module(tower_embeddings)
    assert np.array_equal(a.weight_t, b.weight_t) and np.array_equal(a.bias, b.bias)
    assert np.array_equal(a.positions, b.positions)
    assert embedding_width(str(tiny_model)) == tower_embeddings.embed_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_are_read_in_each_dtype_a_checkpoint_may_hold(tmp_path, dtype):
    from safetensors.torch import save_file

    values = torch.randn(5, 7).to(dtype)
    save_file({"vision_model.embeddings.x": values, "other": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    found = model_files.tensors(str(tmp_path), ("vision_model.embeddings.",))
    assert list(found) == ["vision_model.embeddings.x"]
    got = model_files.read_tensor(found["vision_model.embeddings.x"])
    assert got.dtype == np.float32 and np.array_equal(got, values.float().numpy())


def test_a_sharded_checkpoint_is_read_from_the_shards_its_index_names(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model / "model.safetensors"))
    # The embeddings in a shard of their own with some other tensors, the rest in another.
    keys = sorted(state)
    weight_map = {k: "b.safetensors" if k.startswith("vision_model.embeddings.") or i % 3 == 0 else "a.safetensors"
                  for i, k in enumerate(keys)}
    for shard in ("a.safetensors", "b.safetensors"):
        save_file({k: state[k] for k in keys if weight_map[k] == shard}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = VisionEmbeddings.from_checkpoint(str(tmp_path))
    want = VisionEmbeddings.from_checkpoint(str(tiny_model))
    assert np.array_equal(got.positions, want.positions) and np.array_equal(got.weight_t, want.weight_t)
    # The shard that holds the embeddings missing: not on disk, so not read here.
    (tmp_path / "b.safetensors").unlink()
    assert embedding_width(str(tmp_path)) is None and VisionEmbeddings.from_checkpoint(str(tmp_path)) is None


def _safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize(("content", "message"), [
    (b"\x01\x02", "too short"),
    (b"\xff" * 64, "header length"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 100]}}, "lies outside the file"),
    ({"x": {"dtype": "F32", "shape": [2]}}, "malformed header entry"),
    (b"[1, 2]", "not an object"),
    (b"{not json", "not JSON"),
])
def test_a_malformed_safetensors_header_is_a_value_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    if isinstance(content, bytes) and not content.startswith((b"[", b"{")):
        path.write_bytes(content)
    else:
        _safetensors(path, content, b"\0" * 8)
    with pytest.raises(ValueError, match=f"model.safetensors.*{message}"):
        model_files.read_header(str(path))


def test_a_tensor_whose_bytes_do_not_match_its_shape_or_dtype_is_refused(tmp_path):
    path = _safetensors(tmp_path / "model.safetensors", {
        "short": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
        "ints": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
        "fine": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, np.array([1.5, -2], "<f4").tobytes())
    found = model_files.read_header(str(path))
    with pytest.raises(ValueError, match="does not match its shape"):
        model_files.read_tensor(found["short"])
    with pytest.raises(ValueError, match="dtype I64"):
        model_files.read_tensor(found["ints"])
    assert model_files.read_tensor(found["fine"]).tolist() == [1.5, -2.0]


def test_the_patch_spec_of_the_json_config_is_the_processors(tiny_model):
    from transformers import AutoImageProcessor

    config = json.loads((tiny_model / "preprocessor_config.json").read_text())
    from_json = PatchSpec.from_config(config)
    of = PatchSpec.of(AutoImageProcessor.from_pretrained(tiny_model))
    assert from_json is not None and vars(from_json) == vars(of)
    for key in ("image_mean", "rescale_factor", "patch_size", "resample"):
        assert PatchSpec.from_config({k: v for k, v in config.items() if k != key}) is None, key
    assert PatchSpec.from_config({**config, "image_processor_type": "CLIPImageProcessor"}) is None
    assert PatchSpec.from_config({**config, "resample": 3}) is None


def test_gpu_possible_only_without_any_trace_of_a_gpu_driver():
    """The decision, fed the platform and which paths exist (both branches)."""
    assert not model_load.gpu_possible("linux", lambda path: False)
    for trace in model_load._GPU_DEVICE_FILES:
        assert model_load.gpu_possible("linux", lambda path, trace=trace: path == trace), trace
    assert model_load.gpu_possible("darwin", lambda path: False)  # MPS: torch is asked
    assert model_load.gpu_possible("win32", lambda path: False)


@pytest.fixture
def warm(tiny_model):
    """The tiny model's tower converted into the session's OpenVINO cache."""
    from sqlindexer.embed import Embedder

    Embedder(str(tiny_model), device="cpu", backend="openvino", dtype="float32").load()
    return tiny_model


def _warm(model, **kwargs):
    from sqlindexer.embed import Embedder

    emb = Embedder(str(model), **{"device": "cpu", "backend": "openvino", "dtype": "float32", **kwargs})
    return emb, emb._prepare_warm_openvino()


@needs_openvino
def test_the_warm_path_reads_no_torch_and_no_transformers(warm, monkeypatch):
    # An import of either would now fail.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    # --device auto --backend auto is the CPU only where no GPU driver shows (else torch asks).
    choices = [{}, {"device": "auto"}, {"device": "cpu", "backend": "auto"}]
    for kwargs in choices + ([] if model_load.gpu_possible() else [{"device": "auto", "backend": "auto"}]):
        emb, ok = _warm(warm, **kwargs)
        assert ok and emb.device == "cpu" and emb.backend == "openvino", kwargs


@needs_openvino
@pytest.mark.skipif(not model_load.gpu_possible(), reason="no GPU driver here: --device auto is the CPU")
def test_where_a_gpu_driver_shows_torch_decides_the_device(warm):
    assert not _warm(warm, device="auto", backend="auto")[1]


@needs_openvino
def test_the_warm_path_is_refused_where_it_would_not_be_the_same_run(warm, tmp_path, monkeypatch):
    import shutil

    from sqlindexer.embed import Embedder
    from sqlindexer.errors import BackendError

    assert not _warm(warm, backend="torch")[1]
    assert not _warm(warm, device="cuda", backend="auto")[1]
    assert _warm(warm, device="auto")[1]  # --backend openvino: the CPU whatever GPU there is

    def edited(change):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(warm, folder)
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    assert not _warm(edited(lambda c: c.update(projection_dim=16)))[1]
    assert not _warm(edited(lambda c: c["vision_config"].update(layer_norm_eps=1e-3)))[1]  # another tower
    # auto, where OpenVINO cannot start: torch, prepared through transformers.
    def broken(*args):
        raise BackendError("--backend openvino: OpenVINO cannot start (test)")

    monkeypatch.setattr(ov_vision, "check", broken)
    emb = Embedder(str(warm), device="cpu", backend="auto", dtype="float32")
    assert not emb._prepare_warm_openvino()
    assert emb.prepare().backend == "torch" and emb._config is not None


def test_the_processor_settings_are_read_where_transformers_reads_them(tiny_model, tmp_path):
    """processor_config.json's image_processor first (transformers 5 writes that file
    alone), else preprocessor_config.json."""
    import shutil

    from transformers import AutoImageProcessor

    from sqlindexer.embed import _processor_config

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    assert PatchSpec.from_config(_processor_config(str(folder))).max_patches == settings["max_num_patches"]
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {**settings, "max_num_patches": 64}}))
    assert AutoImageProcessor.from_pretrained(folder).max_num_patches == 64
    assert PatchSpec.from_config(_processor_config(str(folder))).max_patches == 64
    assert PatchSpec.from_config({**settings, "patch_size": "sixteen"}) is None  # the processor says what is wrong


@needs_openvino
def test_embeddings_that_cannot_be_read_load_the_whole_tower_and_embed_the_same(warm, monkeypatch):
    from PIL import Image

    from sqlindexer.embed import Embedder

    def unreadable(cls, name):
        raise ValueError("model.safetensors: a tensor's size does not match its shape (test)")

    emb = Embedder(str(warm), device="cpu", backend="openvino", dtype="float32").prepare()
    assert emb._warm_ir is not None and emb._config is None
    monkeypatch.setattr(VisionEmbeddings, "from_checkpoint", classmethod(unreadable))
    emb.load()
    assert emb._config is not None and emb.backend == "openvino"
    image = (np.random.default_rng(5).random((96, 128, 3)) * 255).astype(np.uint8)
    want = Embedder(str(warm), device="cpu", backend="torch", dtype="float32").embed_images(
        [Image.fromarray(image, "RGB")])
    assert float((emb.embed_images([Image.fromarray(image, "RGB")]) * want).sum()) >= 0.9999


PROBE = """
import sys
from sqlindexer.cli import cli
try:
    cli({args!r})
except SystemExit as e:
    assert not e.code, e.code
print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))
"""


@needs_openvino
@pytest.mark.skipif(model_load.gpu_possible(), reason="a GPU may be here: the device is then torch's to find")
def test_a_warm_openvino_run_imports_neither_torch_nor_transformers(tmp_path, tiny_model):
    """A first run converts the tower (torch and transformers); a second one, on other
    photos, finds it in the cache and loads nothing but the embeddings' tensors. Its vectors
    are torch float32's (--dtype float32: within 0.9999)."""
    photos = tmp_path / "photos"
    for i in range(5):
        make_photo(photos / f"p{i}.jpg", size=(90 + 23 * i, 70), seed=i)
    (tmp_path / "first").mkdir()
    make_photo(tmp_path / "first" / "x.jpg", seed=9)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    common = ["--model-name", str(tiny_model), "--dtype", "float32", "--log-level", "INFO"]
    # The runs that may import torch run in this process; those that must not, in their own.
    runner = CliRunner()
    run_cli(runner, ["-i", tmp_path / "first", "-o", tmp_path / "first.jsonl", *common])
    args = ["-i", str(photos), "-o", str(tmp_path / "warm.jsonl"), *common]
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stderr
    assert "(openvino, f32)" in done.stderr and "converting" not in done.stderr
    # A new image's query (similar) goes the same way: OpenVINO's cached tower.
    query = make_photo(tmp_path / "query.jpg", size=(120, 90), seed=77)
    similar = ["similar", str(query), "--db", str(tmp_path / "warm.sqlite"), "--top", "2", "--model-name",
               str(tiny_model)]
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=similar)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    run_cli(runner, ["-i", photos, "-o", tmp_path / "torch.jsonl", *common, "--backend", "torch"])
    warm = {r["metadata"]["path"]: np.array(r["vector"]) for r in read_jsonl(tmp_path / "warm.jsonl")}
    want = {r["metadata"]["path"]: np.array(r["vector"]) for r in read_jsonl(tmp_path / "torch.jsonl")}
    assert len(warm) == 5 and warm.keys() == want.keys()
    assert min(float(warm[p] @ want[p]) for p in want) >= 0.9999


@needs_openvino
def test_prepared_from_files_the_embedder_needs_no_transformers_config(tiny_model, tmp_path):
    """Once the tower is in the cache, prepare() reads the JSON files only; an image not at
    a target size still goes through the model's own processor, loaded then."""
    from PIL import Image

    from sqlindexer.embed import Embedder

    Embedder(str(tiny_model), device="cpu", backend="openvino", dtype="float32").load()  # the cache warm
    emb = Embedder(str(tiny_model), device="cpu", backend="openvino", dtype="float32").prepare()
    assert emb._warm_ir is not None and emb._config is None and emb._processor is None
    assert emb.backend == "openvino"
    assert emb.dim == Embedder(str(tiny_model), device="cpu", backend="torch").prepare().dim
    odd = (np.random.default_rng(3).random((48, 64, 3)) * 255).astype(np.uint8)
    got = emb.embed_resized([odd])  # not a target size: the processor
    assert emb._processor is not None
    want = Embedder(str(tiny_model), device="cpu", backend="torch", dtype="float32").embed_images(
        [Image.fromarray(odd, "RGB")])
    assert float((got * want).sum()) >= 0.9999


@needs_openvino
def test_a_query_image_is_embedded_by_the_cached_tower_as_by_torch(warm, tmp_path, monkeypatch):
    from sqlindexer import search
    from sqlindexer.embed import Embedder

    query = make_photo(tmp_path / "query.jpg", size=(150, 100), seed=78)
    emb = search._image_embedder(str(warm), None)
    assert emb.backend == "openvino" and emb._warm_ir is not None
    got = search.embed_image_file(emb, str(query))
    want = search.embed_image_file(Embedder(str(warm), device="cpu", dtype="float32", backend="torch"), str(query))
    assert float(got @ want) >= 0.999  # OpenVINO's own precision, bf16 where native: 0.999
    # Without the tower in the cache: torch, with nothing to convert first.
    monkeypatch.setenv(ov_vision.CACHE_ENV, str(tmp_path / "empty-cache"))
    assert search._image_embedder(str(warm), None).requested_backend == "torch"


@needs_openvino
def test_openvino_sends_no_telemetry_and_forks_nothing():
    """Importing openvino imports its converter, which would send a usage event from a
    process forked for it (a fork of a multi-threaded indexer that could hang at exit)."""
    code = ("import multiprocessing, sys\n"
            "from sqlindexer import openvino_vision as ov\n"
            "ov.core()\n"
            "from openvino.tools.ovc import telemetry_utils\n"
            "print(telemetry_utils.tm.__name__, len(multiprocessing.active_children()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "0"], done.stdout
