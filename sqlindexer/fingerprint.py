"""A file's content fingerprint: BLAKE3 of all its bytes.

BLAKE3 is a cryptographic hash (a crafted file cannot be made to take another file's
vector) and, one thread, several times faster than hashlib's BLAKE2b and SHA-256
(bench/hashes.py, docs/performance-moves.md): next to decoding a photo it costs nothing.
No SQL here, no Click; runs wherever files are read (the run, a decode worker).
"""

from __future__ import annotations

import os

import blake3

# Whole files up to this size are read into memory once, hashed and decoded from those
# bytes; a larger one (a panorama TIFF, a mislabelled video) is hashed in chunks and
# decoded from disk, so that no worker holds gigabytes at once.
MAX_IN_MEMORY = 256 << 20
CHUNK = 1 << 20


def digest(data: bytes | memoryview) -> bytes:
    """The fingerprint of these bytes (32 bytes)."""
    return blake3.blake3(data).digest()


def read_whole(path: str) -> bytes | None:
    """The file's bytes if it is small enough to hold (MAX_IN_MEMORY), else None.
    Raises OSError as open() does."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_IN_MEMORY:
            return None
        return f.read()


def hash_file(path: str, *, size: int, mtime_ns: int) -> bytes | None:
    """The fingerprint of the file at path, if it still has the size and mtime it was
    scanned with before and after reading it; None if it changed, vanished or cannot be
    read (the decode step meets that file again and says why)."""
    # os.open and os.read, not open(): a re-index may hash thousands of small files, and a
    # buffered file object per file costs more than reading it. Each read asks for what
    # is left and one byte more, so the end of the file is seen without a large buffer.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return None
        h = blake3.blake3()
        left = size
        while chunk := os.read(fd, min(CHUNK, max(left, 0) + 1)):
            h.update(chunk)
            left -= len(chunk)
        st = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) or left != 0:
        return None
    return h.digest()
