#!/usr/bin/env python3
"""A text query (`search`) end to end, each a fresh process: the first search of a checkpoint
(torch, then the text tower kept for OpenVINO), the two searches after it (the kept tower:
no torch, no transformers; the first of them compiles it into OpenVINO's model cache), and
torch alone (a cache folder that cannot be written: nothing kept, as before the kept tower
existed).

Builds a random SigLIP 2 of the exact base shape (its tokenizer is the tests' small one:
the tower's 12 layers are timed as the real model's, the vocabulary table is read a row
per token either way) and a database of a few photos whose vectors come from a
--source-index, so that no image is embedded. Rounds alternate the cases; the best and
the spread are printed, with peak RSS (the whole process tree), and the least cosine
between the kept tower's and torch's vectors over a set of texts.

--baseline DIR adds a checkout of another commit (its sqlindexer run from DIR), timed in
the same rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli, machine, save, table  # noqa: E402

TEXTS = ["a red car", "two dogs playing in the snow at night", "Ünïcödé café, 東京 🌃", "",
         " ".join(["a text longer than the sixty-four tokens it is cut at"] * 10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of the base shape (smoke test)")
    ap.add_argument("--baseline", help="a checkout of another commit to time beside this one")
    ap.add_argument("--workdir", help="where to build the model and the database (default: a temporary folder)")
    ap.add_argument("--json", default="bench/results/text_query.json")
    args = ap.parse_args()

    from rescan import write_source_index

    from sqlindexer.testing import BASE, TINY, build_random_siglip2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sqlindexer-text-query-"))
    try:
        model, photos = work / "model", work / "photos"
        if not (model / "config.json").is_file():
            print(f"building random SigLIP 2 ({'tiny' if args.tiny else 'base shape'}) in {model} ...", flush=True)
            build_random_siglip2(model, shape=TINY if args.tiny else BASE)
        dim = (TINY if args.tiny else BASE)["hidden_size"]
        photos.mkdir(exist_ok=True)
        paths = []
        for i in range(8):
            paths.append(photos / f"p{i}.jpg")
            paths[-1].write_bytes(b"\xff\xd8 not decoded: the vectors are imported %d" % i)
        write_source_index(paths, work / "source.jsonl", dim=dim)
        db = work / "index.sqlite"
        for f in work.glob("index.*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        cli("-i", photos, "-o", work / "index.jsonl", "--model-name", model, "--reindex", "--source-index",
            work / "source.jsonl", "--log-level", "WARNING")
        query = ["search", "a red car at night", "--db", db, "--top", "3"]
        unwritable = work / "not-a-folder"
        unwritable.write_text("a file where the cache folder would be: nothing can be kept\n")
        kept_cache = work / "kept"
        cases = {
            "first search (torch, then keeps the tower)": lambda: _fresh(kept_cache),
            # The first search after the keep compiles the kept tower into OpenVINO's model
            # cache; the ones after that read the compiled blob.
            "the next search (compiles the kept tower)": lambda: kept_cache,
            "a later search (reads the compiled blob)": lambda: kept_cache,
            "torch alone (nothing can be kept)": lambda: unwritable,
        }
        if args.baseline:
            cases["baseline checkout (torch)"] = lambda: unwritable
            _check_baseline(Path(args.baseline).resolve())
        times: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, cache in cases.items():
                env = {"SQLINDEXER_OPENVINO_CACHE": str(cache())}
                if name.startswith("baseline"):
                    # PYTHONSAFEPATH: `python -m` would put the current folder (this
                    # checkout, run from its root) ahead of PYTHONPATH.
                    env.update(PYTHONPATH=str(Path(args.baseline).resolve()), PYTHONSAFEPATH="1")
                seconds, rss, _ = cli(*query, env=env)
                times[name].append((seconds, rss))
        rows = [{"case": name, "best s": min(s for s, _ in t), "spread s": " / ".join(f"{s:.2f}" for s, _ in t),
                 "peak RSS MB": f"{min(r for _, r in t) / 2**20:,.0f}-{max(r for _, r in t) / 2**20:,.0f}"}
                for name, t in times.items()]
        cosine = _least_cosine(model, kept_cache)
        print(f"\n{'tiny' if args.tiny else 'base-shape'} SigLIP 2, best of {args.repeat} rounds, each a fresh "
              f"process\n")
        print(table(rows, ["case", "best s", "spread s", "peak RSS MB"]))
        print(f"\nleast cosine, kept tower vs torch float32, over {len(TEXTS)} texts: {cosine:.7f}")
        save(args.json, {"machine": machine(), "rows": rows, "least_cosine": cosine, "tiny": args.tiny})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _check_baseline(baseline: Path) -> None:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(baseline), PYTHONSAFEPATH="1")
    found = subprocess.run([sys.executable, "-c", "import sqlindexer; print(sqlindexer.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).is_relative_to(baseline):
        raise SystemExit(f"--baseline {baseline}: its sqlindexer is not the one imported ({found})")


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def _least_cosine(model: Path, cache: Path) -> float:
    import numpy as np

    os.environ["SQLINDEXER_OPENVINO_CACHE"] = str(cache)
    from sqlindexer.openvino_text import TextTower
    from sqlindexer.text_query import TorchText

    kept = TextTower.find(str(model))
    if kept is None:
        raise SystemExit("the first search kept no text tower")
    got, want = kept.embed_texts(TEXTS), TorchText(str(model)).embed_texts(TEXTS)
    return float(np.min(np.sum(got * want, axis=1)))


if __name__ == "__main__":
    main()
