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
(b) is given twice: wall clock of the whole command (Python start-up and model load
included) and the embedding phase alone, as the indexer logs it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, cli, machine, save, table  # noqa: E402


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """Photo-like JPEGs: smooth shapes plus sensor-like noise, so they compress like photos."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(40):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(w // 20, w // 2)), y0 + int(rng.integers(h // 20, h // 2))
            draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im = im.filter(ImageFilter.GaussianBlur(w / 400))
        noise = rng.normal(0, 6, (h, w, 3))
        arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        p = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(arr).save(p, "JPEG", quality=92)
        paths.append(p)
    return paths


MODEL_ONLY = r"""
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from PIL import Image
from transformers import AutoImageProcessor, Siglip2VisionModel
from transformers.utils import logging; logging.set_verbosity_error()
model_dir, folder, n, bs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
proc = AutoImageProcessor.from_pretrained(model_dir)
model = Siglip2VisionModel.from_pretrained(model_dir).eval()
ims = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())[:bs]]
best = {}
for size in sorted({bs, 8}):  # the model alone at its best batch size
    inputs = proc(images=ims[:size], return_tensors="pt")
    with torch.inference_mode():
        model(**inputs)  # warm-up
        done, t0 = 0, time.perf_counter()
        while done < n:
            model(**inputs); done += size
    best[size] = done / (time.perf_counter() - t0)
size = max(best, key=best.get)
print(json.dumps({"images_per_s": best[size], "batch": size, "all": best}), file=sys.stderr)
"""

REFERENCE = r"""
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import logging; logging.set_verbosity_error()
model_dir, folder, bs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
t_start = time.perf_counter()
proc = AutoImageProcessor.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
paths = sorted(folder.iterdir())
t0 = time.perf_counter()
out = []
for i in range(0, len(paths), bs):
    ims = [Image.open(p).convert("RGB") for p in paths[i:i + bs]]
    inputs = proc(images=ims, return_tensors="pt")
    with torch.no_grad():
        f = model.get_image_features(**inputs)
    f = getattr(f, "pooler_output", f)
    out.extend((f / f.norm(dim=-1, keepdim=True)).tolist())
t1 = time.perf_counter()
print(json.dumps({"images_per_s": len(paths) / (t1 - t0), "wall_images_per_s": len(paths) / (t1 - t_start)}),
      file=sys.stderr)
"""

EMBED_LINE = re.compile(r"embedded (\d+) images in ([\d.]+) s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=96, help="4000x3000 JPEGs (default 96)")
    ap.add_argument("--small", type=int, default=96, help="640x480 JPEGs (default 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size for a, b and c (default 32)")
    ap.add_argument("--workers", type=int, default=None, help="image-indexer --workers (default: its own default)")
    ap.add_argument("--device", default="auto", help="image-indexer --device (default auto)")
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
                make_photos(folder, n, size, seed=len(label))
            mb = sum(p.stat().st_size for p in folder.iterdir()) / n / 2**20
            _, _, err = child([sys.executable, "-c", MODEL_ONLY, str(model), str(folder), str(max(n, args.batch_size)),
                               str(args.batch_size)])
            model_only = json.loads(err.strip().splitlines()[-1])
            a = model_only["images_per_s"]
            out = work / "index.jsonl"
            for f in (out, out.with_suffix(".sqlite")):
                f.unlink(missing_ok=True)
            extra = ["--workers", args.workers] if args.workers is not None else []
            t_b, rss_b, err = cli("-i", folder, "-o", out, "--model-name", model, "--batch-size", args.batch_size,
                                  "--device", args.device, "--engine", args.engine, *extra)
            m = EMBED_LINE.search(err)
            b_embed = int(m.group(1)) / float(m.group(2)) if m else None
            b = n / t_b
            t_c, rss_c, err = child([sys.executable, "-c", REFERENCE, str(model), str(folder), str(args.batch_size)])
            c = json.loads(err.strip().splitlines()[-1])
            rows.append({
                "images": f"{n} {label} ({mb:.1f} MB)",
                "a model img/s": a, "a batch": model_only["batch"],
                "b e2e img/s": b, "b embed img/s": b_embed,
                "c ref img/s": c["images_per_s"],
                "b/a": (b_embed or b) / a, "b/c": (b_embed or b) / c["images_per_s"],
                "b/c wall": b / c["wall_images_per_s"],
                "RSS b MB": rss_b / 2**20, "RSS c MB": rss_c / 2**20,
            })
        cols = ["images", "a model img/s", "a batch", "b e2e img/s", "b embed img/s", "c ref img/s", "b/a", "b/c", "b/c wall",
                "RSS b MB", "RSS c MB"]
        print(f"\nbatch size {args.batch_size}, {'tiny' if args.tiny else 'base-shape'} model; "
              "b/a and b/c use b's embedding phase, 'b/c wall' whole commands (start-up and model load included)\n")
        print(table(rows, cols))
        save(args.json, {"batch_size": args.batch_size, "tiny": args.tiny, "machine": machine(), "rows": rows})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
