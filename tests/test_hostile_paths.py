"""Hostile paths: names that are not UTF-8, names of the longest length a file system
allows, folders nested past PATH_MAX. Each is either indexed with its path exactly as it is
on disk in every output, or skipped with a warning that names it; never a crash, never a
half-written line. (Names with newlines, quotes and SQL round-trip: test_security.py::
test_hostile_file_names_round_trip.)
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from conftest import make_photo, read_jsonl, run_cli


def _index_lines(out: Path) -> list[dict]:
    data = out.read_bytes()
    assert data.endswith(b"\n")
    text = data.decode("utf-8")  # strict: the index is UTF-8 throughout
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _db_paths(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return sorted(r[0] for r in conn.execute("SELECT path FROM files"))
    finally:
        conn.close()


def test_name_that_is_not_utf8_is_skipped_with_a_warning_naming_it(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    good = make_photo(photos / "good.jpg", seed=1)
    raw = os.path.join(os.fsencode(photos), b"bad-\xff\xfe.jpg")
    make_photo(Path(os.fsdecode(raw)), seed=2)
    assert os.path.exists(raw)
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"]
    for extra in ([], ["--reindex"]):
        result = run_cli(runner, [*args, *extra])
        warnings = [line for line in result.stderr.splitlines() if "not valid UTF-8" in line]
        assert len(warnings) == 1, result.stderr
        # Named as Python writes a path it could not decode: each bad byte as \udcXX.
        assert repr(os.fsdecode(raw)) in warnings[0] and "\\udcff\\udcfe" in warnings[0], warnings[0]
        assert [r["metadata"]["path"] for r in _index_lines(out)] == [str(good)]
        assert _db_paths(db) == [str(good)]


def test_longest_names_are_indexed_exactly(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    names = [
        "a" * 251 + ".jpg",  # 255 bytes, NAME_MAX
        "é" * 125 + ".jpg",  # 254 bytes of UTF-8 in 129 characters
        "写" * 83 + ".jpg",  # 253 bytes
    ]
    folder = photos / ("d" * 255)
    paths = [make_photo(folder / name, seed=i) for i, name in enumerate(names)]
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "1"])
    records = _index_lines(out)
    assert sorted(r["metadata"]["path"] for r in records) == sorted(map(str, paths))
    assert sorted(r["metadata"]["filename"] for r in records) == sorted(names)
    assert _db_paths(db) == sorted(map(str, paths))
    for r in records:
        assert os.path.exists(r["metadata"]["path"])


def _deep_folder(root: Path, depth: int, part: str) -> bytes:
    """Create root/part/part/... depth levels deep, longer than PATH_MAX, and return the
    full path as bytes (only reachable step by step, with dir_fd)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(part, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        img = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        with open(make_photo(root.parent / "template.jpg", seed=7), "rb") as f:
            os.write(img, f.read())
        os.close(img)
    finally:
        os.close(fd)
    return os.fsencode(root) + (b"/" + part.encode()) * depth


def test_folders_nested_past_path_max_are_reported_not_fatal(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    shallow = make_photo(photos / "shallow.jpg", seed=3)
    deep = _deep_folder(photos, 20, "x" * 250)
    assert len(deep) > os.pathconf("/", "PC_PATH_MAX")
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"])
    # The walk cannot go where no path reaches: one warning names the folder it stopped at.
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "File name too long" in warnings[0], result.stderr
    assert "x" * 250 in warnings[0]
    assert [r["metadata"]["path"] for r in read_jsonl(out)] == [str(shallow)]
    assert _db_paths(db) == [str(shallow)]
