"""The CPU's dtype choice, the --backend choice and its errors, and that every backend and
precision gives the vectors of torch float32: on the real model code (a tiny random SigLIP 2),
on generated images and on the shared corpus."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_photo

from sqlindexer import cpu
from sqlindexer import openvino_vision as ov_vision
from sqlindexer import process_memory
from sqlindexer.errors import BackendError

needs_openvino = pytest.mark.skipif(not ov_vision.installed(), reason="openvino is not installed (the openvino extra)")


# -- the CPU's dtype ---------------------------------------------------------------------
@pytest.mark.parametrize(("features", "want"), [
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, ("bfloat16", "avx512_bf16")),  # Zen 4, Cooper Lake
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, ("bfloat16", "amx_bf16")),  # Sapphire Rapids
    ({"fp", "asimd", "sve", "bf16"}, ("bfloat16", "bf16")),  # Graviton 3, Apple M2 (sysctl FEAT_BF16)
    ({"AVX512_BF16"}, ("bfloat16", "avx512_bf16")),
    ({"sse4_2", "avx", "avx2", "fma", "f16c"}, ("float32", "no native bfloat16")),  # the earlier AVX2 machine
    ({"avx2", "avx512f", "avx512_vnni"}, ("float32", "no native bfloat16")),  # Ice Lake: AVX-512, no bf16
    ({"fp", "asimd"}, ("float32", "no native bfloat16")),
    (set(), ("float32", "no native bfloat16")),
])
def test_dtype_follows_the_cpu_s_features(features, want):
    assert cpu.choose_dtype(features) == want


def test_this_cpu_s_features_and_the_log_line(caplog, monkeypatch):
    found = cpu.features()
    assert isinstance(found, frozenset) and all(isinstance(f, str) and f == f.lower() for f in found)
    if sys.platform.startswith("linux"):
        assert found, "no CPU flags read from /proc/cpuinfo"
    dtype, reason = cpu.choose_dtype(found)
    monkeypatch.setattr(cpu, "_logged", False)
    with caplog.at_level(logging.INFO, logger="sqlindexer.cpu"):
        assert cpu.auto_dtype() == dtype
        assert cpu.auto_dtype() == dtype
    lines = [r.getMessage() for r in caplog.records if r.name == "sqlindexer.cpu"]
    assert lines == [f"cpu: {dtype} ({reason})"]  # once per process


def test_auto_dtype_on_a_cpu_is_the_cpu_s_choice():
    import torch

    from sqlindexer.embed import resolve_dtype

    assert resolve_dtype("auto", "cpu") == getattr(torch, cpu.choose_dtype(cpu.features())[0])
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("auto", "mps") == torch.float32


def test_importing_the_embedder_imports_nothing_heavy():
    code = ("import sys, sqlindexer.embed, sqlindexer.cpu, sqlindexer.openvino_vision, sqlindexer.config\n"
            "heavy = [m for m in ('torch', 'transformers', 'openvino', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


# -- the backend choice ------------------------------------------------------------------
def test_auto_backend_picks_by_device_and_install():
    from sqlindexer.embed import resolve_backend

    kw = {"model_type": "siglip2", "model_name": "m"}
    assert resolve_backend("auto", "cuda", **kw) == "torch"
    assert resolve_backend("auto", "mps", **kw) == "torch"
    assert resolve_backend("torch", "cpu", **kw) == "torch"
    assert resolve_backend("auto", "cpu", **kw) == ("openvino" if ov_vision.installed() else "torch")
    # A model OpenVINO's conversion does not know runs in torch under auto.
    assert resolve_backend("auto", "cpu", model_type="clip", model_name="m") == "torch"


def assert_one_line(e: BaseException, *needles: str) -> None:
    text = str(e)
    assert "\n" not in text and text.strip() == text, text
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize(("device", "backend", "needles"), [
    ("cuda", "openvino", ("--backend openvino", "cuda")),
    ("mps", "openvino", ("--backend openvino", "mps")),
    ("cpu", "tensorrt", ("tensorrt", "auto, torch, openvino")),
])
def test_bad_backend_choices_are_one_line_errors_before_any_work(tiny_model, device, backend, needles):
    from sqlindexer.embed import Embedder

    emb = Embedder(str(tiny_model), device=device, backend=backend)
    with pytest.raises(BackendError) as e:
        emb.prepare()
    assert_one_line(e.value, *needles)
    assert emb._model is None


def test_openvino_backend_for_a_model_it_cannot_run(tmp_path):
    """A checkpoint of another architecture (here a tiny CLIP, saved by transformers)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sqlindexer.embed import Embedder

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 16})).save_pretrained(
        tmp_path / "clip")
    CLIPImageProcessor().save_pretrained(tmp_path / "clip")
    with pytest.raises(BackendError) as e:
        Embedder(str(tmp_path / "clip"), device="cpu", backend="openvino").prepare()
    if ov_vision.installed():
        assert_one_line(e.value, "--backend openvino", "SigLIP 2", "clip")
    else:
        assert_one_line(e.value, "--backend openvino", "not installed")
    assert Embedder(str(tmp_path / "clip"), device="cpu").prepare().backend == "torch"


def test_openvino_not_installed_is_a_one_line_error(tiny_model):
    # A fresh process in which openvino cannot be imported, as on a machine without it.
    code = ("import sys\n"
            "sys.modules['openvino'] = None\n"
            "from sqlindexer.embed import Embedder\n"
            "from sqlindexer.errors import BackendError\n"
            f"assert Embedder({str(tiny_model)!r}, device='cpu').prepare().backend == 'torch'\n"
            "try:\n"
            f"    Embedder({str(tiny_model)!r}, device='cpu', backend='openvino').prepare()\n"
            "except BackendError as e:\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "--backend openvino" in lines[0] and "not installed" in lines[0], done.stdout


# -- the same vectors --------------------------------------------------------------------
@pytest.fixture(scope="session")
def ov_cache(tmp_path_factory):
    """One OpenVINO cache for the session: the tiny tower is converted once."""
    path = tmp_path_factory.mktemp("openvino-cache")
    old = os.environ.get(ov_vision.CACHE_ENV)
    os.environ[ov_vision.CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(ov_vision.CACHE_ENV, None)
    else:
        os.environ[ov_vision.CACHE_ENV] = old


# (backend, dtype, least cosine to torch float32): 0.9999 for float32 paths, 0.999 for
# 16-bit ones (OpenVINO runs float16 as bf16 on a CPU without native fp16).
PATHS = [("torch", "bfloat16", 0.999), ("openvino", "float32", 0.9999), ("openvino", "bfloat16", 0.999),
         ("openvino", "auto", 0.999), ("openvino", "float16", 0.999), ("torch", "auto", 0.999)]


@pytest.fixture(scope="module")
def embedders(tiny_model, ov_cache):
    from sqlindexer.embed import Embedder

    made = {("torch", "float32"): Embedder(str(tiny_model), device="cpu", dtype="float32", backend="torch").load()}
    for backend, dtype, _ in PATHS:
        if backend == "openvino" and not ov_vision.installed():
            continue
        made[backend, dtype] = Embedder(str(tiny_model), device="cpu", dtype=dtype, backend=backend).load()
    return made


def prepared(paths: list[Path], emb) -> list[np.ndarray]:
    from sqlindexer.decode import DecodeOptions, prepare

    options = DecodeOptions(patch_size=emb.patch_size, max_num_patches=emb.max_num_patches)
    out = [prepare(str(p), options) for p in paths]
    assert all(p.error is None for p in out), [p.error for p in out if p.error]
    return [p.pixels for p in out]


def check_paths(embedders, arrays: list[np.ndarray]) -> dict[tuple[str, str], float]:
    want = embedders["torch", "float32"].embed_resized(arrays)
    worst = {}
    for backend, dtype, least in PATHS:
        if (backend, dtype) not in embedders:
            continue
        got = embedders[backend, dtype].embed_resized(arrays)
        assert got.shape == want.shape and got.dtype == np.float32
        cos = (got.astype(np.float64) * want).sum(-1)  # both L2-normalised
        worst[backend, dtype] = float(cos.min())
        assert cos.min() >= least, (backend, dtype, float(cos.min()))
    return worst


def test_every_backend_gives_torch_float32_s_vectors_on_generated_images(embedders, tmp_path):
    sizes = [(64, 48), (40, 300), (500, 500), (1000, 250), (17, 9), (333, 777), (4000, 3000), (256, 256)]
    paths = [make_photo(tmp_path / f"g{i}.jpg", size=s, seed=i) for i, s in enumerate(sizes)]
    # 11 images: full chunks (8 images in 16 bits, 4 in float32), a shorter last one, and
    # padding of several sizes.
    paths += [make_photo(tmp_path / f"h{i}.png", size=(90 + 31 * i, 60), seed=20 + i) for i in range(3)]
    check_paths(embedders, prepared(paths, embedders["torch", "float32"]))


def test_every_backend_gives_torch_float32_s_vectors_on_the_corpus(embedders, corpus, manifest, capsys):
    picks = sorted(rel for rel, row in manifest.items()
                   if rel.startswith("real/") and row["format"] in ("JPEG", "PNG", "WEBP") and row["load_status"] == "ok")
    assert len(picks) >= 10, picks
    # Every third keeps the run short on two cores and still spans formats, sizes and sources.
    picks = picks[::3]
    worst = check_paths(embedders, prepared([corpus / rel for rel in picks], embedders["torch", "float32"]))
    with capsys.disabled():
        print(f"\n{len(picks)} corpus images, least cosine to torch float32: "
              + ", ".join(f"{b} {d} {c:.6f}" for (b, d), c in worst.items()))


def test_openvino_runs_8_images_a_request_in_16_bits_4_in_float32_and_embeds_them_a_request_at_a_time(
        embedders, tmp_path):
    if ("openvino", "float32") not in embedders:
        pytest.skip("openvino is not installed (the openvino extra)")
    assert embedders["openvino", "float32"]._tower.chunk == 4
    sixteen = embedders["openvino", "bfloat16"]._tower
    # OpenVINO computes a bf16 hint in f32 on a CPU without bf16 arithmetic.
    assert sixteen.chunk == (8 if sixteen.precision in ("bf16", "f16") else 4), sixteen.precision
    # The patch and position embeddings are computed one request at a time, not for the
    # whole batch at once (which would hold all its temporaries next to OpenVINO's).
    # The real embeddings' __call__ is wrapped to count the images of each call.
    emb = embedders["openvino", "float32"]
    seen = []
    cls = type(emb._model)
    call = cls.__call__
    paths = [make_photo(tmp_path / f"c{i}.jpg", size=(60 + 17 * i, 45), seed=40 + i) for i in range(11)]
    arrays = prepared(paths, emb)
    cls.__call__ = lambda self, pixels, shapes: (seen.append(len(pixels)), call(self, pixels, shapes))[1]
    try:
        got = emb.embed_resized(arrays)
    finally:
        cls.__call__ = call
    assert seen == [4, 4, 3]
    want = embedders["torch", "float32"].embed_resized(arrays)
    assert float((got.astype(np.float64) * want).sum(-1).min()) >= 0.9999


def test_processor_path_through_openvino(embedders):
    """Images not at a target size go through the model's own processor, then the same tower."""
    if ("openvino", "float32") not in embedders:
        pytest.skip("openvino is not installed (the openvino extra)")
    from PIL import Image

    rng = np.random.default_rng(3)
    # Six images: more than one request of OpenVINO's (4 in float32).
    ims = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
           for h, w in [(48, 64), (300, 40), (64, 64), (100, 30), (33, 77), (250, 250)]]
    want = embedders["torch", "float32"].embed_images(ims)
    got = embedders["openvino", "float32"].embed_images(ims)
    assert float((got * want).sum(-1).min()) >= 0.9999


@needs_openvino
def test_a_second_load_reads_the_converted_tower_from_the_cache(tiny_model, embedders, ov_cache, caplog,
                                                                monkeypatch):
    from sqlindexer.embed import Embedder

    # A CLI test earlier in the session may have set the package's logger not to propagate.
    monkeypatch.setattr(logging.getLogger("sqlindexer"), "propagate", True)

    # One conversion: float32 weights for the f32 computation, the same stored as float16
    # for the 16-bit ones.
    folders = list((ov_cache / "ir").iterdir())
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].glob("*.xml")) == ["encoder_head.xml", "encoder_head_f16.xml"]
    assert all(p.with_suffix(".bin").is_file() for p in folders[0].glob("*.xml"))
    assert any((ov_cache / "compiled").iterdir())  # OpenVINO's compiled blobs
    # (and its level: a query command sets it to WARNING).
    with caplog.at_level(logging.INFO, logger="sqlindexer"):
        emb = Embedder(str(tiny_model), device="cpu", dtype="float32", backend="openvino").load()
    assert not [r for r in caplog.records if "converting" in r.getMessage()]
    assert emb.backend == "openvino" and emb.precision == "f32"
    assert {r.getMessage() for r in caplog.records if r.name == "sqlindexer.embed"} == {
        f"loaded {tiny_model} on cpu (openvino, f32)"}


@needs_openvino
def test_mapped_pages_are_released_only_between_openvino_s_calls(tiny_model, embedders, ov_cache, monkeypatch):
    # A release while OpenVINO runs could land on a range it has just unmapped and reused
    # for its own memory (which madvise would then zero): only after each call returns.
    import threading

    from sqlindexer.embed import Embedder

    events: list[tuple[str, int]] = []
    real_core, real_warm_up = ov_vision.core(), ov_vision.Tower.warm_up

    class Core:
        def __getattr__(self, name):
            return getattr(real_core, name)

        def compile_model(self, *args, **kwargs):
            events.append(("compile", threading.get_ident()))
            try:
                return real_core.compile_model(*args, **kwargs)
            finally:
                events.append(("compiled", threading.get_ident()))

    def warm_up(tower):
        events.append(("warm-up", threading.get_ident()))
        real_warm_up(tower)
        events.append(("warmed up", threading.get_ident()))

    def release(folder):
        events.append(("release", threading.get_ident()))
        return 0

    monkeypatch.setattr(ov_vision, "core", Core)
    monkeypatch.setattr(ov_vision.Tower, "warm_up", warm_up)
    monkeypatch.setattr(process_memory, "release_mapped_files", release)
    Embedder(str(tiny_model), device="cpu", dtype="float32", backend="openvino").load()
    assert [e for e, _ in events] == ["compile", "compiled", "release", "warm-up", "warmed up", "release"]
    assert len({t for _, t in events}) == 1  # all on the loading thread


@needs_openvino
def test_openvino_with_device_auto_runs_on_the_cpu(tiny_model, ov_cache):
    from sqlindexer.embed import Embedder

    emb = Embedder(str(tiny_model), backend="openvino").prepare()
    assert (emb.device, emb.backend) == ("cpu", "openvino")


@pytest.mark.parametrize(("args", "needles"), [
    (["--backend", "openvino", "--device", "cuda"], ["--backend openvino", "cuda"]),
    (["--backend", "tensorrt"], ["--backend", "tensorrt"]),
])
def test_bad_backend_on_the_command_line_stops_before_the_scan(runner, tmp_path, tiny_model, args, needles):
    from conftest import make_photo, run_cli

    make_photo(tmp_path / "photos" / "a.jpg")
    out = tmp_path / "index.jsonl"
    result = run_cli(runner, ["-i", tmp_path / "photos", "-o", out, "--model-name", tiny_model, *args], ok=False)
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or "Usage:" in result.stderr, result.stderr
    assert all(n in result.stderr for n in needles), result.stderr
    assert not (tmp_path / "index.sqlite").exists()  # nothing scanned, no database made


# -- a warm load reads only what torch runs ------------------------------------------------
def _spoil_encoder_weights(checkpoint: Path) -> int:
    """Overwrite, in place, the bytes of every vision weight but the embeddings' with NaN
    (0xFF bytes), keeping the file's size and mtime: a load that read them would give other
    vectors. The number of tensors spoiled."""
    import json
    import struct

    path = checkpoint / "model.safetensors"
    st = path.stat()
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        spoiled = 0
        for name, info in header.items():
            if name.startswith("vision_model.") and not name.startswith("vision_model.embeddings."):
                begin, end = info["data_offsets"]
                f.seek(8 + n + begin)
                f.write(b"\xff" * (end - begin))
                spoiled += 1
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return spoiled


@needs_openvino
def test_a_warm_load_reads_no_encoder_weight_from_the_checkpoint(tiny_model, tmp_path, monkeypatch, caplog):
    import shutil

    from sqlindexer.embed import Embedder

    monkeypatch.setenv(ov_vision.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(logging.getLogger("sqlindexer"), "propagate", True)
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    paths = [make_photo(tmp_path / f"p{i}.jpg", size=(300 + 50 * i, 200), seed=i) for i in range(3)]
    first = Embedder(str(model), device="cpu", dtype="float32", backend="openvino").load()
    arrays = prepared(paths, first)
    want = first.embed_resized(arrays)
    assert _spoil_encoder_weights(model) > 10
    # The spoiled weights are what a full load reads: torch's vectors are no longer numbers.
    assert np.isnan(Embedder(str(model), device="cpu", dtype="float32", backend="torch").embed_resized(arrays)).all()
    caplog.clear()  # the first load's conversion
    with caplog.at_level(logging.INFO, logger="sqlindexer"):
        got = Embedder(str(model), device="cpu", dtype="float32", backend="openvino").embed_resized(arrays)
    assert not [r for r in caplog.records if "converting" in r.getMessage()]
    np.testing.assert_allclose(got, want, atol=1e-6)


def _resident_kb(path: Path) -> int:
    total, name = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                name = parts[5] if len(parts) > 5 else ""
            elif parts[0] == "Rss:" and name == str(path):
                total += int(parts[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_released_pages_of_a_read_only_mapping_leave_memory_and_read_back(tmp_path):
    import mmap

    path = tmp_path / "cache" / "weights.bin"
    path.parent.mkdir()
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    outside = tmp_path / "other.bin"
    outside.write_bytes(data)
    with open(path, "rb") as f, open(outside, "rb") as g:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        other = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ)
        assert mapped[:] == data and other[:] == data  # every page read in
        assert _resident_kb(path) >= 8 << 10 and _resident_kb(outside) >= 8 << 10
        assert process_memory.release_mapped_files(tmp_path / "cache") >= len(data)
        assert _resident_kb(path) == 0
        assert _resident_kb(outside) >= 8 << 10  # a file outside the folder is left alone
        assert mapped[:] == data  # read back from the file
        mapped.close()
        other.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_private_mapping_is_never_released(tmp_path):
    # A private mapping may hold pages written before it was made read-only, in no file:
    # only read-only shared mappings (as OpenVINO makes) are released.
    import mmap

    path = tmp_path / "cache" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * (4 << 12))
    with open(path, "rb") as f:
        private = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        assert private[:]  # every page read in
        assert process_memory.release_mapped_files(tmp_path / "cache") == 0
        assert _resident_kb(path) >= 1 << 10
        private.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_library_or_a_sibling_folder_is_never_released(tmp_path):
    # A shared library's read-only pages may hold the loader's relocations: dropping them
    # would read back unrelocated bytes (a crash). A folder whose name only starts like the
    # cache's is not the cache.
    import mmap

    data = b"\x7fELF" + bytes(4 << 20)
    library = tmp_path / "cache" / "lib.so"
    sibling = tmp_path / "cache2" / "weights.bin"
    for path in (library, sibling):
        path.parent.mkdir()
        path.write_bytes(data)
    sibling.write_bytes(b"weights!" + data[8:])
    with open(library, "rb") as f, open(sibling, "rb") as g:
        maps = [mmap.mmap(h.fileno(), 0, access=mmap.ACCESS_READ) for h in (f, g)]
        assert all(m[:] for m in maps)  # every page read in
        assert process_memory.release_mapped_files(tmp_path / "cache") == 0
        assert _resident_kb(library) >= 4 << 10 and _resident_kb(sibling) >= 4 << 10
        for m in maps:
            m.close()


def test_a_sharded_checkpoint_is_known_by_its_shards(tmp_path):
    # The IR found for a checkpoint by its files' identity must not survive new weights in
    # a shard when the shard index is left as it was.
    import json

    from sqlindexer.model_load import weights_identity

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}))
    for shard in shards:
        (tmp_path / shard).write_bytes(b"old weights")
    before = weights_identity(str(tmp_path))
    (tmp_path / shards[1]).write_bytes(b"new weights, longer")
    after = weights_identity(str(tmp_path))
    assert shards[1] in after and before != after


def test_a_damaged_safetensors_file_loads_the_whole_tower_instead(tmp_path, tiny_model):
    # On a warm cache only the embeddings are read from the checkpoint; a file that is not
    # safetensors must fall back to the full load (which then says what is wrong), not
    # raise a parse error out of the CLI.
    import shutil

    from sqlindexer.embed import Embedder
    from sqlindexer.vision_embeddings import VisionEmbeddings, embedding_width

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        VisionEmbeddings.from_checkpoint(str(folder))
    assert embedding_width(str(folder)) is None
    assert Embedder(str(folder), backend="openvino")._read_embeddings() is None
