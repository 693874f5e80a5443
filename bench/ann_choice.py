#!/usr/bin/env python3
"""faiss-cpu against usearch on this machine: build time, query time and recall@20 (after
exact re-scoring of the candidates against the float32 vectors), on the synthetic vectors
of _synthetic.py (clustered and random; --kinds). What chose the library of sqlindexer/ann.py.

  faiss IVF-SQ8   IndexIVFScalarQuantizer, 8-bit codes (768 bytes a vector), a flat
                  coarse quantizer, k-means on a sample; nprobe swept
  faiss HNSW-SQ8  IndexHNSWSQ, M=32, efConstruction=40; efSearch swept
  usearch HNSW    usearch.index.Index, i8 storage, connectivity 16; expansion_search swept

Each query asks the index for CANDIDATES rows and re-scores them exactly; recall@20 is
the share of the exact top 20 in the re-scored top 20. Queries run one at a time in one
process (as a CLI query does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402
from _common import machine, save, table  # noqa: E402

TOP = 20
CANDIDATES = 100


def exact_top(x: np.ndarray, qs: np.ndarray) -> np.ndarray:
    s = qs @ x.T
    return np.argsort(-s, axis=1)[:, :TOP]


def rescored(x: np.ndarray, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
    cand = cand[cand >= 0]
    s = x[cand] @ q
    return cand[np.argsort(-s)[:TOP]]


def sweep(name: str, x, qs, truth, search, settings, build_s, extra) -> list[dict]:
    out = []
    for setting in settings:
        times, found = [], 0
        for i, q in enumerate(qs):
            t0 = time.perf_counter()
            top = rescored(x, q, search(q, setting))
            times.append(time.perf_counter() - t0)
            found += len(np.intersect1d(top, truth[i]))
        out.append({"index": name, "setting": setting, "build s": build_s, "query ms": float(np.median(times[1:]) * 1000),
                    "recall@20": found / (TOP * len(qs)), **extra})
        print(json.dumps(out[-1]), flush=True)
    return out


def faiss_ivf(x, qs, truth, n):
    import faiss

    nlist = max(1, int(np.sqrt(n)))
    t0 = time.perf_counter()
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist,
                                          faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    sample = x[np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)]
    index.train(sample)
    index.add(x)
    build = time.perf_counter() - t0

    def search(q, nprobe):
        index.nprobe = nprobe
        return index.search(q[None], CANDIDATES)[1][0]

    return sweep(f"faiss IVF{nlist}-SQ8", x, qs, truth, search, [4, 8, 16, 32, 64], build, {"MB": n * 768 / 2**20})


def faiss_hnsw(x, qs, truth, n):
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexHNSWSQ(x.shape[1], faiss.ScalarQuantizer.QT_8bit, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.train(x[:50_000])
    index.add(x)
    build = time.perf_counter() - t0

    def search(q, ef):
        index.hnsw.efSearch = ef
        return index.search(q[None], CANDIDATES)[1][0]

    return sweep("faiss HNSW32-SQ8", x, qs, truth, search, [100, 200, 400], build, {"MB": n * (768 + 64 * 4) / 2**20})


def usearch_hnsw(x, qs, truth, n):
    from usearch.index import Index

    t0 = time.perf_counter()
    index = Index(ndim=x.shape[1], metric="ip", dtype="i8", connectivity=16, expansion_add=128)
    index.add(np.arange(n), x, threads=2)
    build = time.perf_counter() - t0

    def search(q, ef):
        index.expansion_search = ef
        return np.asarray(index.search(q, CANDIDATES).keys, dtype=np.int64)

    return sweep("usearch HNSW16-i8", x, qs, truth, search, [100, 200, 400], build, {"MB": index.memory_usage / 2**20})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--kinds", default="clustered,random")
    ap.add_argument("--libraries", default="faiss_ivf,faiss_hnsw,usearch_hnsw")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--json", default="bench/results/ann_choice.json")
    args = ap.parse_args()
    import faiss
    import usearch

    results = []
    for kind in args.kinds.split(","):
        x, _ = _synthetic.vectors(args.rows, 768, kind, pairs=args.rows // 200)
        qs = _synthetic.queries(args.queries + 1, 768, kind, args.rows)
        truth = exact_top(x, qs)
        for lib in args.libraries.split(","):
            for r in globals()[lib](x, qs, truth, args.rows):
                results.append({"kind": kind, **r})
    print(table(results, ["kind", "index", "setting", "build s", "query ms", "recall@20", "MB"]))
    save(args.json, {"rows": args.rows, "faiss": faiss.__version__, "usearch": usearch.__version__,
                     "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
