"""How core code reports progress without knowing how it is shown.

A phase calls `progress(description, total)` and gets a context manager yielding `tick(n)`;
the CLI passes one that draws a bar, tests and library callers get `no_progress`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager

Tick = Callable[[int], None]
Progress = Callable[[str, "int | None"], ContextManager[Tick]]


@contextlib.contextmanager
def no_progress(desc: str, total: int | None) -> Iterator[Tick]:
    yield lambda n: None
