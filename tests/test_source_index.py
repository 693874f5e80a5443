"""--source-index: adopting the vectors of an existing index (the original tool's layout,
jsonl or pkl) for files that did not change, and refusing files that are not such an index."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from conftest import bump_mtime, make_photo, original_record, read_jsonl, read_pkl, run_cli

DIM = 32  # the tiny model's vector size


def _query(db: Path, sql: str, *params) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def _last_run(db: Path) -> dict:
    return _query(db, "SELECT * FROM runs ORDER BY id DESC LIMIT 1")[0]



def same_f32(a: list[float], b: list[float]) -> bool:
    """The same float32 values: jsonl writes each float32 in its shortest decimal form."""
    return np.array_equal(np.asarray(a, dtype="<f4"), np.asarray(b, dtype="<f4"))


def recognisable(i: int) -> list[float]:
    # Exactly representable in float32, and nothing a model would produce.
    return [(100 * (i + 1) + k) / 256 for k in range(DIM)]


def write_original_index(path: Path, records: list, fmt: str) -> None:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    else:
        with open(path, "wb") as f:
            for rec in records:
                pickle.dump(rec, f)


def read_index(path: Path) -> list[dict]:
    return read_pkl(path) if path.read_bytes()[:1] == b"\x80" else read_jsonl(path)


def _by_name(records: list[dict]) -> dict[str, dict]:
    return {r["metadata"]["filename"]: r for r in records}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for i in range(4):
        make_photo(tmp_path / "photos" / f"p{i}.jpg", seed=i)
    return tmp_path / "photos"


@pytest.mark.parametrize("fmt,suffix", [("jsonl", ".jsonl"), ("pkl", ".pkl"), ("jsonl", ".pkl"), ("pkl", ".jsonl")])
def test_source_index_vectors_kept_for_unchanged_files(runner, tmp_path, photos, tiny_model, fmt, suffix):
    records = [
        original_record(photos / "p0.jpg", recognisable(0), exif={"Make": "TestCam", "Model": "X1"}),
        original_record(photos / "p1.jpg", recognisable(1)),
        original_record(photos / "p2.jpg", recognisable(2)),
    ]
    gone = original_record(photos / "p3.jpg", recognisable(3))
    gone["metadata"]["path"] = str(photos / "deleted-since.jpg")
    records.append(gone)
    source = tmp_path / f"old_index{suffix}"
    write_original_index(source, records, fmt)
    bump_mtime(photos / "p2.jpg")  # modified since the old index: its vector must not be kept
    out, db = tmp_path / "new.jsonl", tmp_path / "new.sqlite"
    assert not db.exists()

    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex",
                              "--source-index", source])
    run = _last_run(db)
    assert (run["imported"], run["embedded"], run["decoded"], run["failed"]) == (2, 2, 2, 0), result.stderr
    assert (run["scanned"], run["new"], run["unchanged"], run["deleted"], run["exported"]) == (4, 2, 2, 0, 4)
    assert run["status"] == "completed"

    exported = _by_name(read_jsonl(out))
    assert sorted(exported) == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert same_f32(exported["p0.jpg"]["vector"], recognisable(0))
    assert same_f32(exported["p1.jpg"]["vector"], recognisable(1))
    assert exported["p0.jpg"]["metadata"]["exif"] == {"Make": "TestCam", "Model": "X1"}
    for name in ("p2.jpg", "p3.jpg"):
        vec = np.asarray(exported[name]["vector"])
        assert vec.shape == (DIM,)
        assert abs(np.linalg.norm(vec) - 1) < 1e-3  # a model's (normalised) vector, not one from the file
        assert not np.allclose(vec, recognisable(2))
    rows = {Path(r["path"]).name: r for r in _query(db, "SELECT * FROM files")}
    assert rows["p0.jpg"]["embedding"] == np.asarray(recognisable(0), dtype="<f4").tobytes()
    assert rows["p0.jpg"]["dim"] == DIM and rows["p0.jpg"]["model"] == str(tiny_model)
    assert rows["p0.jpg"]["mtime_ns"] == (photos / "p0.jpg").stat().st_mtime_ns

    # The imported vectors are the database's now: a later reindex keeps them and embeds nothing.
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex"])
    run = _last_run(db)
    assert (run["embedded"], run["decoded"], run["imported"]) == (0, 0, 0)
    assert same_f32(_by_name(read_jsonl(out))["p1.jpg"]["vector"], recognisable(1))


@pytest.mark.parametrize("fmt", ["jsonl", "pkl"])
def test_default_source_index_is_the_output_file(runner, tmp_path, photos, tiny_model, fmt):
    # An index written by the original tool, at -o, and no working database yet: --reindex
    # upgrades it without embedding anything.
    out = tmp_path / f"index.{fmt}"
    originals = [original_record(photos / f"p{i}.jpg", recognisable(i)) for i in range(4)]
    write_original_index(out, originals, fmt)
    db = tmp_path / "index.sqlite"
    assert not db.exists()

    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex"])
    run = _last_run(db)
    assert (run["imported"], run["embedded"], run["decoded"], run["new"], run["unchanged"]) == (4, 0, 0, 0, 4), \
        result.stderr
    assert "exported 4" in result.stderr
    upgraded = read_index(out)
    assert (out.read_bytes()[:1] == b"\x80") == (fmt == "pkl")
    assert len(upgraded) == 4
    assert all(same_f32(r["vector"], recognisable(i)) for i, r in enumerate(upgraded))
    assert [list(r) for r in upgraded] == [["vector", "metadata"]] * 4
    for rec, orig in zip(upgraded, originals):
        meta, want = rec["metadata"], orig["metadata"]
        for key in ("path", "filename", "size_bytes", "modification_time", "width", "height"):
            assert meta[key] == want[key], key

    # A full build (no --reindex) embeds every image with the model instead.
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model])
    assert _last_run(db)["embedded"] == 4
    for i, rec in enumerate(read_index(out)):
        assert not np.allclose(rec["vector"], recognisable(i))


class _Evil:
    """Unpickling this calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _foreign_source(case: str, path: Path, valid: dict) -> None:
    """Write a file that is not an image-indexer index, after a first record that is valid."""
    if case == "foreign-json-record":
        path.write_text(json.dumps(valid) + "\n" + json.dumps({"foo": 1}) + "\n", encoding="utf-8")
    elif case == "not-json":
        path.write_text("hello, this is not an index at all\n", encoding="utf-8")
    elif case == "broken-json-line":
        path.write_text(json.dumps(valid) + "\n{not json\n", encoding="utf-8")
    elif case == "vector-of-strings":
        bad = json.loads(json.dumps(valid))
        bad["vector"] = ["a"] * DIM
        path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
    elif case == "json-list":
        path.write_text(json.dumps([valid]) + "\n", encoding="utf-8")
    elif case == "pkl-class-object":
        bad = json.loads(json.dumps(valid))
        bad["metadata"]["path"] = PurePosixPath(bad["metadata"]["path"])
        with open(path, "wb") as f:
            pickle.dump(valid, f)
            pickle.dump(bad, f)
    elif case == "pkl-truncated":
        data = pickle.dumps(valid) + pickle.dumps(valid)
        path.write_bytes(data[:-7])
    else:
        raise AssertionError(case)


FOREIGN = ["foreign-json-record", "not-json", "broken-json-line", "vector-of-strings", "json-list",
           "pkl-class-object", "pkl-truncated"]


@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_source_index_is_refused(runner, tmp_path, photos, tiny_model, case):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model])
    before_out = out.read_bytes()
    before_rows = _query(db, "SELECT * FROM files ORDER BY path")
    source = tmp_path / "foreign.idx"
    _foreign_source(case, source, original_record(photos / "p0.jpg", recognisable(0)))
    make_photo(photos / "new.jpg", seed=7)  # work that the refused run must not do

    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex",
                              "--source-index", source], ok=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(source) in errors[0], result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    assert out.read_bytes() == before_out
    assert not (tmp_path / "index.jsonl.tmp").exists()
    assert _query(db, "SELECT * FROM files ORDER BY path") == before_rows
    run = _last_run(db)
    assert (run["status"], run["imported"], run["embedded"]) == ("failed", 0, 0)


def test_foreign_output_file_is_not_overwritten(runner, tmp_path, photos, tiny_model):
    # The default source index is the output file: a file there that is not an index
    # (someone else's jsonl) is refused rather than read as an empty index and replaced.
    out = tmp_path / "notes.jsonl"
    out.write_text('{"foo": 1}\n{"bar": 2}\n', encoding="utf-8")
    before = out.read_bytes()
    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex"], ok=False)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "not an image-indexer index" in errors[0]
    assert out.read_bytes() == before


@pytest.mark.parametrize("name", ["evil.pkl", "evil.jsonl"])
def test_malicious_pickle_does_not_run(runner, tmp_path, photos, tiny_model, name):
    marker = tmp_path / "marker-created-by-pickle"
    source = tmp_path / name
    with open(source, "wb") as f:
        pickle.dump(original_record(photos / "p0.jpg", recognisable(0)), f)
        pickle.dump({"vector": recognisable(1), "metadata": _Evil(marker)}, f)
    assert b"system" in source.read_bytes()  # the payload is really in the file
    out = tmp_path / "index.jsonl"
    out.write_bytes(b"")  # an (empty) index that must stay as it is

    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex",
                              "--source-index", source], ok=False)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(source) in errors[0], result.stderr
    assert "system" in errors[0]
    assert not marker.exists()
    assert out.read_bytes() == b""
    # And the payload is real: a plain pickle.load would have run it.
    with open(source, "rb") as f:
        pickle.load(f)
        pickle.load(f)
    assert marker.exists()


def test_missing_source_index_is_a_clear_error(runner, tmp_path, photos, tiny_model):
    result = run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", tiny_model,
                              "--reindex", "--source-index", tmp_path / "old.pkl"], ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: source index {tmp_path / 'old.pkl'} does not exist"
    assert not (tmp_path / "index.sqlite").exists()
    assert not (tmp_path / "index.jsonl").exists()
