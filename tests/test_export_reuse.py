"""A jsonl index written from the last one: the lines of unchanged records are copied,
the others serialised, and the result is byte for byte what a full export writes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import bump_mtime, make_photo, open_db, read_jsonl, run_cli

from sqlindexer.index_file import write_index

NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", 'we"ird\\name\t.jpg', "sub/f.jpg", "g.jpg"]


@pytest.fixture
def indexed(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i, name in enumerate(NAMES):
        make_photo(photos / name, seed=i)
    out = tmp_path / "index.jsonl"
    run_cli(runner, _args(photos, out, tiny_model))
    return photos, out


def _args(photos: Path, out: Path, model: Path, *extra) -> list:
    return ["-i", photos, "-o", out, "--model-name", model, "--workers", "0", "--log-level", "DEBUG", *extra]


# The export's debug line: records copied, records written, the blocks of lines they were
# copied in, and either the lines of the last export whose path was read and how many it
# has (no line map: the lines found by their paths) or "by its line map".
_COPIED = re.compile(r"copied (\d+) of (\d+) records from the last export in (\d+) blocks "
                     r"\((?:(\d+) of its (\d+) lines looked at|by its line map)\)")


def _copied(stderr: str) -> tuple[int, int] | None:
    found = [m[:2] for m in _COPIED.findall(stderr)]
    return tuple(map(int, found[0])) if found else None


def _full_export(runner, out: Path, tmp_path: Path) -> bytes:
    """What the export command writes from the same database, every record serialised."""
    fresh = tmp_path / "fresh.jsonl"
    run_cli(runner, ["export", "--db", out.with_suffix(".sqlite"), "-o", fresh])
    return fresh.read_bytes()


@pytest.mark.parametrize("run_paths", [10_000, 1])
def test_changed_records_are_written_and_the_rest_copied(runner, tmp_path, tiny_model, indexed, monkeypatch,
                                                         run_paths):
    # run_paths 1: every run of unchanged records is handed over in lists of one path.
    from sqlindexer import records as records_module

    monkeypatch.setattr(records_module, "_RUN_PATHS", run_paths)
    photos, out = indexed
    make_photo(photos / "b.jpg", seed=30)  # modified
    bump_mtime(photos / "b.jpg", 1)
    make_photo(photos / "c0.jpg", seed=31)  # new, between two copied lines
    (photos / "d.jpg").unlink()  # deleted: its line is passed over
    (photos / "e.jpg").chmod(0o600)  # ctime only: its creation_time changes
    (photos / "g.jpg").rename(photos / "h.jpg")  # same content, another path

    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert _copied(result.stderr) == (4, 8), result.stderr  # a.jpg, c.jpg, the escaped name and sub/f.jpg
    assert out.read_bytes() == _full_export(runner, out, tmp_path)
    records = {Path(r["metadata"]["path"]).name: r for r in read_jsonl(out)}
    assert sorted(records) == sorted(["a.jpg", "b.jpg", "c.jpg", "c0.jpg", "e.jpg", 'we"ird\\name\t.jpg', "f.jpg",
                                      "h.jpg"])

    # Nothing changed since: the file is left as it is.
    before = out.stat()
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert "is up to date" in result.stderr and _copied(result.stderr) is None
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_escaped_path_is_matched_to_its_line(runner, tmp_path, tiny_model, indexed):
    # The path with a quote, a backslash and a tab is written escaped; its line is still
    # recognised as its own and copied.
    photos, out = indexed
    make_photo(photos / "a.jpg", seed=40)
    bump_mtime(photos / "a.jpg", 1)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert _copied(result.stderr) == (7, 8), result.stderr
    assert out.read_bytes() == _full_export(runner, out, tmp_path)


def test_a_hand_made_edit_of_a_row_is_exported(runner, tmp_path, tiny_model, indexed):
    # Triggers stamp the row whatever wrote it, so a record changed with sqlite3 is not
    # copied from the last export as it was.
    photos, out = indexed
    db = out.with_suffix(".sqlite")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE files SET exif = ? WHERE path = ?", (json.dumps({"Make": "Hand"}), str(photos / "c.jpg")))
    conn.close()
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert _copied(result.stderr) == (7, 8), result.stderr
    records = {Path(r["metadata"]["path"]).name: r for r in read_jsonl(out)}
    assert records["c.jpg"]["metadata"]["exif"] == {"Make": "Hand"}
    assert out.read_bytes() == _full_export(runner, out, tmp_path)


def test_lines_that_are_not_ours_are_not_copied(runner, tmp_path, tiny_model, indexed):
    # The file at the output path is the same file (inode, size, mtime) but not what we
    # wrote: every record is written afresh, with a warning.
    photos, out = indexed
    st = out.stat()
    with open(out, "r+b") as f:
        f.write(b"x" * st.st_size)
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    make_photo(photos / "b.jpg", seed=30)
    bump_mtime(photos / "b.jpg", 1)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert f"cannot copy records from {out}" in result.stderr and _copied(result.stderr) is None
    assert out.read_bytes() == _full_export(runner, out, tmp_path)
    assert len(read_jsonl(out)) == len(NAMES)


def test_a_rebuild_and_a_pkl_index_are_written_afresh(runner, tmp_path, tiny_model, indexed):
    photos, out = indexed
    # A full build embeds every file again: nothing to copy, everything serialised.
    result = run_cli(runner, _args(photos, out, tiny_model))
    assert "changed since it was written" not in result.stderr and _copied(result.stderr) is None
    assert out.read_bytes() == _full_export(runner, out, tmp_path)

    pkl = tmp_path / "index.pkl"
    run_cli(runner, _args(photos, pkl, tiny_model, "--state-db", out.with_suffix(".sqlite"), "--reindex"))
    make_photo(photos / "z.jpg", seed=50)
    result = run_cli(runner, _args(photos, pkl, tiny_model, "--state-db", out.with_suffix(".sqlite"), "--reindex"))
    assert _copied(result.stderr) is None


def test_the_stamp_moves_with_what_a_record_holds(tmp_path):
    from sqlindexer import db, records

    db.connect(tmp_path / "state.sqlite").close()  # the schema, as migrated
    with open_db(tmp_path / "state.sqlite") as conn:
        conn.isolation_level = None
        conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status) VALUES ('/p/a.jpg', 1, 1, 1, 'ok')")
        stamp = records.record_stamp(conn)
        assert conn.execute("SELECT stamp FROM files").fetchone()[0] == stamp > 0
        for change in ("ctime_ns = 2", "width = 3", "exif = '{}'", "embedding = x'00'", "status = 'failed'"):
            conn.execute(f"UPDATE files SET {change}")
            assert records.record_stamp(conn) == stamp + 1, change
            stamp += 1
            assert conn.execute("SELECT stamp FROM files").fetchone()[0] == stamp, change
        for unrelated in ("build = 5", "changed_run = 6", "error = 'x'"):
            conn.execute(f"UPDATE files SET {unrelated}")
            assert records.record_stamp(conn) == stamp, unrelated
        conn.execute("DELETE FROM files")
        assert records.record_stamp(conn) == stamp + 1


def test_a_ctime_only_change_is_exported(runner, tmp_path, tiny_model, indexed):
    # chmod changes only a file's ctime, which the record holds as creation_time: the
    # index must follow, although no vector changed (it used to be taken as up to date).
    photos, out = indexed
    before = {Path(r["metadata"]["path"]).name: r for r in read_jsonl(out)}
    time.sleep(0.01)
    (photos / "c.jpg").chmod(0o600)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert "is up to date" not in result.stderr and _copied(result.stderr) == (7, 8), result.stderr
    after = {Path(r["metadata"]["path"]).name: r for r in read_jsonl(out)}
    assert after["c.jpg"]["metadata"]["creation_time"] != before["c.jpg"]["metadata"]["creation_time"]
    assert after["c.jpg"]["vector"] == before["c.jpg"]["vector"]
    assert out.read_bytes() == _full_export(runner, out, tmp_path)


def test_a_previous_index_that_cannot_be_read_is_a_value_error(tmp_path):
    # The caller falls back to writing every record on ValueError: a last export deleted
    # (or made unreadable) under the run must land there, not fail the run.
    from sqlindexer.index_file import tmp_path as export_tmp_path

    out = tmp_path / "index.jsonl"
    with pytest.raises(ValueError, match="cannot read it"):
        write_index([["/p/a.jpg"]], out, "jsonl", previous=tmp_path / "gone.jsonl", load=lambda path: None)
    assert not out.exists() and not export_tmp_path(out).exists()


def _row(path: str, version: int):
    import numpy as np

    from sqlindexer.records import ExportRow

    vec = np.random.default_rng([version, len(path), ord(path[-5])]).standard_normal(8).astype("<f4")
    return ExportRow(path, 100 + version, 10**18 + version, 10**18, 4, 3, None, vec.tobytes(), 8)


@pytest.mark.parametrize("seed", range(12))
def test_runs_of_unchanged_records_are_copied_whole_or_matched_line_by_line(tmp_path, caplog, seed):
    # Random edits of an index of 300 records (records deleted inside and between runs of
    # unchanged ones, changed and new records, a run to the end): the file written from
    # the last one is the full export byte for byte, and every unchanged record is copied.
    import random

    rnd = random.Random(seed)
    tails = ["", "x", 'y\\"z']  # the last is written escaped
    paths = sorted(f"/p/{rnd.choice('abc')}/{i:04d}{rnd.choice(tails)}.jpg" for i in range(300))
    before = {p: _row(p, 0) for p in paths}
    previous = tmp_path / "previous.jsonl"
    write_index(list(before.values()), previous, "jsonl")

    after, entries = {}, []
    for p in sorted(set(paths) | {f"/p/b/{i:04d}n.jpg" for i in rnd.sample(range(300), 10)}):
        roll = rnd.random()
        if p not in before:  # new
            after[p] = _row(p, 1)
            entries.append(after[p])
        elif roll < 0.02:  # deleted
            continue
        elif roll < 0.08:  # changed
            after[p] = _row(p, 2)
            entries.append(after[p])
        else:
            after[p] = before[p]
            if not entries or not isinstance(entries[-1], list):
                entries.append([])
            entries[-1].append(p)
    out, full = tmp_path / "index.jsonl", tmp_path / "full.jsonl"
    write_index(list(after.values()), full, "jsonl")
    n, log = _write_logged(caplog, entries, out, previous, after.__getitem__)
    assert n == len(after) and out.read_bytes() == full.read_bytes()
    # A run of unchanged records is copied as one block unless lines of records deleted or
    # changed since lie among its lines; then each stretch of its lines between them is
    # one block, and no line's path is read twice but the two a run's check reads.
    runs = [e for e in entries if isinstance(e, list)]
    assert _blocks(runs, sorted(before)) > len(runs)  # lines of other records lie inside some runs
    found = _COPIED.search(log)
    assert found and int(found[1]) == sum(map(len, runs)) and int(found[2]) == n, log
    assert int(found[3]) == _blocks(runs, sorted(before)), log
    assert int(found[5]) == len(before) and int(found[4]) <= len(before) + 2 * len(runs), log


def test_runs_with_every_tenth_line_gone_are_copied_in_stretches_each_path_read_once(tmp_path, caplog):
    # A tenth of the files moved away (the lines of their old paths gone from between
    # those of the others): each stretch of lines between two gone ones is one block, and
    # no line's path is read twice but the two each run's check reads.
    paths = [f"/p/d{i // 100:02d}/{i:05d}.jpg" for i in range(3000)]
    before = {p: _row(p, 0) for p in paths}
    previous = tmp_path / "previous.jsonl"
    write_index(list(before.values()), previous, "jsonl")
    kept = [p for i, p in enumerate(before) if i % 10 != 3]
    runs = [kept[i : i + 1000] for i in range(0, len(kept), 1000)]
    out, full = tmp_path / "index.jsonl", tmp_path / "full.jsonl"
    write_index([before[p] for p in kept], full, "jsonl")
    n, log = _write_logged(caplog, runs, out, previous, before.__getitem__)
    assert n == len(kept) and out.read_bytes() == full.read_bytes()
    found = _COPIED.search(log)
    assert found and int(found[1]) == len(kept), log
    assert int(found[3]) == _blocks(runs, list(before)) == 300 + len(runs), log
    assert int(found[4]) <= len(before) + 2 * len(runs), log


def _blocks(runs: list[list[str]], old_lines: list[str]) -> int:
    """The fewest blocks of consecutive lines of old_lines that hold the lines of runs,
    a run's lines never in the block of another run."""
    where = {p: i for i, p in enumerate(old_lines)}
    count = 0
    for run in runs:
        at = [where[p] for p in run]
        count += 1 + sum(1 for a, b in zip(at, at[1:]) if b != a + 1)
    return count


def test_an_unchanged_path_the_last_index_lacks_is_written_afresh(tmp_path, caplog):
    # The caller's bookkeeping rules it out; where a run shows it (its last path is not
    # where its line should be), the record is loaded rather than a wrong line copied.
    rows = {p: _row(p, 0) for p in ("/p/a.jpg", "/p/b.jpg", "/p/c.jpg", "/p/d.jpg")}
    previous = tmp_path / "previous.jsonl"
    write_index([rows["/p/a.jpg"], rows["/p/c.jpg"], rows["/p/d.jpg"]], previous, "jsonl")
    rows["/p/c.jpg"] = _row("/p/c.jpg", 2)  # changed: its old line is passed over
    out, full = tmp_path / "index.jsonl", tmp_path / "full.jsonl"
    write_index(list(rows.values()), full, "jsonl")
    n, log = _write_logged(caplog, [["/p/a.jpg", "/p/b.jpg"], rows["/p/c.jpg"], ["/p/d.jpg"]], out, previous,
                           rows.__getitem__)
    assert n == 4 and out.read_bytes() == full.read_bytes()
    assert "no line for /p/b.jpg in the last export" in log and "copied 2 of 4 records" in log
    assert "in 2 blocks" in log  # a.jpg; d.jpg, a run of its own


def _row(path: str, version: int):
    import numpy as np

    from sqlindexer.records import ExportRow

    vec = np.random.default_rng([version, len(path), ord(path[-5])]).standard_normal(8).astype("<f4")
    return ExportRow(path, 100 + version, 10**18 + version, 10**18, 4, 3, None, vec.tobytes(), 8)


def _write_logged(caplog, entries, out: Path, previous: Path, load) -> tuple[int, str]:
    """write_index from previous, with the debug log it wrote."""
    import logging

    # The CLI's logging (set up by earlier tests) stops sqlindexer's records at its own
    # handler: listen there.
    logger = logging.getLogger("sqlindexer")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="sqlindexer"):
            n = write_index(entries, out, "jsonl", previous=previous, load=load)
    finally:
        logger.removeHandler(caplog.handler)
    return n, caplog.text


def test_unchanged_rows_come_in_runs_of_bounded_length(tmp_path, monkeypatch):
    # The export is handed the unchanged records as lists of paths, one list a run of
    # them, none longer than _RUN_PATHS (a list is held whole: its length bounds memory).
    from sqlindexer import db, records

    monkeypatch.setattr(records, "_RUN_PATHS", 2)
    db.connect(tmp_path / "state.sqlite").close()
    with open_db(tmp_path / "state.sqlite") as conn:
        conn.isolation_level = None
        for name in "abcdef":
            conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding) "
                         "VALUES (?, 1, 1, 1, 'ok', 'm', 1, x'00000000')", (f"/p/{name}.jpg",))
        since = records.record_stamp(conn)
        conn.execute("UPDATE files SET ctime_ns = 2 WHERE path = '/p/d.jpg'")
        got = [e if isinstance(e, list) else e.path for e in records.iter_export_changes(conn, "m", since)]
    assert got == [["/p/a.jpg", "/p/b.jpg"], ["/p/c.jpg"], "/p/d.jpg", ["/p/e.jpg", "/p/f.jpg"]]


def test_an_escaped_path_on_a_line_not_of_this_layout_is_a_layout_error():
    # The block copy reads an escaped path by parsing its line; a hand-edited line that
    # passes the byte checks but parses to another shape must be refused like any other
    # mismatch (the export then writes every record afresh), not crash the run.
    from sqlindexer.previous_lines import _escaped_path

    assert _escaped_path(b'{"embedding":[1.0],"metadata":{"path":"a\\tb"}}') == "a\tb"
    with pytest.raises(ValueError):
        _escaped_path(b'{"embedding":[1.0],"metadata":{"path":"a\\tb"},"metadata":{}}')
    with pytest.raises(ValueError):
        _escaped_path(b'{"embedding":[1.0],"metadata":{"path":"a\\tb"},"metadata":[1]}')
    with pytest.raises(ValueError):
        _escaped_path(b'{"embedding":[1.0],"metadata":{"path":"a\\tb","path":5}}')
