"""A folder kept in a cache (openvino_text.py: a converted text tower) that is whole under
its final name, even after a crash, a kill or a power loss. sync() also serves the search
caches (vectors.py, ann.py), which make and rename their folders themselves.

It is made in a hidden folder of its own beside that name (`.<name>.<random>`), synced, and
renamed into place; it is removed by moving it aside first (`.<name>.removing-<random>`).
What killed keeps and removals leave, a later keep removes. A lasting reason not to keep
it is recorded beside it (`<name>.not-kept`), and the caller does not try again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

# A folder being made that is older than this was left by a process that was killed.
ABANDONED_AFTER = 3600


def refusal(folder: Path) -> str | None:
    """Why folder is not to be kept, as recorded by refuse(); None where nothing is."""
    path = _refusal(folder)
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace").strip()


def refuse(folder: Path, why: str) -> None:
    try:
        _refusal(folder).write_text(why + "\n", encoding="utf-8", errors="replace")
    except OSError:
        pass  # tried again next time


def writable_parent(folder: Path) -> bool:
    """Whether folder can be made where it goes (its parent made if need be)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return os.access(folder.parent, os.W_OK)


def unfinished(folder: Path) -> int:
    """How many folders are being made for folder now, or were left by processes killed
    within the last ABANDONED_AFTER seconds."""
    return sum(not stale for _, stale in _left_over(folder))


def start(folder: Path) -> Path:
    """A new empty folder to make folder in, beside it; what killed processes left there
    before is removed first (each as big as what is kept)."""
    for tmp, stale in _left_over(folder):
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))


def install(tmp: Path, folder: Path, *, marker: str) -> None:
    """Sync tmp's files and rename tmp to folder. marker: the file, written last, that
    tells a whole folder; one already in place with it (another process was first) is
    left as it is."""
    sync(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        if (folder / marker).is_file():
            return
        # What a removal cut short left under the name (never a folder being made: those
        # are made in their own until this rename).
        debris = _move_aside(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / marker).is_file():
                raise
        finally:
            if debris is not None:
                shutil.rmtree(debris, ignore_errors=True)


def remove(folder: Path) -> None:
    """Remove folder, moved aside first: a removal cut short leaves nothing under its name."""
    aside = _move_aside(folder)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _refusal(folder: Path) -> Path:
    return folder.with_name(folder.name + ".not-kept")


def _aside_prefix(folder: Path) -> str:
    return f".{folder.name}.removing-"


def _move_aside(folder: Path) -> Path | None:
    """Rename folder to a name of its own, to be removed there (what a removal cut short
    leaves there, start() removes). None where folder is not there."""
    aside = folder.with_name(_aside_prefix(folder) + uuid.uuid4().hex)
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return None
    return aside


def _left_over(folder: Path) -> list[tuple[Path, bool]]:
    """The folders that makings and removals of folder work in, each with whether it is
    stale: left by a removal, or by a making more than ABANDONED_AFTER ago (killed). The
    others are being made now or were left lately."""
    now, found = time.time(), []
    for tmp in folder.parent.glob(f".{folder.name}.*"):
        try:
            found.append((tmp, tmp.name.startswith(_aside_prefix(folder))
                          or now - tmp.stat().st_mtime > ABANDONED_AFTER))
        except OSError:
            pass  # removed meanwhile
    return found


def sync(folder: Path, *, skip: Iterable[str] = ()) -> None:
    """Make folder's files durable before it is renamed into place: after a power loss a
    folder under its final name holds whole files. Files named in skip are left out (a
    caller's files that were synced as they were written, or are links to such files)."""
    # Windows syncs only a file opened for writing, and cannot open a folder at all.
    windows = os.name == "nt"
    skipped = set(skip)
    for path in folder.iterdir():
        if path.name not in skipped and path.is_file():
            _fsync(path, os.O_RDWR | getattr(os, "O_BINARY", 0) if windows else os.O_RDONLY)
    if not windows:
        _fsync(folder, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
