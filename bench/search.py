#!/usr/bin/env python3
"""search, similar and duplicates over 100k and 1M synthetic 768-d vectors: the
approximate index (sqlindexer/ann.py) against exhaustive search.

For each size, fills a working database with that many vectors of _synthetic.py
(--kind clustered, hierarchical or random, 1 in 200 rows a planted near-copy of another at cosine ~0.97;
a camera model and a date in the EXIF of half of them), then measures, each step in a
fresh process:

  build        the first query: the vector cache read from SQLite (cache s) and the
               approximate index built from it (index s)
  query        in one process, cache and index loaded: --queries text-like queries (new
               points of the distribution) and as many `similar` queries (indexed rows),
               top 20, through the approximate index and exhaustively: median ms of each,
               and recall@20 (share of the exhaustive top 20 the approximate one returns);
               the same for text-like queries with a --camera filter that passes half
               the rows
  duplicates   `image-indexer duplicates --threshold 0.95 --json` end to end, in a fresh
               process, Python start-up included, index already built: seconds, and the
               share of the planted pairs that end up in one group (--exhaustive too, up
               to --exhaustive-max rows)
  update       1% of the rows changed as a --reindex changes them (half re-embedded, a
               quarter deleted, a quarter new files), then the first query's cache
               update and index update, against the build's

--crossover SIZES measures instead, in memory, where exhaustive search stops being fast
enough (what chose ann.EXACT_BELOW and duplicates.DUPLICATES_EXACT_BELOW).

Prints a table and writes JSON. The machine it ran on is shared: compare the ratios side
by side, not the absolute figures with another run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402
from _common import child, machine, save, table  # noqa: E402

MODEL = "bench/siglip2-768"
TOP = 20
THRESHOLD = 0.95
CAMERAS = ["Canon EOS 5D", "NIKON D1X", "Pixel 7"]


def path_of(i: int) -> str:
    return f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg"


def fill(db_path: Path, rows: int, dim: int, kind: str) -> list[list[int]]:
    """The database, and the planted (original, copy) row pairs."""
    import numpy as np

    from sqlindexer import db, runs, state

    conn = db.connect(db_path)
    run = runs.start_run(conn, mode="reindex", model=MODEL, config={}, pid=0)
    x, pairs = _synthetic.vectors(rows, dim, kind, pairs=rows // 200)

    def records():
        for i in range(rows):
            exif = {}
            if i % 2:
                exif = {"Model": CAMERAS[i % 3], "ExifOffset": {"DateTimeOriginal": f"20{10 + i % 14}:06:01 12:00:00"}}
            yield state.Imported(path=path_of(i), size=3_000_000 + i, mtime_ns=1_700_000_000_000_000_000 + i,
                                 ctime_ns=1_700_000_000_000_000_000, vector=x[i].astype("<f4").tobytes(), dim=dim,
                                 width=4000, height=3000, exif=exif)

    state.import_vectors(conn, records(), run)
    conn.close()
    return np.asarray(pairs).tolist()


def change(db_path: Path, rows: int, dim: int, share: float) -> int:
    """Change `share` of the rows as a re-index would: re-embedded, deleted, added."""
    import numpy as np

    rng = np.random.default_rng(5)
    k = max(4, int(rows * share))
    picked = rng.choice(rows, size=k, replace=False)
    conn = sqlite3.connect(db_path)
    with conn:
        for i in picked[: k // 2]:
            v = rng.standard_normal(dim).astype("<f4")
            conn.execute("UPDATE files SET embedding = ?, mtime_ns = mtime_ns + 1 WHERE path = ?",
                         ((v / np.linalg.norm(v)).tobytes(), path_of(int(i))))
        conn.executemany("DELETE FROM files WHERE path = ?", [(path_of(int(i)),) for i in picked[k // 2 : 3 * k // 4]])
        for j in range(k - 3 * k // 4):
            v = rng.standard_normal(dim).astype("<f4")
            conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding) "
                         "VALUES (?, 1, 1, 1, 'ok', ?, ?, ?)",
                         (f"/photos/new/IMG_{j:07d}.jpg", MODEL, dim, (v / np.linalg.norm(v)).tobytes()))
    conn.close()
    return k


def cpu() -> dict:
    """The CPU's model name and the vector-instruction flags the figures depend on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"model": model, "flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))}


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def measure(step: str, db_path: Path, queries: int, kind: str, rows: int) -> dict:
    import numpy as np

    from sqlindexer import ann, db, search, vectors

    conn = db.open_readonly(db_path)
    model = vectors.choose_model(conn, MODEL, where=str(db_path))
    t0 = time.perf_counter()
    index = vectors.load_index(conn, db_path, model)
    t1 = time.perf_counter()
    approx = ann.load_ann(conn, index)
    t2 = time.perf_counter()
    if step in ("build", "update"):
        return {f"{step}_cache_s": t1 - t0, f"{step}_index_s": t2 - t1, f"{step}_origin": [index.origin, approx.origin],
                "index_mb": sum(f.stat().st_size for f in ann.ann_folder(index).iterdir()) / 2**20,
                "cache_mb": sum(f.stat().st_size for f in index.folder.iterdir()) / 2**20}
    assert index.origin == "cache" and approx.origin == "cache", (index.origin, approx.origin)
    out = {"load_ms": (t2 - t0) * 1000}
    texts = _synthetic.queries(queries + 1, model.dim, kind, rows, query_seed=3)
    rng = np.random.default_rng(4)
    images = [int(r) for r in rng.choice(len(index), size=queries + 1, replace=False)]
    cameras = search.Filters.build(cameras=["canon", "nikon"])  # two thirds of the half with EXIF
    cases = {"text": [(q, None, search.Filters()) for q in texts],
             "similar": [(np.array(index.vectors[r]), r, search.Filters()) for r in images],
             "filtered": [(q, None, cameras) for q in texts]}
    for name, cases_of in cases.items():
        # The approximate queries one after another, then the exhaustive ones: an
        # exhaustive query between two approximate ones leaves the BLAS threads spinning
        # on the 2 cores and its pages in the caches, which a query process does not have.
        answers, seconds = {}, {}
        for how, ann_index in (("ann", approx), ("exact", None)):
            answers[how], seconds[how] = [], []
            for q, pin, filters in cases_of:  # the first of each is a warm-up
                t0 = time.perf_counter()
                answers[how].append(search._rank(index, q, TOP, filters, pin=pin, ann=ann_index))
                seconds[how].append(time.perf_counter() - t0)
        assert all(a.approximate for a in answers["ann"]) and not any(e.approximate for e in answers["exact"])
        found = sum(len({h.path for h in a.hits} & {h.path for h in e.hits})
                    for a, e in zip(answers["ann"], answers["exact"]))
        out.update({f"{name}_ms": _ms(seconds["ann"][1:]), f"{name}_exact_ms": _ms(seconds["exact"][1:]),
                    f"{name}_recall": found / (TOP * len(cases_of))})
    return out


def duplicates_found(stdout: str, pairs: list[list[int]]) -> float:
    group_of = {}
    for line in stdout.splitlines():
        g = json.loads(line)
        for image in g["images"]:
            group_of[image["path"]] = g["group"]
    hit = sum(1 for a, b in pairs if group_of.get(path_of(a)) is not None
              and group_of.get(path_of(a)) == group_of.get(path_of(b)))
    return hit / max(1, len(pairs))


def run_duplicates(db_path: Path, pairs, *extra) -> tuple[float, float, int]:
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sqlindexer", "duplicates", "--db", str(db_path), "--threshold",
                           str(THRESHOLD), "--json", *extra], env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    return seconds, duplicates_found(done.stdout, pairs), len(done.stdout.splitlines())


@contextlib.contextmanager
def locked(path: str | None):
    """Hold an exclusive flock of path (when given) for one step: a machine shared with
    other work is measured one step at a time, and released between steps."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def filled(rows: int, args, work: Path) -> tuple[Path, list[list[int]]]:
    """A working copy of the filled database of this size and kind; the filled one is kept
    in work (with its planted pairs) and reused by later runs."""
    pristine = work / f"{args.kind}-{args.dim}-{rows}.sqlite"
    pairs_file = pristine.with_suffix(".pairs.json")
    if not (pristine.exists() and pairs_file.exists()):
        tmp = pristine.with_suffix(".filling")
        for p in work.glob(tmp.name + "*"):
            p.unlink()
        t0 = time.perf_counter()
        with locked(args.lock):
            pairs = fill(tmp, rows, args.dim, args.kind)
        for suffix in ("-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        tmp.rename(pristine)
        pairs_file.write_text(json.dumps(pairs))
        print(f"filled {pristine.name}: {rows} rows of {args.dim}-d {args.kind} vectors in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    db_path = work / f"run-{args.kind}-{rows}.sqlite"
    _remove_run(db_path)
    shutil.copyfile(pristine, db_path)
    return db_path, json.loads(pairs_file.read_text())


def _remove_run(db_path: Path) -> None:
    for p in db_path.parent.glob(f"{db_path.name}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def one_size(rows: int, args, work: Path) -> dict:
    db_path, pairs = filled(rows, args, work)
    row = {"rows": rows, "kind": args.kind, "planted": len(pairs), "db MB": db_path.stat().st_size / 2**20}

    def step(name: str) -> dict:
        with locked(args.lock):
            _, rss, err = child([sys.executable, __file__, "--step", name, "--db", str(db_path), "--queries",
                                 str(args.queries), "--kind", args.kind, "--rows", str(rows)],
                                env=dict(os.environ, SQLINDEXER_EXACT_BELOW="0"))
        return {**json.loads(err.strip().splitlines()[-1]), f"{name}_rss_mb": rss / 2**20}

    row.update(step("build"))
    row.update(step("query"))
    with locked(args.lock):
        row["dup_s"], row["dup_found"], row["dup_groups"] = run_duplicates(db_path, pairs)
    if rows <= args.exhaustive_max:
        with locked(args.lock):
            row["dup_exhaustive_s"], row["dup_exhaustive_found"], _ = run_duplicates(db_path, pairs, "--exhaustive")
    row["changed"] = change(db_path, rows, args.dim, 0.01)
    row.update(step("update"))
    row["update_share"] = (row["update_cache_s"] + row["update_index_s"]) / (row["build_cache_s"] + row["build_index_s"])
    print(json.dumps(row), flush=True)
    _remove_run(db_path)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated row counts (default 100k,1M)")
    ap.add_argument("--kind", default="clustered", choices=["clustered", "hierarchical", "random"], help="distribution (default clustered)")
    ap.add_argument("--dim", type=int, default=768, help="vector length (default 768, SigLIP 2 base)")
    ap.add_argument("--queries", type=int, default=50, help="queries of each kind per size (default 50)")
    ap.add_argument("--exhaustive-max", type=int, default=0, help="largest size to time duplicates --exhaustive on")
    ap.add_argument("--work", help="folder for the databases, the filled ones kept and reused "
                                   "(default: a temporary folder, removed after)")
    ap.add_argument("--json", default="bench/results/search.json", help="where to write the results")
    ap.add_argument("--lock", metavar="FILE",
                    help="hold an exclusive flock of FILE during each timed step (a shared machine)")
    ap.add_argument("--crossover", metavar="SIZES",
                    help="instead: exhaustive against approximate in memory at these sizes (e.g. 5000,20000,50000)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(measure(args.step, Path(args.db), args.queries, args.kind, args.rows)), file=sys.stderr)
        return
    if args.crossover:
        rows = crossover([int(s) for s in args.crossover.split(",")], args.dim, args.kind, args.queries)
        print(table(rows, list(rows[0])))
        save(args.json, {"dim": args.dim, "top": TOP, "kind": args.kind, "machine": {**machine(), "cpu": cpu()}, "crossover": rows})
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sqlindexer-search-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = [one_size(int(s), args, work) for s in args.sizes.split(",")]
        print(f"\n{args.dim}-d {args.kind} vectors, top {TOP}, duplicates at cosine >= {THRESHOLD}\n")
        shown = [{"rows": r["rows"], "cache s": r["build_cache_s"], "index s": r["build_index_s"],
                  "index MB": r["index_mb"], "text ms": r["text_ms"], "exact ms": r["text_exact_ms"],
                  "text R@20": r["text_recall"], "similar ms": r["similar_ms"], "similar R@20": r["similar_recall"],
                  "filtered ms": r["filtered_ms"], "filtered R@20": r["filtered_recall"], "dup s": r["dup_s"],
                  "dup found": r["dup_found"], "dup exh. s": r.get("dup_exhaustive_s"),
                  "update s": r["update_cache_s"] + r["update_index_s"], "update share": r["update_share"],
                  "query RSS MB": r["query_rss_mb"]} for r in results]
        print(table(shown, list(shown[0])))
        save(args.json, {"dim": args.dim, "top": TOP, "kind": args.kind, "queries": args.queries,
                         "machine": {**machine(), "cpu": cpu()}, "results": results})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)



def crossover(sizes: list[int], dim: int, kind: str, queries: int) -> list[dict]:
    """Where exhaustive search stops being fast enough: per size, in memory (no database),
    one exhaustive query and one approximate query (median ms, recall@20), the index's
    build, and duplicates exhaustively and from the cells (seconds, without start-up)."""
    import numpy as np

    from sqlindexer import ann_build, duplicates, search, vectors
    from sqlindexer.progress import no_progress

    out = []
    for n in sizes:
        x, _ = _synthetic.vectors(n, dim, kind, pairs=n // 200)
        blob = b"".join(path_of(i).encode() for i in range(n))
        offsets = np.concatenate([[0], np.cumsum([len(path_of(i)) for i in range(n)])]).astype(np.int64)
        index = vectors.VectorIndex("m", dim, x, np.arange(n, dtype=np.int64), np.zeros(n, np.int64),
                                    np.full(n, -1, np.int32), [], vectors.PathTable(np.frombuffer(blob, np.uint8),
                                                                                    offsets), origin="memory")
        index.rows_of(np.empty(0, np.int64))  # the id lookup the index is built with
        t0 = time.perf_counter()
        approx = ann_build.build(index, no_progress)
        build_s = time.perf_counter() - t0
        qs = _synthetic.queries(queries + 1, dim, kind, n, query_seed=3)
        t_exact, t_ann, found = [], [], 0
        for q in qs:
            t0 = time.perf_counter()
            e = search._rank(index, q, TOP, search.Filters())
            t_exact.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            a = search._rank(index, q, TOP, search.Filters(), ann=approx)
            t_ann.append(time.perf_counter() - t0)
            found += len({h.path for h in a.hits} & {h.path for h in e.hits})
        t0 = time.perf_counter()
        every = duplicates.duplicate_groups(index, THRESHOLD)
        dup_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        cells = duplicates.cell_duplicate_groups(index, approx.cells_by_row(index), THRESHOLD)
        dup_cells = time.perf_counter() - t0
        out.append({"rows": n, "exact ms": _ms(t_exact[1:]), "approx ms": _ms(t_ann[1:]),
                    "R@20": found / (TOP * len(qs)), "index build s": build_s, "dup exhaustive s": dup_exact,
                    "dup cells s": dup_cells, "same groups": [g.members for g in every] == [g.members for g in cells]})
        print(json.dumps(out[-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
