"""The export step: bring the index file up to date with the committed rows of one model.

`index` runs it at the end of every run and `export` on its own; both call export_index.
What decides how much work it is:

- The file on disk is still the one the last export wrote (path, size, mtime, inode) from
  the same rows (the record stamp that every change to a record moves, the model, the
  format, the time zone that local times are written in): it is up to date, and rewriting
  it would produce the same bytes. Nothing is written.
- A jsonl file written from older rows, in this version's line layout, with at most half
  of its records changed since: the lines of unchanged records are copied from it
  (index_file's block copy), the others serialised.
- Otherwise every record is serialised.

The stamp, not a run's counts, tells whether rows moved: a run killed between its last
commit and the end of its export leaves changes that the next run must export.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import db, records, runs
from .config import absolute, check_output_file
from .errors import ExportError
from .progress import Progress, no_progress
from .runs import ExportMark, get_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    count: int  # records the file holds
    written: bool  # False: the file was up to date, and left as it was
    mark: ExportMark  # what to record as the last export


def export_index(conn: sqlite3.Connection, *, model: str, out: Path, fmt: str, progress: Progress = no_progress,
                 last: ExportMark | None = None, lines: Path | None = None) -> Exported:
    """Write (or keep) the index file at out from the committed rows of model.

    last: the mark of the previous export (runs.export_mark), if any. The caller records
    the returned mark when it can write the database (the `export` command reads it
    read-only). lines: where this database's line map is kept (line_map.py), given by a
    caller that records the mark: a jsonl export reads the last one's map there and
    replaces it with its own."""
    # One read transaction: the stamp recorded with the file is that of the rows in it.
    with db.transaction(conn, immediate=False):
        total = records.count_export_rows(conn, model)
        rows = {"model": model, "format": fmt, "stamp": records.record_stamp(conn), "tz": _time_zone()}
        last = last if last is not None and _still_on_disk(last, out) else None
        if last is not None and all(getattr(last, k) == v for k, v in rows.items()):
            log.info("%s is up to date", out)
            return Exported(total, False, last)
        # Deferred: numpy and orjson, which a run with nothing to export does not need.
        from . import index_file, line_map

        database_id = get_meta(conn, records.DATABASE_ID) or ""
        at = lines if fmt == "jsonl" else None
        copy = _copy_from(conn, last, rows, total)
        old_lines = line_map.load(at, database_id, out) if at is not None and copy is not None else None
        count, new_lines = _write(conn, out, fmt, model, total, copy, progress, old_lines, with_map=at is not None)
    st = out.stat()
    if at is not None:
        line_map.keep(at, database_id, out, st, new_lines)
    mark = ExportMark(str(out), st.st_size, st.st_mtime_ns, st.st_ino, **rows,
                      layout=index_file.JSONL_LAYOUT if fmt == "jsonl" else None)
    return Exported(count, True, mark)


def line_map_path(database: Path) -> Path:
    """Where the line map of the database's last jsonl export is kept (line_map.py)."""
    return database.with_name(database.name + ".export-lines")


def check_target(output_file: str, database: str) -> Path:
    """The absolute path to export to, for the `export` command; an ExportError if it
    cannot be one."""
    out = check_output_file(output_file)
    db_path = absolute(database)
    if out in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        raise ExportError(f"the output file {output_file} is the working database")
    return out


def last_export_of(conn: sqlite3.Connection, path: Path) -> ExportMark | None:
    """The mark of the last export if the file at path is, unchanged, what it wrote (a
    --source-index that is our own output holds nothing the database lacks)."""
    mark = runs.export_mark(conn)
    try:
        st = path.stat()
    except OSError:
        return None
    return mark if mark is not None and mark.names_file(str(path), st, same_inode=False) else None


def _still_on_disk(mark: ExportMark, out: Path) -> bool:
    try:
        return mark.names_file(str(out), out.stat())
    except OSError:
        return False


def _copy_from(conn: sqlite3.Connection, last: ExportMark | None, rows: dict[str, Any],
               total: int) -> tuple[int, int] | None:
    """(stamp, records changed since) when the unchanged records can be copied from the
    file on disk, else None."""
    from . import index_file

    if last is None or rows["format"] != "jsonl" or last.layout != index_file.JSONL_LAYOUT \
            or any(getattr(last, k) != rows[k] for k in ("model", "format", "tz")):
        return None
    changed = records.count_changed_export_rows(conn, rows["model"], last.stamp)
    # Copying lines pays when most records are unchanged; a rebuild is written afresh.
    return (last.stamp, changed) if changed <= total // 2 else None


def _write(conn: sqlite3.Connection, out: Path, fmt: str, model: str, total: int, copy: tuple[int, int] | None,
           progress: Progress, old_lines: Any, *, with_map: bool) -> tuple[int, Any]:
    """Write the file (copying lines by old_lines, the last export's line map, where there
    is one); returns the count and, with_map, the new file's line map (a line_map.LineMap;
    None where its lines were not all accounted for)."""
    from . import index_file, line_map

    log.debug("exporting %d records to %s%s", total, out, "" if copy is None else
              f", {copy[1]} changed since it was written")
    lengths = line_map.Lengths() if with_map else None
    with progress("exporting", total) as tick:
        if copy is not None:
            try:
                if old_lines is not None:
                    ids, entries = _by_line_map(conn, model, copy[0], old_lines)
                    count = index_file.write_index(entries, out, fmt, tick=tick, previous=out, lines=old_lines,
                                                   lengths=lengths, load=lambda path: records.export_row(conn, path))
                    return count, lengths.line_map(ids) if lengths is not None else None
                count = index_file.write_index(records.iter_export_changes(conn, model, copy[0]), out, fmt, tick=tick,
                                               previous=out, load=lambda path: records.export_row(conn, path),
                                               lengths=lengths)
                return count, _new_map(conn, model, lengths)
            except ValueError as e:  # not lines we wrote after all: write every record
                log.warning("cannot copy records from %s (%s); writing them all", out, e)
                lengths = line_map.Lengths() if with_map else None
        count = index_file.write_index(records.iter_export_rows(conn, model), out, fmt, tick=tick, lengths=lengths)
        return count, _new_map(conn, model, lengths)


def _by_line_map(conn: sqlite3.Connection, model: str, since: int, old_lines: Any) -> tuple[Any, Iterator[Any]]:
    """The ids of the export's rows in line order, and what to write: blocks of the last
    export's lines (found by the ids in its line map) and the rows changed since."""
    from . import line_map

    ids, changed = records.export_order(conn, model, since)

    def entries() -> Iterator[Any]:
        fresh = records.iter_changed_rows(conn, model, since)
        ahead = next(fresh, None)
        for entry in line_map.plan(old_lines, ids, changed):
            if isinstance(entry, line_map.Block):
                yield entry
            elif ahead is not None and ahead.id == entry:
                yield ahead
                ahead = next(fresh, None)
            else:  # unchanged, but the last export has no line of it
                log.debug("no line for row %d in the last export; writing it afresh", entry)
                yield records.export_row_by_id(conn, entry)

    return ids, entries()


def _new_map(conn: sqlite3.Connection, model: str, lengths: Any) -> Any:
    """The new file's line map, from the lengths of its lines and the export's rows' ids
    (read again: the copy by path knows its lines by path only)."""
    if lengths is None:
        return None
    return lengths.line_map(records.export_order(conn, model, 0)[0])


def _time_zone() -> tuple[Any, ...]:
    return (time.timezone, time.altzone, *time.tzname)
