"""What this process holds in memory, given back where it is only a cache of files or of
freed heap: the OpenVINO backend's model files once OpenVINO has its own copy of their
weights, and the C heap that a conversion freed. Linux only; elsewhere both do nothing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ELF = b"\x7fELF"


def release_mapped_files(folder: Path) -> int:
    """Drop from this process's memory the pages of the files under folder that are mapped
    read-only and shared (as OpenVINO maps its blobs and IR weights); bytes released. Call
    it only while nothing that maps them runs: a range unmapped and reused between the
    read of /proc/self/maps and the madvise would lose its contents. A page of such a
    mapping that is touched again is read back from its file. Never a writable mapping
    (its pages may hold changes that are in no file), nor a shared library, however it is
    mapped: the loader writes relocations into some of its pages and then makes them
    read-only, and those must not be read back from the file."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes
    import mmap

    prefix = str(folder.resolve()) + os.sep
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split(maxsplit=5)
        # Shared and read-only only: a private mapping may hold pages written before it
        # was made read-only, which are in no file.
        if len(parts) < 6 or parts[1][:2] != "r-" or parts[1][3:4] != "s":
            continue
        path = parts[5].strip()
        if not path.startswith(prefix) or _is_elf(path):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            released += end - start
    return released


def _is_elf(path: str) -> bool:
    """Whether path is an executable or shared library (or cannot be read, so cannot be
    told apart from one)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _ELF
    except OSError:
        return True


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim): a conversion frees
    its trace and graph in the loading thread's heap arena, which glibc would keep."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
