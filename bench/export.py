#!/usr/bin/env python3
"""Export speed and memory: our jsonl/pkl export against plain json.dumps / pickle.dump.

Fills a working database with --rows rows of 768-d float32 vectors (and a little EXIF),
then times, each in a fresh process:

  ours jsonl / ours pkl       sqlindexer.index_file.write_index streaming from SQLite
  json.dumps / pickle.dump    the same rows turned into record dicts and written with the
                              standard library, one record at a time

and the peak RSS of our export at --rows/5 and --rows, to show it does not grow with the
number of rows. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, machine, save, table  # noqa: E402


def fill(db_path: Path, rows: int, dim: int) -> None:
    import numpy as np

    from sqlindexer import db, runs, state

    conn = db.connect(db_path)
    run = runs.start_run(conn, mode="reindex", model="bench", config={}, pid=0)
    rng = np.random.default_rng(0)
    exif = {"Make": "Canon", "Model": "Canon EOS 5D", "ExifOffset": {"FNumber": 4.0, "ISOSpeedRatings": 200}}

    def records():
        for i in range(rows):
            v = rng.standard_normal(dim).astype("<f4")
            v /= np.linalg.norm(v)
            yield state.Imported(path=f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg", size=3_000_000 + i,
                                 mtime_ns=1_700_000_000_000_000_000 + i, ctime_ns=1_700_000_000_000_000_000,
                                 vector=v.tobytes(), dim=dim, width=4000, height=3000, exif=exif)

    state.import_vectors(conn, records(), run)
    conn.close()


def export_variant(variant: str, db_path: Path, out: Path) -> None:
    from sqlindexer import db, index_file, records

    conn = db.connect(db_path)
    rows = records.iter_export_rows(conn, "bench")
    t0 = time.perf_counter()
    if variant in ("ours-jsonl", "ours-pkl"):
        n = index_file.write_index(rows, out, variant.split("-")[1])
    elif variant == "json.dumps":
        with open(out, "w") as f:
            n = 0
            for row in rows:
                f.write(json.dumps(index_file.record(row)) + "\n")
                n += 1
    elif variant == "pickle.dump":
        with open(out, "wb") as f:
            n = 0
            for row in rows:
                pickle.dump(index_file.record(row), f)
                n += 1
    else:
        raise SystemExit(f"unknown variant {variant}")
    print(json.dumps({"seconds": time.perf_counter() - t0, "records": n}), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="rows in the database (default 100000)")
    ap.add_argument("--dim", type=int, default=768, help="vector length (default 768, SigLIP 2 base)")
    ap.add_argument("--json", default="bench/results/export.json", help="where to write the results")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        export_variant(args.variant, Path(args.db), Path(args.out))
        return

    work = Path(tempfile.mkdtemp(prefix="sqlindexer-export-"))
    try:
        results = []
        small = max(1, args.rows // 5)
        for rows in (small, args.rows):
            db_path = work / f"db{rows}.sqlite"
            print(f"filling {db_path.name} with {rows} rows of {args.dim}-d vectors ...", flush=True)
            fill(db_path, rows, args.dim)
            variants = ["ours-jsonl", "ours-pkl"] + (["json.dumps", "pickle.dump"] if rows == args.rows else [])
            for variant in variants:
                out = work / f"out-{variant}.bin"
                _, rss, err = child([sys.executable, __file__, "--variant", variant, "--db", str(db_path),
                                     "--out", str(out)])
                info = json.loads(err.strip().splitlines()[-1])
                results.append({"variant": variant, "rows": rows, "seconds": info["seconds"],
                                "records/s": info["records"] / info["seconds"], "peak RSS MB": rss / 2**20,
                                "file MB": out.stat().st_size / 2**20})
                out.unlink()
        by = {(r["variant"], r["rows"]): r for r in results}
        for fmt, base in (("jsonl", "json.dumps"), ("pkl", "pickle.dump")):
            ours = by[(f"ours-{fmt}", args.rows)]
            ours["speed-up"] = by[(base, args.rows)]["seconds"] / ours["seconds"]
        print(f"\n{args.rows} rows of {args.dim}-d vectors, each variant a fresh process\n")
        print(table(results, ["variant", "rows", "seconds", "records/s", "speed-up", "peak RSS MB", "file MB"]))
        save(args.json, {"rows": args.rows, "dim": args.dim, "machine": machine(), "results": results})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
