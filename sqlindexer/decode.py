"""Feed the model: decode, orient and resize images in worker processes, ahead of the model.

Workers return each image already resized to the size SigLIP 2's naflex processor would
resize it to (same Pillow bilinear resize on the same 8-bit RGB image), so the processor in
the main process only rescales, normalises and patchifies a small image, and never more than
a bounded number of decoded images exist at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from . import fingerprint, images, signals
from .errors import EmbedError

# Pool restarts in a row, with no image decoded between them, before the run stops: workers
# that die at start-up (memory, a broken install) would otherwise be restarted forever.
MAX_RESTARTS = 5

T = TypeVar("T")


@dataclass
class Prepared:
    """A decoded image at model size, as a uint8 HxWx3 array, or the reason it failed."""

    path: str
    pixels: Any = None  # numpy uint8 array (H, W, 3)
    width: int | None = None  # of the upright image as displayed, before resizing
    height: int | None = None
    exif: dict[str, Any] | None = None
    error: str | None = None
    content: bytes | None = None  # fingerprint of the bytes decoded (fingerprint.py)


@dataclass(frozen=True)
class DecodeOptions:
    patch_size: int = 16
    max_num_patches: int = 256
    draft: bool = True
    max_image_pixels: int | None = None
    resize: bool = True


def prepare(path: str, options: DecodeOptions) -> Prepared:
    """Decode path upright, resize it to the model's input size; never raises for a bad file."""
    import numpy as np
    from PIL import Image

    kwargs: dict[str, Any] = dict(patch_size=options.patch_size, max_num_patches=options.max_num_patches,
                                  draft=options.draft)
    if options.max_image_pixels is not None:
        kwargs["max_image_pixels"] = options.max_image_pixels
    # The file is read once: its bytes are hashed and decoded, so the fingerprint stored
    # with the vector is that of exactly what was embedded.
    try:
        data = fingerprint.read_whole(path)
        if data is None:  # too large to hold: hashed in chunks, decoded from disk
            st = os.stat(path)
            content = fingerprint.hash_file(path, size=st.st_size, mtime_ns=st.st_mtime_ns)
        else:
            content = fingerprint.digest(data)
    except FileNotFoundError:
        return Prepared(path, error="file disappeared before it was read")
    except OSError as e:
        return Prepared(path, error=f"cannot be read: {e.strerror or e}")
    d = images.decode(path, data=data, **kwargs)
    if d.image is None:
        return Prepared(path, error=d.error, exif=d.exif)
    im = d.image
    if options.resize:
        th, tw = images.naflex_size(im.height, im.width, patch_size=options.patch_size,
                                    max_num_patches=options.max_num_patches)
        # Exactly the processor's resize: Pillow bilinear on the 8-bit image, no reducing_gap.
        im = im.resize((tw, th), resample=Image.BILINEAR)
    return Prepared(path, np.asarray(im, dtype=np.uint8), d.width, d.height, d.exif, content=content)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _worker_init(parent: int) -> None:
    # The indexer stops its workers on Ctrl-C; they must not each print a KeyboardInterrupt
    # traceback of their own. They start with SIGINT blocked (see _submit).
    signals.ignore_sigint()
    images.register_plugins()
    # A worker must not outlive the indexer (kill -9, the OOM killer).
    signals.die_with_parent(parent)


class Decoder:
    """Ordered, bounded-ahead parallel map of prepare() over work items.

    workers=0 decodes in the calling process (no pool). With workers > 0, at most `ahead`
    items are in flight or waiting to be consumed, so memory stays bounded however large the
    folder is, while the model works on the previous batch.
    """

    def __init__(self, options: DecodeOptions, *, workers: int, ahead: int) -> None:
        self.options = options
        self.workers = workers
        self.ahead = max(1, ahead)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Decoder:
        if self.workers > 0:
            # spawn, not fork: never fork a process that may hold torch's threads. Not
            # forkserver either: its server would be the workers' parent and outlive us.
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_worker_init,
                                             initargs=(os.getpid(),))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            _close(self._pool, kill=False)
            self._pool = None

    def map(self, items: Iterable[T], path_of) -> Iterator[tuple[T, Prepared]]:
        if self._pool is None:
            for item in items:
                yield item, prepare(path_of(item), self.options)
            return
        # (item, future, tries): a worker that dies (the OOM killer, a decoder crash) breaks
        # the whole pool; the pool is rebuilt and the items in flight are tried once more,
        # so one poisonous file fails alone instead of taking the rest of the run with it.
        window: deque[list[Any]] = deque()
        restarts = 0
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(window) < self.ahead:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                window.append([item, self._submit(path_of(item)), 0])
            if not window:
                return
            item, future, _ = window[0]
            if future is None:
                window.popleft()
                yield item, Prepared(path_of(item), error="the decoder process crashed on this file, twice")
                continue
            try:
                result = self._wait(future)
            except BrokenProcessPool:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise EmbedError(f"the decode workers died {restarts} times in a row without decoding an "
                                     f"image (out of memory?); try fewer --workers") from None
                self._restart()
                for entry in window:
                    done = entry[1]
                    if done is None or (done.done() and not done.cancelled() and done.exception() is None):
                        continue
                    if not getattr(done, "never_ran", False):
                        entry[2] += 1
                    entry[1] = self._submit(path_of(entry[0])) if entry[2] < 2 else None
                continue
            except Exception as e:  # noqa: BLE001
                result = Prepared(path_of(item), error=f"decoder process failed: {type(e).__name__}: {e}")
            restarts = 0
            window.popleft()
            yield item, result

    def _submit(self, path: str) -> Future[Prepared]:
        assert self._pool is not None
        try:
            # The pool starts workers inside submit(), on demand: with SIGINT blocked, a
            # Ctrl-C while a worker still imports does not kill it with a traceback.
            # Signals are held back while in the pool's locking code: Python runs a handler
            # between two bytecodes, and ours raise; raised after a lock is taken and
            # before the `with` that releases it is entered (CPython's bpo-29988), the lock
            # stays held, the pool's manager thread blocks on it for good, and the run hangs
            # while closing the pool (found by the kill-point harness in CI).
            with signals.sigint_blocked(), signals.deferred():
                return self._pool.submit(prepare, path, self.options)
        except BrokenProcessPool as e:
            # The pool broke (a worker died) since the last wait: submit() refuses at once.
            # The wait on this future restarts the pool; the file itself never ran.
            refused: Future[Prepared] = Future()
            refused.set_exception(e)
            refused.never_ran = True  # type: ignore[attr-defined]
            return refused

    def _wait(self, future: Future[Prepared]) -> Prepared:
        # ProcessPoolExecutor notices a dead worker by itself most of the time, but a worker
        # killed while it holds the task queue's lock can leave the pool waiting forever:
        # check the workers' pulse while waiting.
        while True:
            try:
                with signals.deferred():  # Ctrl-C waits for at most this half second
                    return future.result(timeout=0.5)
            except TimeoutError:
                if _has_dead_worker(self._pool):
                    raise BrokenProcessPool("a decoder process died") from None

    def _restart(self) -> None:
        if self._pool is not None:
            _close(self._pool, kill=True)
        self._pool = None
        self.__enter__()


def _workers(pool: ProcessPoolExecutor | None) -> list[multiprocessing.Process]:
    return list((getattr(pool, "_processes", None) or {}).values())


def _has_dead_worker(pool: ProcessPoolExecutor | None) -> bool:
    return any(p.exitcode is not None for p in _workers(pool))


def _close(pool: ProcessPoolExecutor, *, kill: bool) -> None:
    """Shut a pool down: let its workers finish and exit, or with kill=True (a broken pool)
    kill them. Either way, never wait forever on a dead worker's half-sent result."""
    # shutdown() lets go of these, so take them first.
    processes = _workers(pool)
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    thread = getattr(pool, "_executor_manager_thread", None)
    if kill:
        for p in processes:
            p.kill()
    with signals.deferred():
        pool.shutdown(wait=False, cancel_futures=True)
    while thread is not None and thread.is_alive():
        # A worker killed while it was sending a result leaves half a message in the result
        # pipe, and the manager thread blocks reading the rest. The pipe reports EOF, which
        # the thread takes as a broken pool and ends, only once every write end is closed:
        # the dead workers' are, this process still holds one. Left open, the thread never
        # ends, and shutdown(wait=True), or Python at exit, waits for it forever (3.11-3.13).
        if kill or any(p.exitcode not in (None, 0) for p in processes):
            for p in processes:
                p.kill()
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.close()
            thread.join(timeout=5)
            return
        thread.join(timeout=0.2)
