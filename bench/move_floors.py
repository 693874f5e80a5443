#!/usr/bin/env python3
"""The least work that the 10%-moved and 10%-copied re-indexes of bench/rescan.py must do
beyond a no-change one, set beside what their targets allow.

Needs the folder that `bench/rescan.py --cases moves --workdir DIR` leaves (its tree,
index.jsonl, index.sqlite and model). Each floor is the bare operation, done by a few
lines of Python and SQLite on copies, with none of the package's code:

  rewrite       the index file written anew from the old one, split where the 10% of its
                lines (every tenth) are replaced by lines of the same length, fsynced and
                renamed: what a jsonl export in path order must at least do when records
                leave their place (moved) or arrive between others (copied)
  move rows     the 10% of the rows, every tenth by path, given a new path (and the new
                ctime, run and stamp a move records): one UPDATE per row by id, commit,
                close (the WAL checkpoint); on a copy of the working database with its
                triggers dropped, its indexes kept; the UPDATEs alone are also shown
  move rows, without files_scan
                the same with the scan's covering index dropped as well
  move paths    the same UPDATEs of the path alone, on a table of (id, path UNIQUE) and
                nothing else: the least a table keyed by path must write
  insert rows   as many rows inserted, each a copy of one of those rows (vector, EXIF,
                fingerprint) under a new path, commit, close; triggers dropped
  insert paths  as many new paths inserted into the table of (id, path UNIQUE)
  read          reading the copies once, a fresh process (the copied target's allowance)
  no change     image-indexer --reindex with nothing changed, a fresh process

The connections are set up as the package's (WAL, synchronous NORMAL, foreign keys, temp
store in memory). Rounds alternate the operations; prints the median of each, and the least
ratios each round allows: 1 + (rewrite + move rows) / no change for moved (target 1.5), and
(no change + read + rewrite + insert rows) / (no change + read) for copied (target 1). These
add operations that ran one after another; a run that overlapped them on two cores could
come in a little under.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, cli, machine, save, table  # noqa: E402
from rescan import READ  # noqa: E402

_TRIGGERS = "SELECT name FROM sqlite_master WHERE type = 'trigger'"


def line_starts(path: Path) -> list[int]:
    starts, pos = [0], 0
    with open(path, "rb") as f:
        for line in f:
            pos += len(line)
            starts.append(pos)
    return starts


def rewrite(old: Path, starts: list[int], every: int, scratch: Path) -> float:
    """Copy old into a new file in the blocks between every `every`-th line, that line
    written on its own (as a record serialised afresh would be); fsync, rename."""
    new = scratch / "rewritten.jsonl"
    t = time.perf_counter()
    with open(old, "rb") as src, open(new.with_suffix(".tmp"), "wb", buffering=1 << 20) as dst:
        for i in range(0, len(starts) - 1, every):
            dst.write(src.read(starts[i + 1] - starts[i]))  # the replaced line
            end = starts[min(i + every, len(starts) - 1)]
            dst.write(src.read(end - starts[i + 1]))  # the block of lines kept
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(new.with_suffix(".tmp"), new)
    seconds = time.perf_counter() - t
    new.unlink()
    return seconds


def snapshot(db: Path, scratch: Path, name: str) -> Path:
    """A copy of the database by SQLite's backup (the WAL included), triggers dropped."""
    out = scratch / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{out}{suffix}").unlink(missing_ok=True)
    src, dst = sqlite3.connect(db), sqlite3.connect(out)
    src.backup(dst)
    src.close()
    for (trigger,) in dst.execute(_TRIGGERS).fetchall():
        dst.execute(f'DROP TRIGGER "{trigger}"')
    dst.commit()
    dst.close()
    return out


def plain_copy(src: Path, dst: Path) -> Path:
    """A copy of a database that no connection has open (rollback journal: one file)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def timed_writes(db: Path, sql: str, params: list[tuple]) -> tuple[float, float]:
    """(seconds of the statements, seconds with the commit and the close's checkpoint), on
    a connection set up as the package's run sets its own."""
    conn = sqlite3.connect(db, isolation_level=None)
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON", "temp_store = MEMORY"):
        conn.execute(f"PRAGMA {pragma}")
    t = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(sql, params)
    statements = time.perf_counter() - t
    conn.execute("COMMIT")
    conn.close()
    return statements, time.perf_counter() - t


MOVE = "UPDATE files SET path = ?, ctime_ns = ?, build = ?, changed_run = ?, stamp = ? WHERE id = ?"
COLUMNS = ("size, mtime_ns, ctime_ns, status, width, height, model, dim, build, changed_run, exif, embedding, "
           "stamp, content, dev, ino")


def one_round(work: Path, base: list, scratch: Path, plan: dict, got: dict[str, list[float]]) -> None:
    db, index = work / "index.sqlite", work / "index.jsonl"
    got["no change"].append(cli(*base)[0])
    got["read"].append(child([sys.executable, "-c", READ, str(plan["read_list"])])[0])
    got["rewrite"].append(rewrite(index, plan["starts"], plan["every"], scratch))
    statements, total = timed_writes(snapshot(db, scratch, "rows.sqlite"), MOVE, plan["moves"])
    got["move rows"].append(total)
    got["  of which the UPDATEs"].append(statements)
    copy = snapshot(db, scratch, "rows.sqlite")
    with sqlite3.connect(copy) as conn:
        conn.execute("DROP INDEX files_scan")
    conn.close()
    got["move rows, without files_scan"].append(timed_writes(copy, MOVE, plan["moves"])[1])
    got["insert rows"].append(timed_writes(
        snapshot(db, scratch, "rows.sqlite"),
        f"INSERT INTO files (path, {COLUMNS}) SELECT ?, {COLUMNS} FROM files WHERE id = ?", plan["copies"])[1])
    paths_copy = plain_copy(plan["paths_db"], scratch / "paths-copy.sqlite")
    got["move paths"].append(timed_writes(paths_copy, "UPDATE p SET path = ? WHERE id = ?",
                                          [(m[0], m[-1]) for m in plan["moves"]])[1])
    got["insert paths"].append(timed_writes(plain_copy(plan["paths_db"], paths_copy),
                                            "INSERT INTO p (path) VALUES (?)", [(c[0],) for c in plan["copies"]])[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="the folder bench/rescan.py --workdir left")
    ap.add_argument("--moved", type=float, default=0.10, help="fraction moved or copied (default 0.10)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--json", default="bench/results/move_floors.json", help="where to write the results")
    args = ap.parse_args()
    work = Path(args.workdir)
    tree, index, db = work / "tree", work / "index.jsonl", work / "index.sqlite"
    if not (index.is_file() and db.is_file() and (work / "model").is_dir()):
        sys.exit(f"error: {work} is not a folder that bench/rescan.py --workdir left")
    base = ["-i", tree, "-o", index, "--model-name", work / "model", "--reindex", "--log-level", "WARNING"]
    cli(*base)  # the database and the index file as the tree is, before either is read

    every = round(1 / args.moved)
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    rows = conn.execute("SELECT id, path FROM files WHERE status = 'ok' ORDER BY path").fetchall()
    conn.close()
    chosen = rows[::every]
    plan = {"every": every, "starts": line_starts(index),
            "moves": [(str(tree / "moved-floor" / f"{Path(p).parent.name}-{Path(p).name}"), 1, 1, 1, 1, i)
                      for i, p in chosen],
            "copies": [(str(tree / "copied-floor" / f"{Path(p).parent.name}-{Path(p).name}"), i) for i, p in chosen]}
    names = ("no change", "read", "rewrite", "move rows", "  of which the UPDATEs", "move rows, without files_scan",
             "move paths", "insert rows", "insert paths")
    got: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="sqlindexer-floors-", dir=work) as scratch_name:
        scratch = Path(scratch_name)
        plan["paths_db"] = scratch / "paths.sqlite"
        with sqlite3.connect(plan["paths_db"]) as pc:
            pc.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE)")
            pc.executemany("INSERT INTO p VALUES (?, ?)", rows)
        pc.close()
        # The chosen files themselves: of the copies' sizes, read as the copies would be.
        plan["read_list"] = scratch / "copies.txt"
        plan["read_list"].write_text("\n".join(p for _, p in chosen))
        for _ in range(args.repeat):
            one_round(work, base, scratch, plan, got)
    _report(args, len(rows), len(chosen), got)


def _report(args: argparse.Namespace, n_rows: int, n_chosen: int, got: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in got.items()}
    # The least ratios within each round, as the bench's targets are read: runs side by side.
    per_round = {
        "moved": [1 + (rw + mv) / nc for nc, rw, mv in zip(got["no change"], got["rewrite"], got["move rows"])],
        "copied": [(nc + rd + rw + ins) / (nc + rd) for nc, rd, rw, ins in
                   zip(got["no change"], got["read"], got["rewrite"], got["insert rows"])],
    }
    out = [{"what": k, "median s": med[k], "rounds": ", ".join(f"{x:.3f}" for x in v)} for k, v in got.items()]
    print(f"\n{n_rows} rows, {n_chosen} moved or copied, {args.repeat} rounds\n")
    print(table(out, ["what", "median s", "rounds"]))
    print(f"\nmoved: the target allows 0.5 x no change ({0.5 * med['no change']:.3f} s) over no change; "
          f"rewrite + move rows = {med['rewrite'] + med['move rows']:.3f} s; with the paths in a table of their "
          f"own {med['rewrite'] + med['move paths']:.3f} s")
    print(f"copied: the target allows the read ({med['read']:.3f} s) over no change; read + rewrite + insert rows "
          f"= {med['read'] + med['rewrite'] + med['insert rows']:.3f} s; with the paths in a table of their own "
          f"{med['read'] + med['rewrite'] + med['insert paths']:.3f} s")
    for case, target in (("moved", 1.5), ("copied", 1)):
        ratios = per_round[case]
        print(f"least {case} ratio per round: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f}; target <= {target})")
    save(args.json, {"rows": n_rows, "moved": n_chosen, "machine": machine(), "rounds": got, "median": med,
                     "least_ratios_per_round": per_round})


if __name__ == "__main__":
    main()
