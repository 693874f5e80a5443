"""The stored vectors are what transformers' own SigLIP 2 code gives on the upright image;
EXIF orientation, draft decoding and model/device errors. The model is always the real
transformers model (a tiny random SigLIP 2 saved with save_pretrained)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import make_photo, read_jsonl, run_cli
from sqlindexer import images


# -- helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_model):
    """image -> L2-normalised vector, by transformers' own processor and full Siglip2Model."""
    import torch
    from transformers import AutoImageProcessor, Siglip2Model

    processor = AutoImageProcessor.from_pretrained(str(tiny_model))
    model = Siglip2Model.from_pretrained(str(tiny_model)).eval()

    def embed(image: Image.Image) -> np.ndarray:
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.get_image_features(**inputs)
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        vec = features[0].float().numpy()
        return vec / np.linalg.norm(vec)

    return embed


@pytest.fixture(scope="module")
def embedder(tiny_model):
    """torch float32: these tests compare paths to 1e-5, below bfloat16's rounding (the
    other backends and precisions are held to torch float32 in test_backends.py)."""
    from sqlindexer.embed import Embedder

    return Embedder(str(tiny_model), device="cpu", dtype="float32", backend="torch").load()


def index(runner, folder: Path, out: Path, model: Path, *extra) -> dict[str, dict]:
    """Run the CLI on folder; records by file name."""
    run_cli(runner, ["-i", folder, "-o", out, "--model-name", model, *extra])
    return {Path(r["metadata"]["path"]).name: r for r in read_jsonl(out)}


def vec(record: dict) -> np.ndarray:
    return np.asarray(record["vector"], dtype=np.float64)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def asymmetric(size: tuple[int, int]) -> Image.Image:
    """No rotation or flip of this maps it onto itself: distinct shapes in distinct corners."""
    w, h = size
    im = Image.new("RGB", size, (30, 30, 30))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, w // 3, h // 4], fill=(250, 20, 20))
    d.ellipse([w // 2, h // 2, w - 5, h - 5], fill=(20, 220, 40))
    d.polygon([(w - 1, 0), (w - 1, h // 3), (w * 2 // 3, 0)], fill=(20, 40, 250))
    for x in range(0, w, 7):
        d.line([(x, h // 3), (x, h // 2)], fill=(x % 256, 255 - x % 256, 128))
    return im


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)).mean())


# What is stored in the file so that ImageOps.exif_transpose gives the original back.
STORED_AS = {
    6: Image.Transpose.ROTATE_90,  # exif_transpose rotates by 270
    8: Image.Transpose.ROTATE_270,
    3: Image.Transpose.ROTATE_180,
}


def save_oriented(original: Image.Image, path: Path, orientation: int) -> Path:
    e = Image.Exif()
    e[0x0112] = orientation
    original.transpose(STORED_AS[orientation]).save(path, quality=95, exif=e.tobytes())
    return path


# -- (a) stored vectors equal transformers' own pipeline ---------------------------------
def test_vectors_match_transformers_on_generated_images(runner, tiny_model, reference, tmp_path):
    photos = tmp_path / "photos"
    sizes = [(64, 48), (40, 300), (500, 500), (1000, 250), (17, 9), (333, 777)]
    for i, size in enumerate(sizes):
        make_photo(photos / f"g{i}.jpg", size=size, seed=i)
    # Other modes the decoder converts: RGBA PNG, greyscale, 16-bit greyscale.
    make_photo(photos / "rgba.png", size=(90, 60), seed=7)
    Image.open(photos / "rgba.png").convert("RGBA").save(photos / "rgba.png")
    asymmetric((120, 70)).convert("L").save(photos / "grey.png")
    Image.fromarray((np.arange(80 * 50, dtype=np.uint16).reshape(50, 80) * 13)).save(photos / "grey16.png")
    # Batches of 3 mix sizes, so the padded naflex batches must not change any vector.
    records = index(runner, photos, tmp_path / "index.jsonl", tiny_model, "--batch-size", "3")
    assert len(records) == len(sizes) + 3
    for name, record in records.items():
        d = images.decode(record["metadata"]["path"])
        assert d.error is None
        assert (record["metadata"]["width"], record["metadata"]["height"]) == (d.width, d.height)
        c = cos(vec(record), reference(d.image))
        assert c >= 0.9999, (name, c)


def test_vectors_match_transformers_on_corpus_jpegs(runner, tiny_model, reference, corpus, manifest, tmp_path):
    picks = [
        "real/photos/camera_exif/exiv2/exiv2-nikon-d70.jpg",  # orientation 6, 150x91
        "real/photos/orientation/pillow_hopper/hopper_orientation_8.jpg",
        "real/sample_datasets/sklearn/china.jpg",
        "real/photos/wallpapers/plasma/Path/contents/images/2560x1600.jpg",  # draft-decoded
    ]
    assert manifest[picks[0]]["orientation"] == "6"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, rel in enumerate(picks):
        shutil.copy(corpus / rel, photos / f"{i}_{Path(rel).name}")
    records = index(runner, photos, tmp_path / "index.jsonl", tiny_model)
    assert len(records) == len(picks)
    for i, rel in enumerate(picks):
        record = records[f"{i}_{Path(rel).name}"]
        d = images.decode(record["metadata"]["path"])
        c = cos(vec(record), reference(d.image))
        assert c >= 0.9999, (rel, c)
    # The rotated photo is stored sideways (150x91) and indexed upright.
    rotated = records["0_exiv2-nikon-d70.jpg"]["metadata"]
    assert (rotated["width"], rotated["height"]) == (91, 150)


# -- (b) EXIF orientation --------------------------------------------------------------
@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_orientation_gives_upright_image_and_vector(runner, tiny_model, embedder, tmp_path, orientation):
    original = asymmetric((128, 80))  # multiples of 16: JPEG blocks line up after rotation
    photos = tmp_path / "photos"
    photos.mkdir()
    original.save(photos / "upright.jpg", quality=95)
    save_oriented(original, photos / "oriented.jpg", orientation)
    with Image.open(photos / "oriented.jpg") as raw:
        stored_size = raw.size
        sideways = raw.convert("RGB")
    assert stored_size == ((80, 128) if orientation in (6, 8) else (128, 80))

    d = images.decode(str(photos / "oriented.jpg"))
    assert d.error is None
    assert d.image.size == (d.width, d.height) == (128, 80)
    assert mean_abs_diff(d.image, original) < 8  # JPEG noise only
    # ...and not merely the right size: any other transpose is far off.
    assert mean_abs_diff(d.image, original.transpose(Image.Transpose.ROTATE_180)) > 30

    records = index(runner, photos, tmp_path / "index.jsonl", tiny_model)
    meta = records["oriented.jpg"]["metadata"]
    assert (meta["width"], meta["height"]) == (128, 80)
    assert "Orientation" not in records["upright.jpg"]["metadata"]["exif"]
    assert records["oriented.jpg"]["metadata"]["exif"].get("Orientation") == orientation
    c = cos(vec(records["oriented.jpg"]), vec(records["upright.jpg"]))
    assert c > 0.999, c
    # The test image is one the model tells apart from its unrotated pixels.
    c_sideways = cos(vec(records["oriented.jpg"]), embedder.embed_images([sideways])[0])
    assert c_sideways < 0.999 and c - c_sideways > 0.001, (c, c_sideways)


@pytest.mark.parametrize("orientation", [6, 8])
def test_draft_decode_reports_full_upright_size(tmp_path, orientation):
    """A large JPEG is decoded at a reduced scale, but its size is that of the file, upright."""
    original = asymmetric((2400, 1600))
    p = save_oriented(original, tmp_path / "big.jpg", orientation)
    d = images.decode(str(p))
    assert d.error is None
    assert (d.width, d.height) == (2400, 1600)
    assert d.image.width < 2400 and d.image.width / d.image.height == pytest.approx(1.5, rel=0.01)
    assert mean_abs_diff(d.image, original.resize(d.image.size, Image.Resampling.BOX)) < 8
    full = images.decode(str(p), draft=False)
    assert full.image.size == (full.width, full.height) == (2400, 1600)


# -- (c) draft vs full decode ----------------------------------------------------------
def test_draft_decode_embeds_like_full_decode(embedder, corpus, manifest, capsys):
    large = sorted(
        rel for rel, row in manifest.items()
        if rel.startswith("real/") and row["format"] in ("JPEG", "MPO")
        and max(int(row["width"] or 0), int(row["height"] or 0)) >= 2000
    )
    assert len(large) >= 5, large
    results = []
    for rel in large:
        path = str(corpus / rel)
        drafted = images.decode(path, patch_size=embedder.patch_size, max_num_patches=embedder.max_num_patches)
        full = images.decode(path, draft=False)
        assert drafted.error is None and full.error is None
        assert (drafted.width, drafted.height) == (full.width, full.height) == full.image.size
        assert drafted.image.width < full.image.width  # the draft path really ran
        v = embedder.embed_images([drafted.image, full.image])
        results.append((cos(v[0], v[1]), rel, full.image.size, drafted.image.size))
    worst = min(results)
    with capsys.disabled():
        print(f"\ndraft vs full decode, {len(results)} corpus JPEGs >= 2000 px: "
              f"min cosine {worst[0]:.6f} ({worst[1]} {worst[2]} drafted to {worst[3]})")
    assert worst[0] >= 0.999, results


# -- (d) model that cannot be loaded, (e) missing device -------------------------------
def one_photo(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    make_photo(photos / "a.jpg")
    return photos


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ["no-such-model-folder", "./models/missing", "/nonexistent/siglip2"])
def test_missing_model_folder_is_one_line_error(runner, tmp_path, name):
    result = run_cli(runner, ["-i", one_photo(tmp_path), "-o", tmp_path / "i.jsonl", "--model-name", name], ok=False)
    assert_one_line_error(result, name)
    assert not (tmp_path / "i.jsonl").exists()


def test_bogus_hub_id_offline_is_one_line_error(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "nobody-here/siglip2-does-not-exist"
    result = run_cli(runner, ["-i", one_photo(tmp_path), "-o", tmp_path / "i.jsonl", "--model-name", name], ok=False)
    assert_one_line_error(result, name)


def test_the_hub_client_s_warnings_stay_quiet_while_a_model_loads(tmp_path):
    # Offline, the hub client logs each of its five retries (23 s) before the load fails,
    # through a handler of its own that it sets up, with its level, when it is imported:
    # after the CLI set its levels, since torch and transformers are imported only when a
    # model is needed. Here, in a fresh process as in a run: the CLI's logging, then the
    # import, then a retry warning of the hub client inside the load's quiet block (where
    # every model load and download happens) and one after it.
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import logging\n"
        "from sqlindexer.cli_common import setup_logging as _setup_logging\n"
        "from sqlindexer.embed import quiet_transformers\n"
        "_setup_logging('INFO')\n"
        "import huggingface_hub, transformers\n"
        "http = logging.getLogger('huggingface_hub.utils._http')\n"
        "with quiet_transformers():\n"
        "    http.warning('Retrying in 1s [Retry 1/5].')\n"
        "http.warning('after the load')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "Retrying" not in done.stderr
    assert "after the load" in done.stderr  # the client's own level is given back


def test_folder_without_a_model_is_one_line_error(runner, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = run_cli(runner, ["-i", one_photo(tmp_path), "-o", tmp_path / "i.jsonl", "--model-name", empty], ok=False)
    assert_one_line_error(result, str(empty))


def test_cuda_on_cpu_only_machine_is_one_line_error(runner, tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = run_cli(runner, ["-i", one_photo(tmp_path), "-o", tmp_path / "i.jsonl", "--model-name", tiny_model,
                              "--device", "cuda"], ok=False)
    assert_one_line_error(result, "cuda")


# -- the processor's last steps, done on the batch (PatchSpec) ---------------------------
@pytest.mark.parametrize("size", [(64, 48), (48, 64), (640, 480), (17, 500), (4000, 3000), (16, 16)])
def test_packed_patches_equal_processor_output(embedder, size):
    """The worker-resized image, patched and normalised by PatchSpec, is the processor's own
    output: same mask and shapes exactly, pixel values to float32 rounding (1e-6: the
    processor and we may round x/255 and (x-0.5)/0.5 in another order; one uint8 step is
    0.0078, so 1e-6 cannot hide a wrong pixel, channel or patch)."""
    from sqlindexer.embed import PatchSpec
    from sqlindexer.decode import DecodeOptions, prepare

    rng = np.random.default_rng(sum(size))
    src = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    path = Path(f"img_{size[0]}x{size[1]}.png")
    src.save(path)
    spec = PatchSpec.of(embedder._processor)
    assert spec is not None
    p = prepare(str(path), DecodeOptions(patch_size=spec.patch, max_num_patches=spec.max_patches))
    assert spec.fits(p.pixels)
    want = embedder.preprocess([Image.fromarray(p.pixels, "RGB")])
    packed = spec.pack([p.pixels])
    assert packed["pixel_attention_mask"].tolist() == want["pixel_attention_mask"].tolist()
    assert packed["spatial_shapes"].tolist() == want["spatial_shapes"].tolist()
    # In numpy (the OpenVINO backend) and in torch (the torch backend, on its device).
    got = spec.normalize(packed["pixel_values"], packed["pixel_attention_mask"])
    assert isinstance(got, np.ndarray) and got.shape == want["pixel_values"].shape
    assert float(np.abs(got - want["pixel_values"].numpy()).max()) <= 1e-6
    on_torch = spec.normalize(*(torch.from_numpy(packed[k]) for k in ("pixel_values", "pixel_attention_mask")))
    assert float((on_torch - want["pixel_values"]).abs().max()) <= 1e-6


def test_embed_resized_equals_embed_images_and_falls_back(embedder):
    """Vectors through PatchSpec, for a batch of target-size images of three shapes (so the
    padding differs), equal the processor path's; an array that is not at a target size
    (here 64x48, which the processor would enlarge) goes through the processor itself."""
    from sqlindexer.embed import PatchSpec

    rng = np.random.default_rng(7)
    spec = PatchSpec.of(embedder._processor)
    sizes = [images.naflex_size(h, w, patch_size=spec.patch, max_num_patches=spec.max_patches)
             for h, w in [(3000, 4000), (16, 900), (500, 500)]]
    assert len(set(sizes)) == 3
    arrays = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]
    assert all(spec.fits(a) for a in arrays)
    got = embedder.embed_resized(arrays)
    want = embedder.embed_images([Image.fromarray(a, "RGB") for a in arrays])
    assert np.abs(got - want).max() < 1e-5
    odd = (rng.random((64, 48, 3)) * 255).astype(np.uint8)
    assert not spec.fits(odd)
    assert np.abs(embedder.embed_resized([odd]) - embedder.embed_images([Image.fromarray(odd, "RGB")])).max() < 1e-6


def test_patch_spec_refuses_other_processors(embedder):
    """Only the standard SigLIP 2 naflex steps are taken over; a processor configured
    otherwise (or another kind) goes through its own code."""
    import copy

    from sqlindexer.embed import PatchSpec

    for attr, value in [("do_normalize", False), ("do_rescale", False), ("resample", 3), ("image_mean", [0.5])]:
        proc = copy.deepcopy(embedder._processor)
        setattr(proc, attr, value)
        assert PatchSpec.of(proc) is None, attr
    assert PatchSpec.of(object()) is None


def test_the_geometry_read_from_the_files_is_what_transformers_reads(tmp_path):
    """The Ray driver's prepare_geometry(): the checkpoint's JSON and safetensors headers,
    else (a processor config that leaves a step to its defaults) transformers' reading."""
    import json

    from sqlindexer.embed import Embedder

    def geometry(model, how):
        e = getattr(Embedder(str(model), device="cpu", backend="torch"), how)()
        return e.dim, e.patch_size, e.max_num_patches, e._config is None

    from sqlindexer.testing import build_random_siglip2

    # Not the defaults the properties fall back to (16-pixel patches, 256 of them).
    model = build_random_siglip2(tmp_path / "model", max_num_patches=64, patch_size=8, with_tokenizer=False)
    want = geometry(model, "prepare")[:3]
    assert want[1:] == (8, 64)
    assert geometry(model, "prepare_geometry") == (*want, True)
    vague = Path(shutil.copytree(model, tmp_path / "vague"))
    config = vague / "preprocessor_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "do_normalize"}))
    assert geometry(vague, "prepare_geometry") == (*want, False)
