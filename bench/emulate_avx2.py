#!/usr/bin/env python3
"""torch float32 against OpenVINO f32 with this CPU's instruction set capped to AVX2.

What `--dtype auto` picks on a CPU without native bf16 is OpenVINO at f32 precision
(sqlindexer/cpu.py). Where the only CPU at hand has AVX-512/AMX, this emulates an
AVX2-only one by capping what each runtime dispatches to (--caps on):

  ATEN_CPU_CAPABILITY=avx2     torch's ATen vectorised kernels (torch.backends.cpu.get_cpu_capability())
  MKL_ENABLE_INSTRUCTIONS=AVX2 MKL's sgemm, which torch's float32 Linear and attention use
  ONEDNN_MAX_CPU_ISA=AVX2      oneDNN (OpenVINO's brgemm/jit kernels; torch's, where it uses oneDNN)
  OV_CPU_MAX_ISA=AVX2          OpenVINO's own ISA checks (its plugin's kernels, its default precision)

It does not cap MLAS, the sgemm that OpenVINO's CPU plugin runs most of the tower's
FullyConnected layers with: that one picks its AVX-512 kernel from cpuid whatever the
environment says (docs/performance-cpu.md, "A CPU without native bf16"). --verify prints
what each runtime reports under the current caps.

  --what tower   bench/throughput.py's (a): the vision tower alone, torch float32 and
                 OpenVINO f32 side by side in one process, interleaved rounds
  --what fc-onednn  OpenVINO f32 alone, as compiled by the indexer and again with every
                 FullyConnected moved from MLAS to oneDNN (a Clamp(-1e30, 1e30) after each
                 weight MatMul: a post-op, which MLAS does not take, and no change to the
                 values): under the caps, what the tower does with its matrix products in
                 capped (AVX2) kernels, as a stand-in for MLAS's own AVX2 kernel
  --what e2e     the CLI with --backend openvino --dtype float32 and --backend torch
                 --dtype float32, each a fresh process, alternating, --rounds times: images/s
                 (embedding phase and whole command) and peak RSS of the process tree

The model (random, base shape) and the photos are made as bench/throughput.py makes them,
in --workdir; the OpenVINO cache is kept apart per --caps (ov-avx2-cache, ov-native-cache),
so that no blob compiled for the wider ISA is reused under the caps. Each invocation is
meant to be short (a few minutes on 2 cores): run it several times, caps on and off in
turn, for a range.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli
from throughput import EMBED_LINE, LOADED_LINE, make_photos, tower_alone

from sqlindexer import openvino_vision  # imports nothing heavy

CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OV_CPU_MAX_ISA": "AVX2"}

VERIFY = r"""
import collections, json, os, sys, io, contextlib
import torch
from sqlindexer.embed import Embedder
import openvino
print("torch ATen capability:", torch.backends.cpu.get_cpu_capability())
core = openvino.Core()
print("OpenVINO OPTIMIZATION_CAPABILITIES:", core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
print("OpenVINO default INFERENCE_PRECISION_HINT:", core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
e = Embedder(sys.argv[1], device="cpu", dtype="float32", backend="openvino").load()
count = collections.Counter()
for op in e._tower._compiled.get_runtime_model().get_ordered_ops():
    info = op.get_rt_info()
    if "primitiveType" in info and "layerType" in info:
        kind = info["layerType"].astype(str)
        if kind in ("FullyConnected", "Subgraph", "MVN", "Eltwise", "MatMul", "Softmax"):
            count[kind, info["primitiveType"].astype(str)] += 1
print("OpenVINO f32 kernels:", ", ".join(f"{n} {k} {p}" for (k, p), n in sorted(count.items())))
"""

FC_ONEDNN = r"""
import collections, os, sys, time
from pathlib import Path
import numpy as np
import openvino
import openvino.opset13 as ops
from sqlindexer import openvino_vision
core = openvino.Core()
xml = next(Path(os.environ[openvino_vision.CACHE_ENV], "ir").glob("*/encoder_head.xml"))
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 256, 768)).astype(np.float32)
m = np.ones((32, 256), np.int64)
m[16:, 128:] = 0
out, rates, kinds = {}, {}, {}
for variant in ("mlas", "onednn"):
    model = core.read_model(str(xml))
    if variant == "onednn":
        for op in list(model.get_ordered_ops()):
            if op.get_type_name() == "MatMul" and op.input_value(1).get_node().get_type_name() in ("Constant", "Convert"):
                targets = list(op.output(0).get_target_inputs())
                clamp = ops.clamp(op.output(0), -1e30, 1e30)
                for t in targets:
                    t.replace_source_output(clamp.output(0))
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    tower = openvino_vision.Tower(compiled)
    out[variant] = tower(x, m)
    rates[variant] = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter()
        tower(x, m)
        rates[variant].append(len(x) / (time.perf_counter() - t))
    kinds[variant] = collections.Counter(op.get_rt_info()["primitiveType"].astype(str) for op in
                                         compiled.get_runtime_model().get_ordered_ops()
                                         if op.get_rt_info()["layerType"].astype(str) == "FullyConnected")
a, b = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (out["mlas"], out["onednn"]))
for variant in rates:
    print(f"{variant:7} {np.median(rates[variant]):5.2f} img/s (rounds {', '.join(f'{r:.2f}' for r in rates[variant])})"
          f"  FullyConnected: {dict(kinds[variant])}")
print(f"min cos onednn vs mlas {float((a.astype(np.float64) * b).sum(1).min()):.7f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", choices=("on", "off"), required=True, help="cap the ISA to AVX2 (on) or not (off)")
    ap.add_argument("--what", choices=("tower", "e2e", "verify", "fc-onednn"), required=True)
    ap.add_argument("--photos", type=int, default=64, help="4000x3000 JPEGs (default 64)")
    ap.add_argument("--unique", type=int, default=16, help="distinct ones among them (default 16)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0, help="(a): time for about this long (default 30)")
    ap.add_argument("--rounds", type=int, default=1, help="e2e: rounds of both paths (default 1); fc-onednn: batches timed (default 4)")
    ap.add_argument("--order", default="openvino,torch", help="e2e: the order within a round")
    ap.add_argument("--workdir", default="/tmp/tp-avx2")
    ap.add_argument("--results", default=None, help="append one JSON line per measurement here")
    args = ap.parse_args()
    args.device = "cpu"

    work = Path(args.workdir)
    model, photos = work / "model-base", work / "photos"
    if not (model / "config.json").exists():
        from sqlindexer.testing import BASE, build_random_siglip2

        build_random_siglip2(model, shape=BASE, with_tokenizer=False)
    if not photos.exists() or len(list(photos.iterdir())) != args.photos:
        make_photos(photos, args.photos, (4000, 3000), seed=len("photo 4000x3000"), unique=args.unique)
    for name in CAPS:
        os.environ.pop(name, None)
    if args.caps == "on":
        os.environ.update(CAPS)
    os.environ[openvino_vision.CACHE_ENV] = str(work / ("ov-avx2-cache" if args.caps == "on" else "ov-native-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"

    records = []
    if args.what == "verify":
        import subprocess

        env = dict(os.environ, MKL_VERBOSE="1")
        code = "import torch; x = torch.randn(64, 64); x @ x"
        banner = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=False).stdout
        print("MKL:", next((line for line in banner.splitlines() if "oneMKL" in line), "?"))
        subprocess.run([sys.executable, "-c", VERIFY, str(model)], check=True)
        return
    if args.what == "fc-onednn":
        import subprocess

        subprocess.run([sys.executable, "-c", FC_ONEDNN, str(args.rounds if args.rounds > 1 else 4)], check=True)
        return
    if args.what == "tower":
        for t in tower_alone(model, photos, args, [("torch", "float32"), ("openvino", "float32")]):
            records.append({"what": "tower", "caps": args.caps, **t})
        base = next(r["images_per_s"] for r in records if r["backend"] == "torch")
        for r in records:
            print(f"caps {args.caps}  tower  {r['backend']:8} {r['precision']:8} {r['images_per_s']:6.2f} img/s  "
                  f"{r['images_per_s'] / base:.2f}x torch f32  min cos {r['min_cos']:.6f}  rounds {r['rounds']}  "
                  f"load s {' / '.join(f'{x:.1f}' for x in r['load_s'])}", flush=True)
    else:
        out = work / "index.jsonl"
        n = len(list(photos.iterdir()))
        for _ in range(args.rounds):
            for backend in args.order.split(","):
                for f in (out, out.with_suffix(".sqlite")):
                    f.unlink(missing_ok=True)
                seconds, rss, err = cli("-i", photos, "-o", out, "--model-name", model, "--batch-size",
                                        args.batch_size, "--device", "cpu", "--backend", backend, "--dtype", "float32")
                m, loaded = EMBED_LINE.search(err), LOADED_LINE.search(err)
                r = {"what": "e2e", "caps": args.caps, "backend": backend, "e2e": n / seconds,
                     "embed": int(m.group(1)) / float(m.group(2)) if m else None, "rss_mb": rss / 2**20,
                     "how": loaded.group(1) if loaded else "?", "seconds": seconds}
                records.append(r)
                print(f"caps {args.caps}  e2e  {backend:8} {r['how']:24} embed {r['embed'] or 0:6.2f} img/s  "
                      f"whole {r['e2e']:6.2f} img/s  {seconds:5.1f} s  peak RSS {r['rss_mb']:,.0f} MB", flush=True)
    if args.results:
        with open(args.results, "a") as f:
            for r in records:
                f.write(json.dumps({"time": time.strftime("%H:%M:%S"), **r}) + "\n")


if __name__ == "__main__":
    main()
