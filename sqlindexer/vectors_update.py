"""A new vector cache from an older one: the rows changed since are read from SQLite, the
others copied from the older cache's memory map.

What the older cache holds is the database as it was at its record stamp (every change to
a row's vector, path, status, model or EXIF stamps the row with a later value; a deleted
row is simply gone), so a row whose stamp is not above it holds the same vector, date and
camera today, and one that is above it, or that the older cache does not hold, is read.
Paths come from the path index alone (state.iter_search_keys), in the order the new
cache keeps them.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import numpy as np

from . import state
from .errors import SearchError
from .progress import Progress

if TYPE_CHECKING:
    from .vectors import VectorIndex, _Arrays

# Rows copied per step: a 65,536 x 768 float32 block is 192 MiB.
COPY_PAGE = 65_536
KEY_PAGE = 65_536


def copy_forward(conn: sqlite3.Connection, model: state.ModelVectors, out: _Arrays, previous: VectorIndex,
                 progress: Progress) -> list[str]:
    """Fill out with the model's rows as they are now, from previous and the changed rows;
    return the camera names (previous's first, so the copied codes keep their meaning)."""
    from .vectors import NO_DATE, normalised_block

    assert previous.stamp is not None
    count = len(out.ids)
    ids, stamps, encoded = _keys(conn, model, count)
    old = previous.rows_of(ids)
    fresh = (old < 0) | (stamps > previous.stamp)
    keep = np.flatnonzero(~fresh)
    names = {name: i for i, name in enumerate(previous.cameras)}
    out.ids[:] = ids
    with progress("updating vectors", count) as tick:
        for start in range(0, len(keep), COPY_PAGE):
            dst = keep[start : start + COPY_PAGE]
            src = old[dst]
            # Both sides are in path order, so each page reads (and writes) few runs.
            out.vectors[dst] = previous.vectors[src]
            out.taken[dst] = previous.taken[src]
            out.camera[dst] = previous.camera[src]
            tick(len(dst))
        changed = np.flatnonzero(fresh)
        rows = state.search_rows_by_id(conn, model.model, model.dim, ids[changed].tolist())
        if len(rows) != len(changed):
            raise SearchError("the database changed while its vectors were read")
        rows.sort(key=lambda row: row[0])
        at = changed[np.argsort(ids[changed], kind="stable")]  # positions in the same (id) order
        for start in range(0, len(rows), COPY_PAGE):
            page, dst = rows[start : start + COPY_PAGE], at[start : start + COPY_PAGE]
            out.vectors[dst] = normalised_block(page, model.dim)
            out.taken[dst] = [NO_DATE if row[3] is None else row[3] for row in page]
            out.camera[dst] = [-1 if row[4] is None else names.setdefault(str(row[4]), len(names)) for row in page]
            tick(len(dst))
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=count)
    out.offsets[1:] = np.cumsum(lengths)
    out.blob = b"".join(encoded)
    return list(names)


def _keys(conn: sqlite3.Connection, model: state.ModelVectors, count: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """ids, stamps and UTF-8 paths of the model's ok rows, in path order."""
    ids = np.empty(count, dtype=np.int64)
    stamps = np.empty(count, dtype=np.int64)
    encoded: list[bytes] = []
    i = 0
    for rows in state.iter_search_keys(conn, model.model, page=KEY_PAGE):
        k = len(rows)
        if i + k > count:
            raise SearchError("the database changed while its vectors were read")
        ids[i : i + k] = [row[0] for row in rows]
        stamps[i : i + k] = [row[2] for row in rows]
        encoded.extend(row[1].encode("utf-8", "surrogateescape") for row in rows)
        i += k
    if i != count:
        raise SearchError("the database changed while its vectors were read")
    return ids, stamps, encoded
