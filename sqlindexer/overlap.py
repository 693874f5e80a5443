"""The rest of a run (embedding, export) in a child process forked at its start, so that
the model loads while the scan is still going.

Importing torch and transformers and loading the weights take seconds (about 5 on a
2-core laptop, most of it imports); the scan of a large tree takes about one. Both are a
core's worth of Python: in a thread, the import would share the GIL with the scan and the
two would still add up. So a run forks before it opens its database, and the child waits.
When the scan meets the first file to embed, the child starts importing and loading, on
another core; once the scan is committed, the child embeds the pending files and writes
the index, while the parent waits for it. A run with nothing to embed dismisses the child,
which never imported anything.

The parent keeps the user's side of the run: the child's log records and progress come
to it through a pipe and go out through its own handlers and bars, and how the child's
part ended (done, an error, the signal that stopped it) comes back the same way and is
raised in the parent, which records the run's end. A signal the parent receives is passed
on to the child. The child opens its own database connection (the parent opens its own
after the fork: an SQLite connection must not cross one) and leaves with os._exit, so none
of the parent's cleanup (its connection, the run's row, the lock) runs twice. If the parent
dies, the child leaves at once, whatever it is doing (downloading the model, embedding): a
pipe that the parent never writes to reaches its end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

from . import errors
from .errors import IndexerError, Interrupted, ProcessDiedError

log = logging.getLogger(__name__)

Tick = Callable[[int], None]
Progress = Callable[[str, "int | None"], ContextManager[Tick]]
Prepare = Callable[[], Any]
# work(payload, prepared, progress): `prepared()` returns what prepare returned, or raises
# what it raised, at the point where the work needs it.
Work = Callable[[Any, Callable[[], Any], Progress], None]

# After passing a signal on, how long the child gets to stop (roll back, close its decode
# workers) before it is killed.
STOP_GRACE = 20.0
# The child sends progress at most this often: export ticks once per record.
_TICK_EVERY = 0.1
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def available() -> bool:
    """Whether this process may fork: a POSIX system, and no thread besides this one (a
    child gets a copy of every lock, held or not, but only the forking thread). Threads
    that Python does not know of count too: torch's OpenMP pool, once torch has run (a
    program that embeds us may have), does not survive a fork."""
    if not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # no /proc (macOS): Python's own count is what there is
        return True


class ChildProcessFailed(Exception):
    """An unexpected error in the child (a bug); the message is its traceback there."""


class _Stop(KeyboardInterrupt):
    """A signal in the child, raised once: like the CLI's, a BaseException that no
    `except Exception` on the way swallows."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Helper:
    """The parent's handle on the child: prepare() when there will be work, run() to hand
    it the work and wait, close() to dismiss it (always, at the end)."""

    def __init__(self, pid: int, commands: int, results: int, alive: int) -> None:
        self.pid = pid
        self._commands: int | None = commands  # parent -> child
        self._results: int | None = results  # child -> parent
        self._alive: int | None = alive  # never written: closed when the parent ends
        self._prepared = False
        self._reaped = False

    @classmethod
    def fork(cls, prepare: Prepare, work: Work) -> Helper | None:
        """Fork the child, which waits for prepare() or run(); None where fork is not
        available (the caller then does the work itself)."""
        if not available():
            return None
        pipes: list[int] = []
        try:
            for _ in range(3):
                pipes += os.pipe()
        except OSError as e:  # out of file descriptors
            for fd in pipes:
                os.close(fd)
            log.debug("cannot make pipes (%s): the model loads after the scan", e)
            return None
        commands_r, commands_w, results_r, results_w, alive_r, alive_w = pipes
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # or the child would write what is buffered a second time
        # Blocked across the fork: a signal between fork() and the child's own handlers
        # would run the parent's handler in the child and unwind the parent's frames there.
        blocked = _block(_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            _unblock(blocked)
            for fd in pipes:
                os.close(fd)
            log.debug("cannot fork (%s): the model loads after the scan", e)
            return None
        if pid == 0:  # the child: never returns
            code = 1
            try:
                try:
                    for fd in (commands_w, results_r, alive_w):
                        os.close(fd)
                    code = _Child(commands_r, results_w, alive_r).main(prepare, work, blocked)
                finally:
                    os._exit(code)
            finally:
                os._exit(1)
        _unblock(blocked)
        for fd in (commands_r, results_w, alive_r):
            os.close(fd)
        return cls(pid, commands_w, results_r, alive_w)

    def prepare(self) -> None:
        """Start loading the model now (idempotent); run() also does."""
        if not self._prepared:
            self._prepared = True
            self._send(("prepare",))

    def run(self, payload: Any, progress: Progress) -> None:
        """Hand the child its work and wait for it, relaying its logs and progress. Raises
        what stopped it; a signal received meanwhile is passed on to the child, and raised
        here once the child has stopped."""
        self._prepared = True

        def pass_on(signum: int, noted: list[int]) -> None:
            # The first is passed on (the child stops as it would alone); a second, like a
            # second Ctrl-C, kills it.
            if not self._reaped:  # a reaped child's pid may be another process's by now
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signum if not noted else signal.SIGKILL)

        try:
            # The signals are raised to the caller's handlers once the child has ended.
            with signals_noted(pass_on) as noted:
                # Sent once the signals are passed on: a signal before this point stops the
                # run before the child has done anything.
                self._send(("go", payload))
                ended, outcome = self._relay(progress, noted)
                status = self._reap()
        finally:
            self.close()
        if not ended:
            raise ProcessDiedError(f"the process that embeds and exports for this run {_how_it_ended(status)}; "
                                   "committed work is kept, run the same command to resume")
        if outcome is not None:
            _raise(outcome)

    def close(self) -> None:
        """Dismiss the child: an idle one leaves when its command pipe closes; one that is
        loading the model has written nothing yet, and is killed rather than waited for."""
        if self._commands is not None:
            os.close(self._commands)
            self._commands = None
            if self._prepared and not self._reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if not self._reaped:
            self._reap()
        for name in ("_results", "_alive"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    # -- parent side ---------------------------------------------------------------------
    def _send(self, message: Any) -> None:
        if self._commands is None:
            return
        try:
            _write_frame(self._commands, message)
        except BrokenPipeError:  # the child is gone: run() reads how it ended
            pass

    def _reap(self) -> int:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped by someone else (a SIGCHLD handler)
            status = 0
        self._reaped = True
        return status

    def _relay(self, progress: Progress, noted: list[int]) -> tuple[bool, Any]:
        """Read the child's messages until it closes its end; (whether it said how it
        ended, and how)."""
        assert self._results is not None
        bars: list[tuple[ContextManager[Tick], Tick]] = []
        buffer = bytearray()
        ended, outcome = False, None
        deadline: float | None = None
        try:
            while True:
                if noted and deadline is None:
                    deadline = time.monotonic() + STOP_GRACE
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("the embedding process did not stop within %.0f s of the signal; killing it",
                                STOP_GRACE)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    deadline = float("inf")
                ready, _, _ = select.select([self._results], [], [], 0.5)
                if not ready:
                    continue
                data = os.read(self._results, 1 << 16)
                if not data:
                    return ended, outcome
                buffer += data
                for message in _frames(buffer):
                    kind = message[0]
                    if kind == "log":
                        record = message[1]
                        logging.getLogger(record.name).handle(record)
                    elif kind == "open":
                        bar = progress(message[1], message[2])
                        bars.append((bar, bar.__enter__()))
                    elif kind == "tick" and bars:
                        bars[-1][1](message[1])
                    elif kind == "close" and bars:
                        bars.pop()[0].__exit__(None, None, None)
                    elif kind == "end":
                        ended, outcome = True, message[1]
        finally:
            while bars:
                bars.pop()[0].__exit__(None, None, None)


# -- child side ------------------------------------------------------------------------
class _Child:
    def __init__(self, commands: int, results: int, alive: int) -> None:
        self.commands, self.results, self.alive = commands, results, alive
        self.parent = os.getppid()
        self.stopping = False  # a signal was raised: the later ones are ignored
        self.sending = False  # a frame is half written: a signal waits for its end
        self.deferred: int | None = None
        self._writing = threading.Lock()

    def main(self, prepare: Prepare, work: Work, blocked: Any) -> int:
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal)
        _unblock(blocked)
        threading.Thread(target=self._leave_with_parent, daemon=True).start()
        outcome: Any = None
        try:
            self._forward_logs()
            message = _read_frame(self.commands)
            if message is None:  # dismissed before any work: nothing was imported
                return 0
            die_with_parent(self.parent)
            try:
                value, failure = prepare(), None
            except Exception as e:  # noqa: BLE001 - raised where the work asks for the model
                value, failure = None, e
            if message[0] == "prepare":
                message = _read_frame(self.commands)
                if message is None:
                    return 0

            def prepared() -> Any:
                if failure is not None:
                    raise failure
                return value

            work(message[1], prepared, self.progress)
        except BaseException as e:  # noqa: BLE001 - every ending is reported to the parent
            outcome = _outcome(e)
        self.stopping = True
        self._send(("end", outcome))
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        if self.sending:
            self.deferred = signum
            return
        self.stopping = True
        raise _Stop(signum)

    def _send(self, message: Any) -> None:
        # Other threads of the child (the weights loading in the background) log too: one
        # frame at a time. Signal handlers run in the main thread only, so only its sends
        # hold them back.
        main = threading.current_thread() is threading.main_thread()
        if main:
            self.sending = True
        try:
            with self._writing:
                _write_frame(self.results, message)
        finally:
            if main:
                self.sending = False
        if main and self.deferred is not None and not self.stopping:
            self.stopping = True
            raise _Stop(self.deferred)

    def _leave_with_parent(self) -> None:
        # The parent holds the write end until it has reaped the child: EOF means it died.
        # (On Linux die_with_parent is quicker: this thread needs the GIL to act.)
        with contextlib.suppress(OSError):
            os.read(self.alive, 1)
        os._exit(1)

    def _forward_logs(self) -> None:
        root = logging.getLogger(__name__.split(".")[0])
        root.handlers = [_Forward(self._send)]
        root.propagate = False

    @contextlib.contextmanager
    def progress(self, desc: str, total: int | None) -> Iterator[Tick]:
        self._send(("open", desc, total))
        pending, last = 0, time.monotonic()

        def tick(n: int) -> None:
            nonlocal pending, last
            pending += n
            now = time.monotonic()
            if now - last >= _TICK_EVERY:
                self._send(("tick", pending))
                pending, last = 0, now

        try:
            yield tick
        finally:
            if pending:
                self._send(("tick", pending))
            self._send(("close",))


@contextlib.contextmanager
def signals_noted(on_signal: Callable[[int, list[int]], None] | None = None) -> Iterator[list[int]]:
    """Within: SIGINT and SIGTERM are only noted in the list yielded (after on_signal(signum,
    the signals noted before it) has run), not handled. On the way out the handlers are put
    back and each signal noted is raised to them once (or to the default action). Outside
    the main thread, where handlers never run, nothing changes."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum: int, frame: object) -> None:
        if on_signal is not None:
            on_signal(signum, noted)
        noted.append(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, note)
        yield noted
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)


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


class _Forward(logging.Handler):
    """The child's log records, to the parent's handlers."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        # As logging's QueueHandler prepares a record: arguments merged into the message,
        # the traceback as text, so that it pickles.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        flat = logging.makeLogRecord(record.__dict__)
        flat.msg, flat.args, flat.exc_info = record.getMessage(), None, None
        self._send(("log", flat))


def _outcome(e: BaseException) -> Any:
    if isinstance(e, Interrupted):
        return ("interrupted", e.signum)
    if isinstance(e, KeyboardInterrupt):
        return ("interrupted", getattr(e, "signum", signal.SIGINT))
    if isinstance(e, IndexerError):
        return ("error", type(e).__name__, str(e))
    return ("crash", "".join(traceback.format_exception(e)))


def _raise(outcome: Any) -> None:
    kind = outcome[0]
    if kind == "interrupted":
        raise Interrupted(outcome[1], signal.Signals(outcome[1]).name)
    if kind == "error":
        cls = getattr(errors, outcome[1], None)
        if not (isinstance(cls, type) and issubclass(cls, IndexerError)) or cls is Interrupted:
            cls = IndexerError
        raise cls(outcome[2])
    raise ChildProcessFailed(outcome[1])


def _how_it_ended(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"ended with exit status {code} without saying why"


# -- frames: a 4-byte length, then a pickle (both ends are this program) ------------
_LENGTH = struct.Struct("<I")


def _write_frame(fd: int, message: Any) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_frame(fd: int) -> Any:
    """One frame from a blocking fd; None at EOF."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        data = os.read(fd, n - len(chunks))
        if not data:
            return None
        chunks += data
    return bytes(chunks)


def _frames(buffer: bytearray) -> Iterator[Any]:
    """The complete frames at the head of buffer, removed from it as they are read."""
    while len(buffer) >= _LENGTH.size:
        (n,) = _LENGTH.unpack_from(buffer)
        if len(buffer) < _LENGTH.size + n:
            return
        body = bytes(buffer[_LENGTH.size : _LENGTH.size + n])
        del buffer[: _LENGTH.size + n]
        yield pickle.loads(body)


def _block(signums: tuple[int, ...]) -> Any:
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, set(signums))
    return None


def _unblock(old: Any) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
