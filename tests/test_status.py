"""status and export: reports and index files from the working database alone, with no
model (its folder deleted), no torch, a database that a writer holds open, and the errors
they report in one line."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_jsonl, read_pkl, run_cli

from sqlindexer import db

from test_search import noise_photo

N_OK = 3


@pytest.fixture
def indexed(runner, tmp_path, tiny_model) -> dict:
    """Three photos and two broken files indexed with a copy of the tiny model whose folder
    is then deleted: nothing below may need the model."""
    model = tmp_path / "model-copy"
    shutil.copytree(tiny_model, model)
    photos = tmp_path / "photos"
    for seed in range(N_OK):
        noise_photo(photos / f"p{seed}.jpg", seed)
    (photos / "broken.jpg").write_bytes(b"this is not a jpeg" * 10)
    data = (photos / "p0.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "index.jsonl"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", model, "--workers", "0"])
    shutil.rmtree(model)
    return {"db": tmp_path / "index.sqlite", "out": out, "model": str(model), "photos": photos}


def test_status_json_without_the_model(runner, indexed):
    info = json.loads(run_cli(runner, ["status", "--db", indexed["db"]]).stdout)  # not a terminal: JSON
    assert info["database"] == str(indexed["db"])
    assert info["size_bytes"] >= indexed["db"].stat().st_size > 0
    assert info["schema_version"] == db.schema_version()
    assert info["images"] == {"ok": N_OK, "failed": 2, "pending": 0, "total": N_OK + 2}
    assert sum(f["files"] for f in info["failed"]) == 2 and all(f["error"] for f in info["failed"])
    assert info["models"] == [{"model": indexed["model"], "dim": 32, "vectors": N_OK}]
    [run] = info["runs"]
    assert (run["id"], run["mode"], run["status"], run["model"]) == (1, "full", "completed", indexed["model"])
    assert (run["scanned"], run["new"], run["embedded"], run["failed"], run["exported"]) == (5, 5, N_OK, 2, N_OK)
    assert run["seconds"] is not None and run["seconds"] >= 0


def test_status_table(runner, indexed):
    text = run_cli(runner, ["status", "--db", indexed["db"], "--table"]).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"database  {indexed['db']} (") and lines[0].endswith(f"schema {db.schema_version()})")
    assert lines[1] == f"images    5: {N_OK} ok, 2 failed, 0 pending"
    assert lines[2].startswith("failed") and lines[3].startswith(" " * 8)
    assert lines[4] == f"vectors   {N_OK} x 32-d  {indexed['model']}"
    assert lines[5] == "runs"
    assert lines[6].split()[:4] == ["id", "mode", "status", "started"]
    assert lines[7].split()[:3] == ["1", "full", "completed"]


def test_status_of_a_fresh_database(runner, tmp_path):
    fresh = tmp_path / "fresh.sqlite"
    db.connect(fresh).close()
    info = json.loads(run_cli(runner, ["status", "--db", fresh, "--json"]).stdout)
    assert info["images"] == {"ok": 0, "failed": 0, "pending": 0, "total": 0}
    assert info["models"] == [] and info["runs"] == [] and info["failed"] == []
    text = run_cli(runner, ["status", "--db", fresh, "--table"]).stdout
    assert "vectors   none" in text and "runs      none" in text


def test_status_sees_what_a_writer_committed_to_the_wal(runner, indexed):
    writer = sqlite3.connect(indexed["db"], isolation_level=None)
    try:
        writer.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns) VALUES ('/new.jpg', 1, 1, 1)")
        assert Path(str(indexed["db"]) + "-wal").stat().st_size > 0  # not checkpointed: only in the -wal
        info = json.loads(run_cli(runner, ["status", "--db", indexed["db"]]).stdout)
        assert info["images"]["pending"] == 1
    finally:
        writer.close()


def test_export_without_the_model_equals_the_index_export(runner, indexed, tmp_path):
    out = tmp_path / "again.jsonl"
    result = run_cli(runner, ["export", "--db", indexed["db"], "-o", out])
    assert out.read_bytes() == indexed["out"].read_bytes()
    assert f"exported {N_OK} images" in result.stderr
    assert not Path(str(out) + ".tmp").exists()

    pkl = tmp_path / "again.pkl"
    run_cli(runner, ["export", "--db", indexed["db"], "-o", pkl])
    records, expected = read_pkl(pkl), read_jsonl(indexed["out"])
    assert [r["metadata"] for r in records] == [e["metadata"] for e in expected]
    for r, e in zip(records, expected):
        np.testing.assert_array_equal(np.float32(r["vector"]), np.float32(e["vector"]))
    forced = tmp_path / "forced.bin"
    run_cli(runner, ["export", "--db", indexed["db"], "-o", forced, "--output-format", "pkl"])
    assert len(read_pkl(forced)) == N_OK


def test_export_chooses_the_model(runner, indexed, tmp_path):
    conn = sqlite3.connect(indexed["db"])
    conn.execute("UPDATE files SET model = 'another/model' WHERE path LIKE '%/p0.jpg'")
    conn.commit()
    conn.close()
    out = tmp_path / "out.jsonl"
    result = run_cli(runner, ["export", "--db", indexed["db"], "-o", out], ok=False)
    assert result.exit_code == 1 and "--model-name" in result.stderr and not out.exists()
    run_cli(runner, ["export", "--db", indexed["db"], "-o", out, "--model-name", "another/model"])
    assert [Path(r["metadata"]["path"]).name for r in read_jsonl(out)] == ["p0.jpg"]


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_export_errors(runner, indexed, tmp_path):
    dbp = indexed["db"]
    cases = [
        (["-o", tmp_path], "is a directory"),
        (["-o", tmp_path / "no" / "such" / "out.jsonl"], "does not exist"),
        (["-o", dbp], "is the working database"),
        (["-o", tmp_path / "x.jsonl", "--model-name", "nope/model"], "no vectors of model nope/model"),
    ]
    for args, message in cases:
        result = run_cli(runner, ["export", "--db", dbp, *args], ok=False)
        assert result.exit_code == 1, args
        assert message in _one_line(result), args
    assert not (tmp_path / "x.jsonl").exists()
    missing = tmp_path / "missing.sqlite"
    for command in (["export", "-o", tmp_path / "y.jsonl"], ["status"]):
        result = run_cli(runner, [*command, "--db", missing], ok=False)
        assert result.exit_code == 1 and "does not exist" in _one_line(result)
    assert not missing.exists() and not (tmp_path / "y.jsonl").exists()


def test_status_and_export_import_neither_torch_nor_transformers(indexed, tmp_path):
    out = tmp_path / "probe.jsonl"
    calls = [["status", "--db", str(indexed["db"]), "--json"], ["status", "--db", str(indexed["db"]), "--table"],
             ["export", "--db", str(indexed["db"]), "-o", str(out)]]
    probe = (
        "import sys\n"
        "from sqlindexer.cli import cli\n"
        f"for args in {calls!r}:\n"
        "    try:\n"
        "        cli(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
    assert out.read_bytes() == indexed["out"].read_bytes()
