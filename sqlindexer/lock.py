"""One run at a time per working database, with an advisory lock the OS releases when
the process dies (so a killed run never leaves a stale lock behind)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .errors import DatabaseError, LockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no protection
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class RunLock:
    """wait=False: refuse at once when another process holds the lock (LockedError);
    wait=True: block until it is released. A signal ends the wait (the handler's
    exception propagates)."""

    def __init__(self, db_path: Path, *, wait: bool = False) -> None:
        self.path = Path(str(db_path) + ".lock")
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            return self
        try:
            # O_NOFOLLOW: the lock file is truncated and written below, so a symlink
            # planted at its name must not lead that write to another file.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:  # missing or read-only folder: a one-line error, not a traceback
            if e.errno == errno.ELOOP:
                raise DatabaseError(f"lock file {self.path} is a symlink; remove it (it is not followed)") from None
            raise DatabaseError(f"cannot create lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            db = str(self.path)[: -len(".lock")]
            if not self.wait:
                os.close(fd)
                raise LockedError(f"another image-indexer run (pid {holder}) is using {db}") from None
            log.info("another image-indexer run (pid %s) is using %s; waiting for it to finish", holder, db)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # a full disk
            os.close(fd)
            raise DatabaseError(f"cannot write lock file {self.path}: {e.strerror or e}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
