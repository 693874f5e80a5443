#!/usr/bin/env python3
"""Re-index cost on a large tree: no-change and 1%-changed --reindex against a bare walk.

Builds a tree of N small image files (they share content: the point is the file count),
indexes it once without running the model (the vectors come from a --source-index in the
original tool's layout), then times, each as a fresh process:

  walk        os.scandir recursion with the stat it needs (the floor)
  reindex     image-indexer --reindex with nothing changed
  1% changed  image-indexer --reindex after touching 1% of the files (they are embedded
              with a tiny random SigLIP 2)
  alone       image-indexer on a folder of copies of just the changed files (fresh
              database): the "time to embed the changed files" of the 1% target

The four are run in turn, --repeat rounds of one each, and the best of each is kept.
Prints a table with the ratios to the walk, the two target ratios within each round and
their medians, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, cli, machine, save, table  # noqa: E402

WALK = r"""
import os, sys
def walk(top):
    n = 0
    with os.scandir(top) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                n += walk(e.path)
            else:
                e.stat(); n += 1
    return n
print(walk(sys.argv[1]))
"""


def build_tree(root: Path, n: int, per_dir: int = 1000) -> list[Path]:
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 40, 200)).save(buf, "JPEG")
    data = buf.getvalue()
    paths = []
    for i in range(n):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:07d}.jpg"
        p.write_bytes(data)
        paths.append(p)
    return paths


def write_source_index(paths: list[Path], out: Path, dim: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    with open(out, "w") as f:
        for p in paths:
            st = p.stat()
            v = rng.standard_normal(dim).astype("float32")
            v /= np.linalg.norm(v)
            rec = {"vector": v.tolist(), "metadata": {
                "path": str(p), "filename": p.name, "size_bytes": st.st_size,
                "creation_time": datetime.fromtimestamp(st.st_ctime).isoformat(),
                "modification_time": datetime.fromtimestamp(st.st_mtime).isoformat(),
                "width": 32, "height": 24, "exif": {}}}
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000, help="number of image files (default 100000)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction touched for the changed run (default 0.01)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions, best is kept (default 3)")
    ap.add_argument("--workdir", help="where to build the tree (default: a temporary folder, removed after)")
    ap.add_argument("--json", default="bench/results/rescan.json", help="where to write the results")
    args = ap.parse_args()

    from sqlindexer.testing import build_random_siglip2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sqlindexer-rescan-"))
    try:
        tree, model = work / "tree", work / "model"
        print(f"building {args.files} files under {tree} ...", flush=True)
        paths = build_tree(tree, args.files)
        build_random_siglip2(model, with_tokenizer=False)
        src, out = work / "original.jsonl", work / "index.jsonl"
        write_source_index(paths, src, dim=32)
        base = ["-i", tree, "-o", out, "--model-name", model, "--reindex", "--log-level", "WARNING"]
        t_import, rss_import, err = cli(*base, "--source-index", src)
        print(err.strip().splitlines()[-1])

        k = max(1, int(args.files * args.changed))
        step = max(1, args.files // k)
        touched = paths[::step][:k]

        def changed_run():
            for p in touched:
                st = p.stat()
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            return cli(*base)

        # The target for the changed run is "2x the walk plus the time to embed the changed
        # files": that time is a run on just those files (fresh process, fresh database,
        # model load and decode workers included, as in the changed run).
        alone = work / "changed-only"
        alone.mkdir(exist_ok=True)
        for i, p in enumerate(touched):
            shutil.copyfile(p, alone / f"{i:07d}.jpg")

        def alone_run():
            for f in work.glob("changed-only.*"):
                f.unlink()
            return cli("-i", alone, "-o", work / "changed-only.jsonl", "--model-name", model, "--log-level", "WARNING")

        # Interleaved, one of each per round, best of the rounds: this machine's speed
        # drifts, and the ratios compare runs made side by side.
        rounds = []
        for _ in range(args.repeat):
            rounds.append({
                "walk": child([sys.executable, "-c", WALK, str(tree)]),
                "nochange": cli(*base),
                "changed": changed_run(),
                "alone": alone_run(),
            })

        def best(name):
            return min((r[name] for r in rounds), key=lambda r: r[0])

        spread = {name: [round(r[name][0], 3) for r in rounds] for name in rounds[0]}
        print("seconds per round:", spread)
        # The same two ratios within each round: runs made side by side, so a slow stretch
        # of the machine moves both sides of a ratio.
        per_round = {
            "nochange": [r["nochange"][0] / r["walk"][0] for r in rounds],
            "changed": [r["changed"][0] / (2 * r["walk"][0] + r["alone"][0]) for r in rounds],
        }
        print("ratios per round: " + "; ".join(f"{k} {', '.join(f'{v:.2f}' for v in vs)}"
                                               for k, vs in per_round.items()))

        walk, nochange, changed = best("walk"), best("nochange"), best("changed")
        print(nochange[2].strip().splitlines()[-1])
        print(changed[2].strip().splitlines()[-1])
        embed_k = best("alone")
        budget = 2 * walk[0] + embed_k[0]
        rows = [
            {"what": "bare os.scandir walk + stat", "seconds": walk[0], "vs walk": 1.0, "peak RSS MB": walk[1] / 2**20},
            {"what": "--reindex, nothing changed", "seconds": nochange[0], "vs walk": nochange[0] / walk[0],
             "peak RSS MB": nochange[1] / 2**20},
            {"what": f"--reindex, {k} files changed", "seconds": changed[0], "vs walk": changed[0] / walk[0],
             "peak RSS MB": changed[1] / 2**20},
            {"what": f"index only those {k} files (fresh)", "seconds": embed_k[0], "vs walk": embed_k[0] / walk[0],
             "peak RSS MB": embed_k[1] / 2**20},
            {"what": "first import from --source-index", "seconds": t_import, "vs walk": t_import / walk[0],
             "peak RSS MB": rss_import / 2**20},
        ]
        print(f"\n{args.files} files, best of {args.repeat}, each a fresh process (Python start-up included)\n")
        print(table(rows, ["what", "seconds", "vs walk", "peak RSS MB"]))
        print(f"\nno change: {nochange[0] / walk[0]:.2f}x the walk (target <= 2)")
        print(f"{k} changed: {changed[0]:.2f} s against 2 x walk + indexing them alone = {budget:.2f} s "
              f"(ratio {changed[0] / budget:.2f}, target <= 1)")
        print(f"median of the per-round ratios: no change {statistics.median(per_round['nochange']):.2f}, "
              f"{k} changed {statistics.median(per_round['changed']):.2f}")
        save(args.json, {"files": args.files, "changed": k, "machine": machine(), "rows": rows,
                         "nochange_vs_walk": nochange[0] / walk[0], "changed_vs_budget": changed[0] / budget,
                         "rounds": spread, "ratios_per_round": per_round})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
