"""Damaged state: a working database whose pages are corrupt, a database and an output
folder on a read-only file system. Each gives one clear line and a non-zero status; a
read-only output folder is refused before any model is loaded. (A file that is not SQLite
and a newer schema: test_migrations.py.)

Read-only is a read-only tmpfs (root can write through chmod, not through a read-only
mount); those tests skip without root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli_subprocess, make_photo, mounted_tmpfs, run_cli


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def photos(tmp_path) -> Path:
    for i in range(4):
        make_photo(tmp_path / "photos" / f"p{i}.jpg", seed=i)
    return tmp_path / "photos"


def test_corrupt_database_pages_are_a_one_line_error(runner, tmp_path, photos, tiny_model):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"]
    run_cli(runner, args)
    index = out.read_bytes()
    page = 4096
    data = bytearray(db.read_bytes())
    assert len(data) > 3 * page
    # Pages 2 and on hold the tables and indexes; the header (page 1) is left intact, so
    # the file still opens as SQLite and the damage shows when the tables are read.
    data[page: len(data)] = os.urandom(len(data) - page)
    db.write_bytes(bytes(data))
    line = _one_line(cli_subprocess(*args, "--reindex"))
    assert str(db) in line and "malformed" in line, line
    assert out.read_bytes() == index, "the index was rewritten from a corrupt database"
    assert db.read_bytes() == bytes(data), "the corrupt database was written to"


@pytest.fixture
def readonly_fs(tmp_path):
    """A tmpfs to fill, then remounted read-only; unmounted at the end."""
    with mounted_tmpfs(tmp_path / "ro", "size=8m") as mnt:

        def make_readonly() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)

        yield mnt, make_readonly


def test_database_on_a_read_only_file_system(runner, tmp_path, photos, tiny_model, readonly_fs):
    mnt, make_readonly = readonly_fs
    out = tmp_path / "index.jsonl"
    built = tmp_path / "built.sqlite"
    run_cli(runner, ["-i", photos, "-o", out, "--state-db", built, "--model-name", tiny_model, "--workers", "0"])
    shutil.copy2(built, mnt / "index.sqlite")
    before = (mnt / "index.sqlite").read_bytes()
    make_readonly()
    result = cli_subprocess("-i", photos, "-o", out, "--state-db", mnt / "index.sqlite", "--model-name",
                            tiny_model, "--reindex")
    line = _one_line(result)
    assert str(mnt) in line and "Read-only file system" in line, line
    assert (mnt / "index.sqlite").read_bytes() == before


def test_output_folder_on_a_read_only_file_system_fails_before_the_model(tmp_path, photos, readonly_fs):
    mnt, make_readonly = readonly_fs
    make_readonly()
    # The model folder does not exist: an error about it would mean it was looked at first.
    result = cli_subprocess("-i", photos, "-o", mnt / "index.jsonl", "--state-db", tmp_path / "state.sqlite",
                            "--model-name", tmp_path / "no-model")
    line = _one_line(result)
    assert "not writable" in line and str(mnt / "index.jsonl") in line, line
    assert not (tmp_path / "state.sqlite").exists()
