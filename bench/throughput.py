#!/usr/bin/env python3
"""Indexing throughput, side by side: the model alone, our indexer, the original tool's loop.

Generates --photos photo-like JPEGs (4000x3000, 2-4 MB) and --small small ones (640x480),
builds a random SigLIP 2 of the exact base shape (hidden 768, 12 layers, 12 heads, patch 16,
256 patches: it times like google/siglip2-base-patch16-naflex), then times, each in a fresh
process:

  (a) model only     the vision tower's forward pass on ready processor tensors, at the
                     faster of --batch-size and 8 images per forward
  (b) image-indexer  the CLI end to end: fresh database, decode, embed, export
  (c) reference      the original tool's sequential loop: open -> convert("RGB") ->
                     processor on --batch-size full-size images -> full model's
                     get_image_features

and prints images/s, the ratios b/a and b/c, and the peak RSS (process tree) of b and c.
It also times what feeds the model in (b), without a model: one process decoding and
resizing ('decode img/s/core'), the decode workers together ('feed', --workers or all usable
cores, nothing else running), the packing of patches that the main
process does on their output ('pack', embed.PatchSpec) and, for comparison, the model's
own image processor on the same small images ('processor', what the main process ran
before PatchSpec), so that on a GPU, where the model is fast, the table shows the bound.
On CUDA, (a) runs in the dtype the indexer picks (bf16/fp16) and (c) in float32, as the
original tool does.
(b) is given twice: wall clock of the whole command (Python start-up and model load
included) and the embedding phase alone, as the indexer logs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, cli, machine, save, table  # noqa: E402


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int, unique: int | None = None) -> None:
    """n photo-like JPEGs; with `unique`, only that many are generated and the rest are copies.

    Generation is the slow part (about 0.5 s per 12-megapixel image); copies decode exactly
    as slowly as the originals, which is all a throughput benchmark needs of them."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    k = min(n, unique or n)
    with ProcessPoolExecutor(max(1, min(k, os.cpu_count() or 1))) as pool:
        list(pool.map(_make_photo, [(folder / f"photo_{i:05d}.jpg", size, seed * 100003 + i) for i in range(k)]))
    for i in range(k, n):
        shutil.copyfile(folder / f"photo_{i % k:05d}.jpg", folder / f"photo_{i:05d}.jpg")


def _make_photo(job: tuple[Path, tuple[int, int], int]) -> None:
    """One photo-like JPEG: smooth shapes plus sensor-like noise, so it compresses like a photo."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    p, (w, h), seed = job
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 20, w // 2)), y0 + int(rng.integers(h // 20, h // 2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    im = im.filter(ImageFilter.GaussianBlur(w / 400))
    noise = rng.normal(0, 6, (h, w, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(p, "JPEG", quality=92)


# (a) runs in the dtype the indexer picks for the device (its --dtype auto), inputs already
# on the device: the ceiling that (b) is measured against.
MODEL_ONLY = r"""
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from PIL import Image
from transformers import AutoImageProcessor, Siglip2VisionModel
from transformers.utils import logging; logging.set_verbosity_error()
from sqlindexer.embed import resolve_device, _resolve_dtype
model_dir, folder, n, bs, device = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device = resolve_device(device)
dtype = _resolve_dtype("auto", device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
proc = AutoImageProcessor.from_pretrained(model_dir)
model = Siglip2VisionModel.from_pretrained(model_dir).eval().to(device=device, dtype=dtype)
ims = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())[:bs]]
best = {}
for size in sorted({bs, 8}):  # the model alone at its best batch size
    inputs = {k: v.to(device) for k, v in proc(images=ims[:size], return_tensors="pt").items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)  # warm-up
        sync()
        done, t0 = 0, time.perf_counter()
        while done < n or time.perf_counter() - t0 < 2:  # at least 2 s: a GPU is fast
            model(**inputs); done += size
        sync()
    best[size] = done / (time.perf_counter() - t0)
size = max(best, key=best.get)
print(json.dumps({"images_per_s": best[size], "batch": size, "all": best, "dtype": str(dtype)}), file=sys.stderr)
"""

REFERENCE = r"""
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import logging; logging.set_verbosity_error()
model_dir, folder, bs, device = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
t_start = time.perf_counter()
proc = AutoImageProcessor.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval().to(device)  # the original tool: float32
paths = sorted(folder.iterdir())
t0 = time.perf_counter()
out = []
for i in range(0, len(paths), bs):
    ims = [Image.open(p).convert("RGB") for p in paths[i:i + bs]]
    inputs = proc(images=ims, return_tensors="pt").to(device)
    with torch.no_grad():
        f = model.get_image_features(**inputs)
    f = getattr(f, "pooler_output", f)
    out.extend((f / f.norm(dim=-1, keepdim=True)).tolist())
t1 = time.perf_counter()
print(json.dumps({"images_per_s": len(paths) / (t1 - t0), "wall_images_per_s": len(paths) / (t1 - t_start)}),
      file=sys.stderr)
"""

def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    return f"CPU only, {os.cpu_count()} CPUs"


# Where (b)'s bound is when the model is fast (a GPU): the decode workers alone, and the
# processor step that the main process runs on their output.
FEED_ONLY = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from PIL import Image
from sqlindexer.embed import Embedder
from sqlindexer.decode import DecodeOptions, Decoder, prepare, usable_cpus
model_dir, folder, bs, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
emb = Embedder(model_dir, device="cpu").prepare()
paths = [str(p) for p in sorted(folder.iterdir())]
workers = int(workers) if workers else usable_cpus()
options = DecodeOptions(patch_size=emb.patch_size, max_num_patches=emb.max_num_patches)
kept = []
with Decoder(options, workers=workers, ahead=2 * bs + workers) as dec:
    first = None
    for _, p in dec.map(paths, lambda x: x):
        first = first or time.perf_counter()
        if len(kept) < 4 * bs:
            kept.append(p.pixels)
    t1 = time.perf_counter()
t = time.perf_counter()
for _ in range(4):
    emb._patch_spec.pack(kept)
pack = 4 * len(kept) / (time.perf_counter() - t)
t = time.perf_counter()
emb.preprocess([Image.fromarray(a, "RGB") for a in kept])
processor = len(kept) / (time.perf_counter() - t)
one = paths[: 2 * bs]
t = time.perf_counter()
for path in one:
    prepare(path, options)
per_core = len(one) / (time.perf_counter() - t)
print(json.dumps({"feed_per_s": (len(paths) - 1) / (t1 - first), "pack_per_s": pack, "preprocess_per_s": processor,
                  "decode_per_core": per_core, "workers": workers}), file=sys.stderr)
"""

EMBED_LINE = re.compile(r"embedded (\d+) images in ([\d.]+) s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=96, help="4000x3000 JPEGs (default 96)")
    ap.add_argument("--small", type=int, default=96, help="640x480 JPEGs (default 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size for a, b and c (default 32)")
    ap.add_argument("--workers", type=int, default=None, help="image-indexer --workers (default: its own default)")
    ap.add_argument("--device", default="auto", help="image-indexer --device (default auto)")
    ap.add_argument("--unique", type=int, default=None,
                    help="generate only this many distinct images per set and copy them up to the count "
                         "(default: all distinct; large GPU runs need thousands of photos)")
    ap.add_argument("--skip-reference", action="store_true", help="do not run (c) (slow on big sets)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="image-indexer --engine for b (default local; ray starts or joins a local Ray instance)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny model instead of the base shape (smoke test)")
    ap.add_argument("--workdir", help="keep images and model here (default: a temporary folder, removed after)")
    ap.add_argument("--json", default="bench/results/throughput.json", help="where to write the results")
    args = ap.parse_args()

    from sqlindexer.testing import BASE, TINY, build_random_siglip2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sqlindexer-throughput-"))
    try:
        model = work / ("model-tiny" if args.tiny else "model-base")
        if not (model / "config.json").exists():
            print(f"building random SigLIP 2 ({'tiny' if args.tiny else 'base shape'}) in {model} ...", flush=True)
            build_random_siglip2(model, shape=TINY if args.tiny else BASE, with_tokenizer=False)
        sets = {"photo 4000x3000": (work / "photos", args.photos, (4000, 3000)),
                "small 640x480": (work / "small", args.small, (640, 480))}
        rows = []
        for label, (folder, n, size) in sets.items():
            if n <= 0:
                continue
            if not folder.exists() or len(list(folder.iterdir())) != n:
                shutil.rmtree(folder, ignore_errors=True)
                print(f"generating {n} {label} JPEGs ...", flush=True)
                make_photos(folder, n, size, seed=len(label), unique=args.unique)
            mb = sum(p.stat().st_size for p in folder.iterdir()) / n / 2**20
            _, _, err = child([sys.executable, "-c", MODEL_ONLY, str(model), str(folder), str(max(n, args.batch_size)),
                               str(args.batch_size), args.device])
            model_only = json.loads(err.strip().splitlines()[-1])
            a = model_only["images_per_s"]
            _, _, err = child([sys.executable, "-c", FEED_ONLY, str(model), str(folder), str(args.batch_size),
                               str(args.workers or "")])
            feed = json.loads(err.strip().splitlines()[-1])
            out = work / "index.jsonl"
            for f in (out, out.with_suffix(".sqlite")):
                f.unlink(missing_ok=True)
            extra = ["--workers", args.workers] if args.workers is not None else []
            t_b, rss_b, err = cli("-i", folder, "-o", out, "--model-name", model, "--batch-size", args.batch_size,
                                  "--device", args.device, "--engine", args.engine, *extra)
            m = EMBED_LINE.search(err)
            b_embed = int(m.group(1)) / float(m.group(2)) if m else None
            b = n / t_b
            if args.skip_reference:
                t_c, rss_c, c = None, None, {"images_per_s": None, "wall_images_per_s": None}
            else:
                t_c, rss_c, err = child([sys.executable, "-c", REFERENCE, str(model), str(folder),
                                         str(args.batch_size), args.device])
                c = json.loads(err.strip().splitlines()[-1])
            rows.append({
                "images": f"{n} {label} ({mb:.1f} MB)",
                "a model img/s": a, "a batch": model_only["batch"],
                "b e2e img/s": b, "b embed img/s": b_embed,
                "c ref img/s": c["images_per_s"],
                "decode img/s/core": feed["decode_per_core"], "feed img/s": feed["feed_per_s"],
                "pack img/s": feed["pack_per_s"],
                "processor img/s": feed["preprocess_per_s"],
                "b/a": (b_embed or b) / a,
                "b/c": (b_embed or b) / c["images_per_s"] if c["images_per_s"] else None,
                "b/c wall": b / c["wall_images_per_s"] if c["wall_images_per_s"] else None,
                "RSS b MB": rss_b / 2**20, "RSS c MB": rss_c / 2**20 if rss_c else None,
                "a dtype": model_only["dtype"].replace("torch.", ""),
            })
        cols = ["images", "a model img/s", "a batch", "a dtype", "b e2e img/s", "b embed img/s", "c ref img/s", "decode img/s/core", "feed img/s", "pack img/s", "processor img/s", "b/a", "b/c", "b/c wall",
                "RSS b MB", "RSS c MB"]
        print(f"\n{device_name()}, batch size {args.batch_size}, {'tiny' if args.tiny else 'base-shape'} model; "
              "b/a and b/c use b's embedding phase, 'b/c wall' whole commands (start-up and model load included)\n")
        print(table(rows, cols))
        save(args.json, {"batch_size": args.batch_size, "tiny": args.tiny, "device": device_name(),
                         "machine": machine(), "rows": rows})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
