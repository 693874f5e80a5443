#!/usr/bin/env python3
"""Query latency of search/similar over 10k, 100k and 1M synthetic 768-d vectors.

For each size, fills a working database with that many random L2-normalised float32
vectors (paths in 1000-file folders, a camera model and a date in the EXIF of half of
them), then measures, each step in a fresh process:

  build        the first query: read every vector from SQLite into the cache folder beside
               the database (<db>.vectors-*/), written once per change to the database
  load         a later query: open the cache (np.load mmap_mode="r") and check it is current
  query        one query on the loaded cache: matrix-vector product, np.argpartition top 20,
               paths of the hits (median of --queries random queries)
  filtered     the same with --camera and --after filters (half the rows pass)
  floor        brute force on an in-memory contiguous matrix: M @ q and np.argpartition,
               nothing else (median)
  sqlite scan  what the cache avoids: every query reading the vectors from SQLite row by
               row (one query; skipped above --scan-max rows)
  CLI similar  `image-indexer similar <an indexed path> --top 20` end to end, in a fresh
               process (Python start-up and imports included; no model: the query vector
               is the stored one)
  CLI status   `image-indexer status --json` end to end, in a fresh process

The database and cache files stay in the OS page cache between steps (the machine has
the memory for it), so "load" is a warm load; a first query after a reboot reads the
matrix from disk once. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, cli, machine, save, table  # noqa: E402

MODEL = "bench/siglip2-768"
TOP = 20


def fill(db_path: Path, rows: int, dim: int) -> None:
    import numpy as np

    from sqlindexer import db, runs, state

    conn = db.connect(db_path)
    run = runs.start_run(conn, mode="reindex", model=MODEL, config={}, pid=0)
    rng = np.random.default_rng(0)
    cameras = ["Canon EOS 5D", "NIKON D1X", "Pixel 7"]

    def records():
        for start in range(0, rows, 10_000):
            block = rng.standard_normal((min(10_000, rows - start), dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            for k, v in enumerate(block):
                i = start + k
                exif = {}
                if i % 2:
                    exif = {"Model": cameras[i % 3],
                            "ExifOffset": {"DateTimeOriginal": f"20{10 + i % 14}:06:01 12:00:00"}}
                yield state.Imported(path=f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg", size=3_000_000 + i,
                                     mtime_ns=1_700_000_000_000_000_000 + i, ctime_ns=1_700_000_000_000_000_000,
                                     vector=v.tobytes(), dim=dim, width=4000, height=3000, exif=exif)

    state.import_vectors(conn, records(), run)
    conn.close()


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def measure(step: str, db_path: Path, queries: int) -> dict:
    import numpy as np

    from sqlindexer import db, records, search, vectors

    t0 = time.perf_counter()
    conn = db.open_readonly(db_path)
    model = vectors.choose_model(conn, MODEL, where=str(db_path))
    t_model = time.perf_counter() - t0
    if step == "scan":
        q = np.random.default_rng(1).standard_normal(model.dim).astype(np.float32)
        t0 = time.perf_counter()
        ids, paths, blobs = [], [], []
        for rows in records.iter_search_rows(conn, model.model, model.dim):
            for r in rows:
                ids.append(r[0])
                paths.append(r[1])
                blobs.append(np.frombuffer(r[2], dtype="<f4"))
        s = np.stack(blobs) @ q
        best = np.argpartition(-s, TOP)[:TOP]
        [paths[i] for i in best[np.argsort(-s[best])]]
        return {"scan_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    index = vectors.load_index(conn, db_path, model)
    loaded = time.perf_counter() - t0 + t_model
    if step == "build":
        assert index.origin == "built", index.origin
        return {"build_s": loaded, "cache_mb": sum(f.stat().st_size for f in index.folder.iterdir()) / 2**20}
    assert index.origin == "cache", index.origin
    rng = np.random.default_rng(2)
    qs = rng.standard_normal((queries + 1, model.dim)).astype(np.float32)
    filters = search.Filters.build(cameras=["canon", "nikon", "pixel"], after="2010")
    plain, filtered, floor = [], [], []
    for i, q in enumerate(qs):  # the first of each is a warm-up
        t0 = time.perf_counter()
        hits = search.top_k(index, q, TOP)
        plain.append(time.perf_counter() - t0)
        assert len(hits) == TOP
        t0 = time.perf_counter()
        search.top_k(index, q, TOP, search.select(index, filters))
        filtered.append(time.perf_counter() - t0)
    matrix = np.array(index.vectors)  # in memory, contiguous: the floor
    for q in qs:
        t0 = time.perf_counter()
        s = matrix @ (q / np.linalg.norm(q))
        np.argpartition(-s, TOP)[:TOP]
        floor.append(time.perf_counter() - t0)
    return {"load_ms": loaded * 1000, "query_ms": _ms(plain[1:]), "filtered_ms": _ms(filtered[1:]),
            "floor_ms": _ms(floor[1:]), "query_p90_ms": sorted(plain[1:])[int(0.9 * queries)] * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated row counts (default 10k,100k,1M)")
    ap.add_argument("--dim", type=int, default=768, help="vector length (default 768, SigLIP 2 base)")
    ap.add_argument("--queries", type=int, default=20, help="queries timed per size (default 20)")
    ap.add_argument("--scan-max", type=int, default=100_000, help="largest size to time the SQLite scan on")
    ap.add_argument("--work", help="folder for the databases (default: a temporary folder, removed after)")
    ap.add_argument("--json", default="bench/results/search.json", help="where to write the results")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(measure(args.step, Path(args.db), args.queries)), file=sys.stderr)
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sqlindexer-search-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for rows in (int(s) for s in args.sizes.split(",")):
            db_path = work / f"db{rows}.sqlite"
            t0 = time.perf_counter()
            fill(db_path, rows, args.dim)
            print(f"filled {db_path.name}: {rows} rows of {args.dim}-d vectors in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            row = {"rows": rows, "db MB": db_path.stat().st_size / 2**20}

            def step(name: str) -> dict:
                _, rss, err = child([sys.executable, __file__, "--step", name, "--db", str(db_path),
                                     "--queries", str(args.queries)])
                return {**json.loads(err.strip().splitlines()[-1]), f"{name}_rss_mb": rss / 2**20}

            row.update(step("build"))
            row.update(step("query"))
            if rows <= args.scan_max:
                row.update(step("scan"))
            seconds, _, _ = cli("similar", f"/photos/{(rows // 2) // 1000:04d}/IMG_{rows // 2:07d}.jpg",
                                "--db", db_path, "--top", TOP, "--json")
            row["cli_similar_s"] = seconds
            row["cli_status_s"], _, _ = cli("status", "--db", db_path, "--json")
            results.append(row)
            print(json.dumps(row), flush=True)
            for p in work.glob(f"db{rows}.sqlite*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"\n{args.dim}-d float32 vectors, top {TOP}; each step a fresh process, files in the page cache\n")
        shown = [{"rows": r["rows"], "build s": r["build_s"], "cache MB": r["cache_mb"], "load ms": r["load_ms"],
                  "query ms": r["query_ms"], "filtered ms": r["filtered_ms"], "floor ms": r["floor_ms"],
                  "sqlite scan s": r.get("scan_s"), "CLI similar s": r["cli_similar_s"],
                  "CLI status s": r["cli_status_s"]} for r in results]
        print(table(shown, list(shown[0])))
        save(args.json, {"dim": args.dim, "top": TOP, "queries": args.queries, "machine": machine(),
                         "results": results})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
