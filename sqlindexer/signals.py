"""Every place the tool handles SIGINT and SIGTERM.

A run stops on either signal: the CLI installs handlers that raise SignalInterrupt (a
KeyboardInterrupt, so that no `except Exception` on the way can swallow it), the run records
itself as interrupted and raises Interrupted, and the CLI exits with 128 + the signal number.
Code that must not be interrupted half-way (the decode pool's locking code) holds signals
back for a moment; the decode workers ignore SIGINT, which reaches the whole process group,
and die with their parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from .errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalInterrupt(KeyboardInterrupt):
    """What the handler raises: a BaseException like KeyboardInterrupt, so that code which
    catches Exception (a decoder turning any error into "this file failed", a model loader
    mapping errors to ModelLoadError) lets it through instead of swallowing the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted(e: KeyboardInterrupt) -> Interrupted:
    """The typed error for a KeyboardInterrupt: ours carries .signum, a plain one is
    Python's own SIGINT."""
    signum = getattr(e, "signum", signal.SIGINT)
    return Interrupted(signum, signal.Signals(signum).name)


@contextlib.contextmanager
def as_interrupts() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise SignalInterrupt in the main thread."""

    def handler(signum: int, frame: Any) -> None:
        raise SignalInterrupt(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some test runners)
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            _restore(sig, old)


@contextlib.contextmanager
def deferred() -> Iterator[list[int]]:
    """Within: SIGINT and SIGTERM are only noted in the list yielded, not handled. On the
    way out the handlers are put back and each signal noted is raised to them once (or to
    the default action). Outside the main thread, where handlers never run, nothing changes."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum: int, frame: object) -> None:
        noted.append(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, note)
        yield noted
    finally:
        for signum, handler in previous.items():
            _restore(signum, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread. The mask survives fork and exec, so a process started
    within starts with SIGINT blocked, until it chooses what to do with it."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_sigint() -> None:
    """For a worker process: Ctrl-C reaches the whole process group, and the parent stops
    its workers; a Ctrl-C that came while the worker started (with SIGINT blocked) is
    pending, and is dropped here, once ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def keep_sigterm() -> contextlib.AbstractContextManager[None]:
    """Within: whatever a library installs for SIGTERM (ray.init does) is undone on the way
    out, so the CLI's handler, which records the run as interrupted, stays in charge."""
    return _kept(signal.SIGTERM)


@contextlib.contextmanager
def _kept(signum: int) -> Iterator[None]:
    handler = signal.getsignal(signum)
    try:
        yield
    finally:
        if handler is not None:  # None: not installed from Python
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signum, handler)


def _restore(signum: int, handler: Any) -> None:
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process the moment its parent dies (Linux), and leave now
    if it is dead already."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:
        os._exit(1)
