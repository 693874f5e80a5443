#!/usr/bin/env python3
"""The content fingerprint's cost: whole-file hashes of photo-sized buffers, in memory.

Times BLAKE2b-128 and SHA-256 (hashlib), BLAKE3 (the blake3 package, one thread) and
xxh3-128 (the xxhash package) on buffers of 256 KiB, 4 MiB and 32 MiB (a small JPEG, a
phone photo, a raw-sized file), best of --repeat, one thread, and prints GB/s and the
milliseconds one 4 MiB photo costs. Packages that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402


def candidates() -> dict:
    found = {
        "blake2b-128 (hashlib)": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
        "sha256 (hashlib)": lambda b: hashlib.sha256(b).digest(),
    }
    try:
        import blake3

        found["blake3 (blake3, 1 thread)"] = lambda b: blake3.blake3(b).digest(16)
    except ImportError:
        pass
    try:
        import xxhash

        found["xxh3-128 (xxhash)"] = lambda b: xxhash.xxh3_128_digest(b)
    except ImportError:
        pass
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="bench/results/hashes.json")
    args = ap.parse_args()
    sizes = {"256 KiB": 256 << 10, "4 MiB": 4 << 20, "32 MiB": 32 << 20}
    buffers = {name: os.urandom(n) for name, n in sizes.items()}
    rows = []
    for label, fn in candidates().items():
        row = {"hash": label}
        for name, buf in buffers.items():
            loops = max(1, (64 << 20) // len(buf))
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for _ in range(loops):
                    fn(buf)
                best = min(best, (time.perf_counter() - t0) / loops)
            row[f"GB/s {name}"] = len(buf) / best / 1e9
            if name == "4 MiB":
                row["ms per 4 MiB photo"] = best * 1e3
        rows.append(row)
    columns = ["hash", *(f"GB/s {n}" for n in sizes), "ms per 4 MiB photo"]
    print(table(rows, columns))
    save(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
