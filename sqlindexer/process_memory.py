"""What this process holds in memory, given back where it is only a cache of files or of
freed heap: the OpenVINO backend's model files once OpenVINO has its own copy of their
weights, and the C heap that a conversion freed. Linux only; elsewhere both do nothing."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

_ELF = b"\x7fELF"


def release_mapped_files(folder: Path) -> int:
    """Drop from this process's memory the pages of the files under folder that are mapped
    read-only (OpenVINO maps its blobs and IR weights); bytes released. A page of such a
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
        if len(parts) < 6 or "w" in parts[1]:
            continue
        path = parts[5].strip()
        if not path.startswith(prefix) or _is_elf(path):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            released += end - start
    return released


@contextlib.contextmanager
def releasing(folder: Path, *, every: float = 0.02) -> Iterator[None]:
    """release_mapped_files(folder) every `every` seconds while the block runs, and once
    at its end. OpenVINO reads the weights of its mapped blob (or IR) once, while it
    compiles and repacks them into its own memory; pages it is done with are let go as it
    goes, instead of all of them being resident at once next to the repacked copy. A page
    dropped before OpenVINO is done with it is read back from the file (page cache)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            release_mapped_files(folder)

    thread = threading.Thread(target=loop, name="release-mapped-files", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release_mapped_files(folder)


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
