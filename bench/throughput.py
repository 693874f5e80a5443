#!/usr/bin/env python3
"""Indexing throughput, side by side: the vision tower alone, our indexer, the original tool's loop.

Generates --photos photo-like JPEGs (4000x3000, 2-4 MB) and --small small ones (640x480),
builds a random SigLIP 2 of the exact base shape (hidden 768, 12 layers, 12 heads, patch 16,
256 patches: it times like google/siglip2-base-patch16-naflex), then times:

  (a) tower alone    every backend and precision (--paths; on a CPU torch float32, torch
                     bfloat16, OpenVINO f32, OpenVINO with its own precision), in one
                     process, in interleaved rounds, on the same ready batches of
                     --batch-size images (PatchSpec-packed, as the indexer feeds them):
                     images/s, the ratio to torch float32 and the least cosine of its
                     vectors to torch float32's; load time cold and, for OpenVINO, warm
                     (from its cache)
  (b) image-indexer  end to end, each in a fresh process: the CLI with default settings,
                     the same on an empty OpenVINO cache (a first run: it converts the
                     tower), then sqlindexer.run.run_index with each forced choice of
                     --paths (fresh database, decode, embed, export), peak RSS of each
  (c) reference      the original tool's sequential loop: open -> convert("RGB") ->
                     processor on --batch-size full-size images -> full model's
                     get_image_features (float32)

and prints images/s, b against torch float32's tower alone (b/a32) and against the
original loop (b/c). --workers-sweep repeats (b) with default settings for each listed
--workers. The CPU's model name and its bf16-relevant flags are printed and saved with the
figures.
It also times what feeds the model in (b), without a model: one process decoding and
resizing ('decode img/s/core'), the decode workers together ('feed', --workers or all usable
cores, nothing else running) and the packing of patches that the main process does on
their output ('pack', embed.PatchSpec) and, for comparison, the model's own image processor
on the same small images ('processor', what the main process ran before PatchSpec).
On CUDA, (a) runs torch in the dtype the indexer picks (bf16/fp16) and (c) in float32, as
the original tool does; OpenVINO paths are CPU only.
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

from sqlindexer import openvino_vision  # noqa: E402 - imports nothing heavy


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


# (a): every path on the same ready batches, rounds interleaved so that a machine shared
# with other work slows all paths alike; images/s is the median round.
TOWER = r"""
import json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
import numpy as np
from sqlindexer.embed import Embedder
from sqlindexer.decode import DecodeOptions, prepare
model_dir, folder, bs, device, seconds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
paths = [tuple(p.split(":")) for p in sys.argv[6].split(",")]
emb, loads = {}, {}
for backend, dtype in paths:
    t = time.perf_counter()
    emb[backend, dtype] = Embedder(model_dir, device=device, dtype=dtype, backend=backend).load()
    loads[backend, dtype] = [time.perf_counter() - t]
    if backend == "openvino":  # again: the converted tower and compiled blob come from the cache
        t = time.perf_counter()
        emb[backend, dtype] = Embedder(model_dir, device=device, dtype=dtype, backend=backend).load()
        loads[backend, dtype].append(time.perf_counter() - t)
first = next(iter(emb.values()))
options = DecodeOptions(patch_size=first.patch_size, max_num_patches=first.max_num_patches)
arrays = [prepare(str(p), options).pixels for p in sorted(folder.iterdir())[:bs]]
spec = first._patch_spec
packed = spec.pack(arrays)
vectors = {k: e.embed_pixels(packed, spec=spec) for k, e in emb.items()}  # warm-up, and the vectors
rates = {k: [] for k in emb}
t_end = time.perf_counter() + seconds
rounds = 0
while rounds < 2 or (time.perf_counter() < t_end and rounds < 20):
    for k, e in emb.items():
        t = time.perf_counter()
        e.embed_pixels(packed, spec=spec)
        if device == "cuda":
            import torch; torch.cuda.synchronize()
        rates[k].append(len(arrays) / (time.perf_counter() - t))
    rounds += 1
ref = vectors.get(("torch", "float32"), next(iter(vectors.values())))
out = []
for k, e in emb.items():
    cos = (vectors[k].astype(np.float64) * ref).sum(-1)
    out.append({"backend": k[0], "dtype": k[1], "precision": e.precision, "images_per_s": statistics.median(rates[k]),
                "rounds": len(rates[k]), "min_cos": float(cos.min()), "load_s": loads[k]})
print(json.dumps(out), file=sys.stderr)
"""

# (b) with a forced choice, through the public entry point (Config's backend field; the
# factory fallback lets the bench time code from before that field existed).
FORCED = r"""
import dataclasses, functools, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from sqlindexer import config as cfg
from sqlindexer.embed import Embedder
from sqlindexer.run import run_index
folder, out, model_dir, bs, device, backend, dtype, workers = sys.argv[1:9]
values = dict(input_dirs=(folder,), output_file=out, model_name=model_dir, batch_size=int(bs), device=device,
              dtype=dtype, workers=int(workers) if workers else None)
factory = None
if "backend" in {f.name for f in dataclasses.fields(cfg.Config)}:
    values["backend"] = backend
else:
    factory = functools.partial(Embedder, backend=backend)
run_index(cfg.build(None, values), embedder_factory=factory)
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
emb.preprocess(kept[:1] and [Image.fromarray(kept[0], "RGB")])  # loads the processor (a warm cache does not)
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

COLD = "default, cold OpenVINO cache"
EMBED_LINE = re.compile(r"embedded (\d+) images in ([\d.]+) s")
LOADED_LINE = re.compile(r"loaded .+ on (\w+ \([^)]*\))")


def cpu_record() -> dict[str, object]:
    """The CPU's model name, its flags that decide the dtype, and that decision."""
    from sqlindexer import cpu

    flags = cpu.features()
    shown = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                                             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm"})
    dtype, reason = cpu.choose_dtype(flags)
    return {"model": cpu.model_name(), "flags": shown, "auto_dtype": f"{dtype} ({reason})"}


def parse_paths(text: str) -> list[tuple[str, str]]:
    paths = [tuple(p.split(":")) for p in text.split(",") if p]
    if not all(len(p) == 2 for p in paths):
        raise SystemExit(f"--paths: backend:dtype pairs, comma-separated (got {text!r})")
    return paths  # type: ignore[return-value]


def tower_alone(model: Path, folder: Path, args: argparse.Namespace, paths: list[tuple[str, str]]) -> list[dict]:
    _, _, err = child([sys.executable, "-c", TOWER, str(model), str(folder), str(args.batch_size), args.device,
                       str(args.seconds), ",".join(f"{b}:{d}" for b, d in paths)])
    return json.loads(err.strip().splitlines()[-1])


def end_to_end(model: Path, folder: Path, args: argparse.Namespace, forced: tuple[str, str] | None,
               workers: int | None, *, cold: bool = False) -> dict:
    """One run of (b) on a fresh database: default settings through the CLI, or a forced
    backend and dtype through run_index. cold: the CLI on an empty OpenVINO cache (a
    user's first run, which converts the tower)."""
    out = folder.parent / "index.jsonl"
    for f in (out, out.with_suffix(".sqlite")):
        f.unlink(missing_ok=True)
    if forced is None:
        extra = ["--workers", workers] if workers is not None else []
        with tempfile.TemporaryDirectory(prefix="ov-cold-", dir=folder.parent) as empty:
            env = {openvino_vision.CACHE_ENV: empty} if cold else None
            seconds, rss, err = cli("-i", folder, "-o", out, "--model-name", model, "--batch-size",
                                    args.batch_size, "--device", args.device, "--engine", args.engine, *extra, env=env)
    else:
        seconds, rss, err = child([sys.executable, "-c", FORCED, str(folder), str(out), str(model),
                                   str(args.batch_size), args.device, forced[0], forced[1],
                                   "" if workers is None else str(workers)],
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"))
    m = EMBED_LINE.search(err)
    loaded = LOADED_LINE.search(err)
    n = len(list(folder.iterdir()))
    return {"e2e": n / seconds, "embed": int(m.group(1)) / float(m.group(2)) if m else None, "rss": rss,
            "how": loaded.group(1) if loaded else "?"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=96, help="4000x3000 JPEGs (default 96)")
    ap.add_argument("--small", type=int, default=96, help="640x480 JPEGs (default 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size for a, b and c (default 32)")
    ap.add_argument("--workers", type=int, default=None, help="image-indexer --workers (default: its own default)")
    ap.add_argument("--workers-sweep", default="",
                    help="comma-separated --workers values: (b) with default settings again for each")
    ap.add_argument("--device", default="auto", help="image-indexer --device (default auto)")
    ap.add_argument("--paths", default=None,
                    help="backend:dtype pairs for (a) and forced (b) (default on a CPU: torch:float32,"
                         "torch:bfloat16,openvino:float32,openvino:auto; with a GPU: torch:float32,torch:auto)")
    ap.add_argument("--seconds", type=float, default=20.0, help="time (a) for about this long (default 20)")
    ap.add_argument("--unique", type=int, default=None,
                    help="generate only this many distinct images per set and copy them up to the count "
                         "(default: all distinct; large GPU runs need thousands of photos)")
    ap.add_argument("--skip-reference", action="store_true", help="do not run (c) (slow on big sets)")
    ap.add_argument("--skip-forced", action="store_true", help="(b) with default settings only")
    ap.add_argument("--skip-cold", action="store_true",
                    help="leave out (b) with default settings on an empty OpenVINO cache (the first run)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="image-indexer --engine for b (default local; ray starts or joins a local Ray instance)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny model instead of the base shape (smoke test)")
    ap.add_argument("--workdir", help="keep images, model and OpenVINO cache here (default: a temporary folder)")
    ap.add_argument("--json", default="bench/results/throughput.json", help="where to write the results")
    args = ap.parse_args()

    import torch

    from sqlindexer.testing import BASE, TINY, build_random_siglip2

    gpu = args.device in ("cuda", "mps") or (args.device == "auto" and torch.cuda.is_available())
    default_paths = "torch:float32,torch:auto" if gpu else "torch:float32,torch:bfloat16,openvino:float32,openvino:auto"
    paths = parse_paths(args.paths or default_paths)
    if not openvino_vision.installed():
        print("openvino is not installed: its paths are left out", flush=True)
        paths = [p for p in paths if p[0] != "openvino"]
    sweep = [int(w) for w in args.workers_sweep.split(",") if w]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sqlindexer-throughput-"))
    # The first (a) run converts the tower into this cache: (b) then loads it warm, as a
    # user's second run would; (a)'s load_s shows both.
    os.environ[openvino_vision.CACHE_ENV] = str(work / "openvino-cache")
    try:
        model = work / ("model-tiny" if args.tiny else "model-base")
        if not (model / "config.json").exists():
            print(f"building random SigLIP 2 ({'tiny' if args.tiny else 'base shape'}) in {model} ...", flush=True)
            build_random_siglip2(model, shape=TINY if args.tiny else BASE, with_tokenizer=False)
        sets = {"photo 4000x3000": (work / "photos", args.photos, (4000, 3000)),
                "small 640x480": (work / "small", args.small, (640, 480))}
        towers, rows = [], []
        for label, (folder, n, size) in sets.items():
            if n <= 0:
                continue
            if not folder.exists() or len(list(folder.iterdir())) != n:
                shutil.rmtree(folder, ignore_errors=True)
                print(f"generating {n} {label} JPEGs ...", flush=True)
                make_photos(folder, n, size, seed=len(label), unique=args.unique)
            rows += measure_set(label, folder, n, model, args, paths, sweep, towers)
        cpu_info = cpu_record()
        print(f"\n{device_name()}; CPU {cpu_info['model']}, flags {' '.join(cpu_info['flags'])}; "
              f"--dtype auto on the CPU: {cpu_info['auto_dtype']}; batch size {args.batch_size}, "
              f"{'tiny' if args.tiny else 'base-shape'} model\n")
        print("(a) the vision tower alone, side by side in one process\n")
        print(table(towers, ["images", "path", "precision", "img/s", "vs torch f32", "min cos", "load s", "rounds"]))
        print("\n(b) end to end, each in a fresh process; b/a32: b's embedding phase against torch float32's "
              "tower alone; b/c: against the original loop; 'wall' columns whole commands\n")
        print(table(rows, ["images", "run", "how", "b e2e img/s", "b embed img/s", "b/a32", "b/c", "b/c wall",
                           "RSS MB"]))
        print("\nfeed (no model)\n")
        print(table([r for r in rows if "decode img/s/core" in r],
                    ["images", "decode img/s/core", "feed img/s", "pack img/s", "processor img/s", "c ref img/s",
                     "RSS c MB"]))
        save(args.json, {"batch_size": args.batch_size, "tiny": args.tiny, "device": device_name(), "cpu": cpu_info,
                         "machine": machine(), "tower": towers, "rows": rows})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def measure_set(label: str, folder: Path, n: int, model: Path, args: argparse.Namespace,
                paths: list[tuple[str, str]], sweep: list[int], towers: list[dict]) -> list[dict]:
    mb = sum(p.stat().st_size for p in folder.iterdir()) / n / 2**20
    images = f"{n} {label} ({mb:.1f} MB)"
    tower = tower_alone(model, folder, args, paths)
    base = next((t["images_per_s"] for t in tower if (t["backend"], t["dtype"]) == ("torch", "float32")), None)
    for t in tower:
        towers.append({"images": images, "path": f"{t['backend']} {t['dtype']}", "precision": t["precision"],
                       "img/s": t["images_per_s"], "vs torch f32": t["images_per_s"] / base if base else None,
                       "min cos": f"{t['min_cos']:.6f}", "load s": " / ".join(f"{x:.1f}" for x in t["load_s"]),
                       "rounds": t["rounds"]})
    _, _, err = child([sys.executable, "-c", FEED_ONLY, str(model), str(folder), str(args.batch_size),
                       str(args.workers or "")])
    feed = json.loads(err.strip().splitlines()[-1])
    if args.skip_reference:
        rss_c, c = None, {"images_per_s": None, "wall_images_per_s": None}
    else:
        _, rss_c, err = child([sys.executable, "-c", REFERENCE, str(model), str(folder), str(args.batch_size),
                               args.device])
        c = json.loads(err.strip().splitlines()[-1])
    runs: list[tuple[str, tuple[str, str] | None, int | None]] = [("default", None, args.workers)]
    runs += [(f"default, --workers {w}", None, w) for w in sweep]
    if openvino_vision.installed() and not args.skip_cold:
        runs.append((COLD, None, args.workers))
    if not args.skip_forced:
        runs += [(f"{b} {d}", (b, d), args.workers) for b, d in paths]
    rows = []
    for name, forced, workers in runs:
        r = end_to_end(model, folder, args, forced, workers, cold=name == COLD)
        speed = r["embed"] or r["e2e"]
        rows.append({"images": images, "run": name, "how": r["how"], "b e2e img/s": r["e2e"],
                     "b embed img/s": r["embed"], "b/a32": speed / base if base else None,
                     "b/c": speed / c["images_per_s"] if c["images_per_s"] else None,
                     "b/c wall": r["e2e"] / c["wall_images_per_s"] if c["wall_images_per_s"] else None,
                     "RSS MB": r["rss"] / 2**20})
    rows[0].update({"decode img/s/core": feed["decode_per_core"], "feed img/s": feed["feed_per_s"],
                    "pack img/s": feed["pack_per_s"], "processor img/s": feed["preprocess_per_s"],
                    "c ref img/s": c["images_per_s"], "RSS c MB": rss_c / 2**20 if rss_c else None})
    return rows


if __name__ == "__main__":
    main()
