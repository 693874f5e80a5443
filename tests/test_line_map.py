"""The line map beside the database: a jsonl export written from the last one copies the
lines of unchanged records found by their rows' ids, without reading a path from the old
file, and the result is byte for byte what a full export writes. Also the stamps that
writers of many rows set themselves (migrations/0005_own_stamps.sql)."""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import bump_mtime, make_photo, open_db, run_cli

from sqlindexer import line_map
from sqlindexer.index_file import write_index

_BY_MAP = re.compile(r"copied (\d+) of (\d+) records from the last export in (\d+) blocks \(by its line map\)")
_BY_PATH = re.compile(r"copied (\d+) of (\d+) records from the last export in \d+ blocks \(\d+ of its \d+ lines")


def _args(photos: Path, out: Path, model: Path, *extra) -> list:
    return ["-i", photos, "-o", out, "--model-name", model, "--workers", "0", "--log-level", "DEBUG", *extra]


def _full_export(runner, out: Path, tmp_path: Path) -> bytes:
    fresh = tmp_path / "fresh.jsonl"
    run_cli(runner, ["export", "--db", out.with_suffix(".sqlite"), "-o", fresh])
    return fresh.read_bytes()


def _map_of(out: Path) -> Path:
    return out.with_suffix(".sqlite").with_name("index.sqlite.export-lines")


@pytest.fixture
def indexed(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i in range(12):
        make_photo(photos / f"d{i % 3}" / f"{i:02d}.jpg", seed=i)
    out = tmp_path / "index.jsonl"
    run_cli(runner, _args(photos, out, tiny_model))
    return photos, out


def test_an_index_run_leaves_the_map_of_its_export(indexed):
    _, out = indexed
    head, *_ = _map_of(out).read_bytes().split(b"\n", 1)
    meta = json.loads(head)
    st = out.stat()
    assert (meta["path"], meta["size"], meta["mtime_ns"], meta["ino"], meta["count"]) == \
        (str(out), st.st_size, st.st_mtime_ns, st.st_ino, 12)
    with open_db(out.with_suffix(".sqlite")) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM files WHERE status = 'ok' ORDER BY path")]
        database_id = conn.execute("SELECT value FROM meta WHERE key = 'database_id'").fetchone()[0]
    lines = line_map.read(_map_of(out), line_map.identity(database_id, out, st))
    assert lines is not None and lines.ids.tolist() == ids
    data = out.read_bytes()
    assert [data[lines.start(i) : int(lines.ends[i])].count(b"\n") for i in range(12)] == [1] * 12


def test_moved_and_changed_records_are_written_by_the_map(runner, tmp_path, tiny_model, indexed):
    photos, out = indexed
    (photos / "moved").mkdir()
    for name in ("00.jpg", "04.jpg", "07.jpg"):  # renamed: their rows move, their old lines go
        src = next(photos.glob(f"*/{name}"))
        src.rename(photos / "moved" / name)
    edited = next(photos.glob("*/05.jpg"))
    make_photo(edited, seed=50)
    bump_mtime(edited, 1)
    next(photos.glob("*/09.jpg")).unlink()
    make_photo(photos / "d1" / "new.jpg", seed=51)

    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    found = _BY_MAP.search(result.stderr)
    assert found and (int(found[1]), int(found[2])) == (7, 12), result.stderr  # 12 - 3 moved - 1 edited - 1 gone
    assert _BY_PATH.search(result.stderr) is None
    assert out.read_bytes() == _full_export(runner, out, tmp_path)
    # The new map is that of the new file: the next change is copied by it again.
    make_photo(photos / "d2" / "new2.jpg", seed=52)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    found = _BY_MAP.search(result.stderr)
    assert found and (int(found[1]), int(found[2])) == (12, 13), result.stderr
    assert out.read_bytes() == _full_export(runner, out, tmp_path)


def _spoil_ids(at: Path, ids: list[int]) -> None:
    head, rest = at.read_bytes().split(b"\n", 1)
    n = json.loads(head)["count"]
    at.write_bytes(head + b"\n" + np.array(ids[:n], dtype="<i8").tobytes() + rest[8 * n :])


@pytest.mark.parametrize("spoil", ["deleted", "another file", "another database", "garbage", "short",
                                   "negative id", "repeated id", "huge id", "a link", "a fifo"])
def test_without_a_map_of_that_file_the_lines_are_found_by_their_paths(runner, tmp_path, tiny_model, indexed,
                                                                        spoil):
    # A database upgraded from before maps, a map of another export or a damaged one: the
    # export falls back to reading the old file's paths, and writes a good map again. (A
    # row id far past any is looked up by binary search, never a table that large.)
    photos, out = indexed
    at = _map_of(out)
    if spoil == "deleted":
        at.unlink()
    elif spoil == "another file":
        head, rest = at.read_bytes().split(b"\n", 1)
        at.write_bytes(json.dumps({**json.loads(head), "size": 1}).encode() + b"\n" + rest)
    elif spoil == "another database":
        head, rest = at.read_bytes().split(b"\n", 1)
        at.write_bytes(json.dumps({**json.loads(head), "database_id": "0" * 32}).encode() + b"\n" + rest)
    elif spoil in ("a link", "a fifo"):
        good = at.with_name("elsewhere")
        at.rename(good)
        at.symlink_to(good) if spoil == "a link" else os.mkfifo(at)
    elif spoil == "garbage":
        at.write_bytes(b"\x00\xff" * 50)
    elif spoil == "short":
        at.write_bytes(at.read_bytes()[:-8])
    elif spoil == "negative id":
        _spoil_ids(at, [-1] + list(range(2, 13)))
    elif spoil == "repeated id":
        _spoil_ids(at, [1] * 12)
    else:  # a map naming a row id far past any: never a table that large
        _spoil_ids(at, [10**15] + list(range(2, 13)))
    make_photo(photos / "d0" / "new.jpg", seed=60)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    if spoil == "huge id":  # read, and harmless: row 1's line is not found, so it is written afresh
        found = _BY_MAP.search(result.stderr)
        assert "no line for row 1 in the last export" in result.stderr
        assert found and (int(found[1]), int(found[2])) == (11, 13), result.stderr
    else:
        found = _BY_PATH.search(result.stderr)
        assert found and (int(found[1]), int(found[2])) == (12, 13), result.stderr
    assert out.read_bytes() == _full_export(runner, out, tmp_path)
    if spoil in ("a link", "a fifo"):
        at.unlink()  # what the export put there instead is a regular file
    make_photo(photos / "d0" / "new2.jpg", seed=61)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    if spoil not in ("a link", "a fifo"):
        assert _BY_MAP.search(result.stderr), result.stderr


def test_a_map_whose_lines_do_not_end_where_it_says_is_refused(runner, tmp_path, tiny_model, indexed):
    # Same size, same mtime, same inode, other bytes: a block that does not end with a
    # newline stops the copy, and every record is written afresh.
    photos, out = indexed
    st = out.stat()
    data = out.read_bytes().replace(b"\n", b" ")
    with open(out, "r+b") as f:
        f.write(data)
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    make_photo(photos / "d0" / "new.jpg", seed=70)
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert f"cannot copy records from {out}" in result.stderr, result.stderr
    assert out.read_bytes() == _full_export(runner, out, tmp_path)


def _row(path: str, version: int, row_id: int):
    from sqlindexer.records import ExportRow

    vec = np.random.default_rng([version, row_id]).standard_normal(8).astype("<f4")
    return ExportRow(path, 100 + version, 10**18 + version, 10**18, 4, 3, None, vec.tobytes(), 8, row_id)


@pytest.mark.parametrize("seed", range(12))
def test_random_edits_written_by_the_map_are_the_full_export(tmp_path, seed):
    # Rows deleted, changed, added (some taking a deleted row's id) and renamed (a new path,
    # so a new place in the order): the blocks and rows plan() gives write the full export
    # byte for byte, and each unchanged line is copied, in as few blocks as the order allows.
    rnd = random.Random(seed)
    before = {i: _row(f"/p/{rnd.choice('abc')}/{i:04d}.jpg", 0, i) for i in range(1, 301)}
    previous, lengths = tmp_path / "previous.jsonl", line_map.Lengths()
    old_order = sorted(before.values(), key=lambda r: r.path)
    write_index(old_order, previous, "jsonl", lengths=lengths)
    old = line_map.LineMap(np.array([r.id for r in old_order]), lengths.ends())

    after, changed = {}, set()
    next_id = 301
    for i, row in before.items():
        roll = rnd.random()
        if roll < 0.05:
            continue  # deleted
        if roll < 0.15:
            after[i] = _row(row.path, 2, i)  # changed in place
            changed.add(i)
        elif roll < 0.25:
            after[i] = _renamed(row)
            changed.add(i)
        else:
            after[i] = row
    for _ in range(10):
        after[next_id] = _row(f"/p/b/{next_id:04d}n.jpg", 1, next_id)
        changed.add(next_id)
        next_id += 1
    for i in [i for i in before if i not in after][:3]:  # new rows taking the ids of deleted ones
        after[i] = _row(f"/p/c/{i:04d}r.jpg", 3, i)
        changed.add(i)
    new_order = sorted(after.values(), key=lambda r: r.path)
    ids = np.array([r.id for r in new_order], dtype=np.int64)
    flags = np.array([r.id in changed for r in new_order])
    entries = [e if isinstance(e, line_map.Block) else after[e] for e in line_map.plan(old, ids, flags)]
    assert sum(not isinstance(e, line_map.Block) for e in entries) == len(changed)

    out, full, new_lengths = tmp_path / "index.jsonl", tmp_path / "full.jsonl", line_map.Lengths()
    write_index(new_order, full, "jsonl")
    n = write_index(entries, out, "jsonl", previous=previous, lines=old, lengths=new_lengths,
                    load=lambda path: None)
    assert n == len(after) and out.read_bytes() == full.read_bytes()
    # The new lengths describe the new file; blocks are maximal runs of consecutive old lines.
    assert new_lengths.ends().tolist() == [i + 1 for i, c in enumerate(full.read_bytes()) if c == ord("\n")]
    where = {int(row_id): k for k, row_id in enumerate(old.ids)}
    kept = [where[r.id] if r.id not in changed else None for r in new_order]
    expected = sum(1 for k, line in enumerate(kept) if line is not None and (k == 0 or kept[k - 1] != line - 1))
    assert sum(isinstance(e, line_map.Block) for e in entries) == expected


def _renamed(row):
    from dataclasses import replace

    return replace(row, path=row.path.replace("/p/", "/p/moved/"), ctime_ns=row.ctime_ns + 1)


def test_an_unchanged_row_without_a_line_is_written_afresh():
    old = line_map.LineMap(np.array([3, 1]), np.array([10, 25]))
    got = list(line_map.plan(old, np.array([1, 2, 3]), np.array([False, False, False])))
    assert got == [line_map.Block(1, 2), 2, line_map.Block(0, 1)]


# -- stamps set by their writers -------------------------------------------------------
def _counters(conn: sqlite3.Connection) -> tuple[int, int]:
    got = dict(conn.execute("SELECT key, CAST(value AS INTEGER) FROM meta "
                            "WHERE key IN ('record_stamp', 'vectors_version')").fetchall())
    return got["record_stamp"], got["vectors_version"]


def test_a_writer_that_stamps_its_rows_moves_each_counter_once(tmp_path):
    from sqlindexer import content, db

    db.connect(tmp_path / "state.sqlite").close()
    with open_db(tmp_path / "state.sqlite") as conn:
        conn.isolation_level = None
        for name in "abc":
            conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding) "
                         "VALUES (?, 1, 1, 1, 'ok', 'm', 1, x'00000000')", (f"/p/{name}.jpg",))
        stamp, version = _counters(conn)
        conn.execute("BEGIN")
        new = content.own_stamp(conn, vectors=True)
        conn.execute("UPDATE files SET path = '/q/' || substr(path, 4), stamp = ?", (new,))
        conn.execute("COMMIT")
        assert _counters(conn) == (stamp + 1, version + 1) and new == stamp + 1
        assert [r[0] for r in conn.execute("SELECT stamp FROM files")] == [new] * 3
        # A statement that sets any other stamp is stamped and counted by the triggers.
        conn.execute("UPDATE files SET exif = '{}', stamp = 1 WHERE path = '/q/a.jpg'")
        assert _counters(conn) == (stamp + 2, version + 2)
        assert conn.execute("SELECT stamp FROM files WHERE path = '/q/a.jpg'").fetchone()[0] == stamp + 2
        # And so is a hand-made edit that leaves the stamp alone, even one already current.
        conn.execute("UPDATE files SET exif = '{\"a\": 1}' WHERE path = '/q/a.jpg'")
        assert _counters(conn) == (stamp + 3, version + 3)
        conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status) VALUES ('/q/z.jpg', 1, 1, 1, 'ok')")
        assert _counters(conn) == (stamp + 4, version + 4)


def test_renamed_rows_share_one_stamp_and_move_each_counter_once(runner, tmp_path, tiny_model, indexed):
    photos, out = indexed
    with open_db(out.with_suffix(".sqlite")) as conn:
        stamp, version = _counters(conn)
    (photos / "d0").rename(photos / "d0-moved")
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert "4 renamed" in result.stderr, result.stderr
    with open_db(out.with_suffix(".sqlite")) as conn:
        stamps = {r[0] for r in conn.execute("SELECT stamp FROM files WHERE path LIKE '%d0-moved%'")}
        after = _counters(conn)
    assert stamps == {stamp + 1} and after[0] == stamp + 1 and after[1] == version + 1, (stamps, after)


def test_a_row_copied_with_its_stamp_by_hand_is_still_stamped_and_counted(tmp_path):
    # INSERT ... SELECT of the newest row, stamp and all: the triggers must not take it for
    # a writer's own stamp (only move_renamed's pending rows are inserted that way).
    from sqlindexer import db

    db.connect(tmp_path / "state.sqlite").close()
    with open_db(tmp_path / "state.sqlite") as conn:
        conn.isolation_level = None
        conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding) "
                     "VALUES ('/p/a.jpg', 1, 1, 1, 'ok', 'm', 1, x'00000000')")
        stamp, version = _counters(conn)
        conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding, stamp) "
                     "SELECT '/p/b.jpg', size, mtime_ns, ctime_ns, status, model, dim, embedding, stamp FROM files")
        assert _counters(conn) == (stamp + 1, version + 1)
        assert conn.execute("SELECT stamp FROM files WHERE path = '/p/b.jpg'").fetchone()[0] == stamp + 1


def test_a_file_replaced_after_its_map_was_read_is_not_copied_by_it(tmp_path):
    # The map names the file it was read for; the file opened to copy from is checked
    # against it (an `export` to the same path may have replaced it in between).
    rows = [_row(f"/p/{i}.jpg", 0, i) for i in range(1, 4)]
    previous, lengths = tmp_path / "previous.jsonl", line_map.Lengths()
    write_index(rows, previous, "jsonl", lengths=lengths)
    st = previous.stat()
    old = line_map.LineMap(np.array([1, 2, 3]), lengths.ends(), (st.st_size, st.st_mtime_ns + 1, st.st_ino))
    with pytest.raises(ValueError, match="not the file its line map describes"):
        write_index([line_map.Block(0, 3)], tmp_path / "out.jsonl", "jsonl", previous=previous, lines=old,
                    load=lambda path: None)


@pytest.mark.parametrize("ids, refused", [([3, 1, 2], False), ([2, 1, 2], True), ([0, 1, 2], True),
                                          ([-5, 1, 2], True)])
def test_a_map_with_ids_no_export_writes_is_refused(tmp_path, ids, refused):
    # Row ids are positive and each has one line: a map that repeats an id or holds one
    # below 1 was not written by an export, whatever its header says.
    out = tmp_path / "index.jsonl"
    out.write_bytes(b"a\nbb\nccc\n")
    ident = line_map.identity("db", out, out.stat())
    where = tmp_path / "map"
    line_map.write(where, ident, line_map.LineMap(np.array(ids, dtype=np.int64), np.array([2, 5, 9], dtype=np.int64)))
    got = line_map.read(where, ident)
    assert (got is None) == refused
    if not refused:
        assert got.ids.tolist() == ids and got.ends.tolist() == [2, 5, 9]
