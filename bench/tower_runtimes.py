#!/usr/bin/env python3
"""The SigLIP 2 vision tower's encoder and head in each CPU runtime, side by side in one process.

torch float32 and bfloat16, ONNX Runtime (CPU execution provider, float32: `torch.onnx.export`
of the module that openvino_vision converts) and OpenVINO f32 and with its own precision
(bf16 where native), on the same (8, 256, 768) embedded patches with a padded row, in
interleaved rounds: images/s (median and best round), the ratio to torch float32 and the
least cosine to torch float32's output. ONNX Runtime is not a dependency of the project:
install onnxruntime and onnx to include it (it is skipped otherwise).

Needs the base-shape model and the OpenVINO IR that bench/throughput.py leaves in --workdir:

    python bench/throughput.py --photos 32 --small 0 --workdir /tmp/tp && python bench/tower_runtimes.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/tp", help="bench/throughput.py's --workdir (default /tmp/tp)")
    ap.add_argument("--seconds", type=float, default=40.0, help="time the rounds for about this long (default 40)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import numpy as np
    import openvino
    import torch

    from sqlindexer import openvino_vision as ov
    from sqlindexer.embed import Embedder

    work = Path(args.workdir)
    model_dir = str(work / "model-base")
    tower = Embedder(model_dir, device="cpu", dtype="float32", backend="torch").load()._model
    f32 = ov._wrapper(tower)
    b16 = ov._wrapper(Embedder(model_dir, device="cpu", dtype="float32", backend="torch").load()._model)
    b16 = b16.to(torch.bfloat16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256, 768)).astype(np.float32)
    m = np.ones((8, 256), np.int64)
    m[3, 200:] = 0
    tx, tm = torch.from_numpy(x), torch.from_numpy(m)
    paths = {"torch f32": lambda: f32(tx, tm).numpy(), "torch bf16": lambda: b16(tx.bfloat16(), tm).float().numpy()}
    ort = _onnxruntime(f32, tx, tm, work / "encoder_head.onnx")
    if ort is not None:
        paths["onnxruntime f32"] = lambda: ort.run(None, {"embeds": x, "mask": m})[0]
    core = openvino.Core()
    xml = next((work / "openvino-cache" / "ir").glob("*/encoder_head.xml"))
    for label, config in (("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino auto", {})):
        compiled = core.compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        paths[f"{label} ({precision})"] = lambda c=compiled: c([x, m])[0]
    with torch.inference_mode():
        out = {k: f() for k, f in paths.items()}  # warm-up, and the outputs
        rates: dict[str, list[float]] = {k: [] for k in paths}
        end, rounds = time.perf_counter() + args.seconds, 0
        while rounds < 3 or (time.perf_counter() < end and rounds < 20):
            for k, f in paths.items():
                t = time.perf_counter()
                f()
                rates[k].append(len(x) / (time.perf_counter() - t))
            rounds += 1
    ref = out["torch f32"] / np.linalg.norm(out["torch f32"], axis=-1, keepdims=True)
    base = statistics.median(rates["torch f32"])
    print(f"torch {torch.__version__}, openvino {openvino.__version__}"
          + (f", onnxruntime {_version('onnxruntime')}" if ort is not None else ", onnxruntime not installed"))
    for k in paths:
        v = out[k] / np.linalg.norm(out[k], axis=-1, keepdims=True)
        med = statistics.median(rates[k])
        print(f"{k:22s} {med:6.2f} img/s (best {max(rates[k]):6.2f})  {med / base:5.2f}x  "
              f"min cos {float((v * ref).sum(-1).min()):.6f}  rounds {len(rates[k])}")


def _onnxruntime(module, tx, tm, path: Path):
    try:
        import onnxruntime
    except ImportError:
        return None
    import torch

    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(module, (tx, tm), str(path), input_names=["embeds", "mask"], output_names=["pooled"],
                              dynamic_axes={"embeds": {0: "n"}, "mask": {0: "n"}}, opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    main()
