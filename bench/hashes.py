#!/usr/bin/env python3
"""The content fingerprint's cost: whole-file hashes of photo-sized buffers, in memory.

Times BLAKE2b-128 and SHA-256 (hashlib), BLAKE3 (the blake3 package, one thread) and
xxh3-128 (the xxhash package) on buffers of 256 KiB, 4 MiB and 32 MiB (a small JPEG, a
phone photo, a raw-sized file), best of --repeat, one thread, and prints GB/s and the
milliseconds one 4 MiB photo costs. Packages that are not installed are skipped.

With --photos DIR it also times, file by file on real photos, what a decode worker does
on a first index: read the bytes, hash them (the chosen BLAKE3), decode and resize them
(decode.prepare, SigLIP 2 base's naflex geometry), and prints the hash's share of the
worker's time: the embedding phase takes at least that time per image, so it bounds the
share of the embedding phase that hashing costs.
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
    ap.add_argument("--photos", help="a folder of photos to time hashing against decoding on")
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
    photos = _photos(Path(args.photos), args.repeat) if args.photos else None
    save(args.json, {"machine": machine(), "rows": rows, "photos": photos})


def _photos(folder: Path, repeat: int) -> dict:
    """Per file: read, BLAKE3 of the bytes, decode.prepare of the same bytes; best of repeat."""
    from sqlindexer import fingerprint, images
    from sqlindexer.decode import DecodeOptions, prepare
    from sqlindexer.scan import Scanner

    images.register_plugins()
    options = DecodeOptions(patch_size=16, max_num_patches=256)
    files = [r.path for r in Scanner([folder])]
    read = hashing = decoding = 0.0
    size = 0
    for path in files:
        best = [float("inf")] * 3
        for _ in range(repeat):
            t0 = time.perf_counter()
            data = Path(path).read_bytes()
            t1 = time.perf_counter()
            fingerprint.digest(data)
            t2 = time.perf_counter()
            prepare(path, options)  # reads, hashes and decodes: the worker's whole job
            t3 = time.perf_counter()
            best = [min(b, t) for b, t in zip(best, (t1 - t0, t2 - t1, t3 - t2))]
        read, hashing, decoding = read + best[0], hashing + best[1], decoding + best[2]
        size += len(data)
    out = {"files": len(files), "bytes": size, "read_s": read, "hash_s": hashing, "prepare_s": decoding,
           "hash_share_of_prepare": hashing / decoding}
    print(f"\n{len(files)} photos, {size / 2**20:.1f} MiB: reading {read * 1e3:.1f} ms, BLAKE3 {hashing * 1e3:.1f} ms, "
          f"a worker's whole prepare() {decoding * 1e3:.0f} ms; the hash is {100 * hashing / decoding:.2f}% of it")
    return out


if __name__ == "__main__":
    main()
