"""The shared corpus of real image files, indexed once through the CLI: every good file gets
one record with the right size and EXIF, every broken one is recorded as failed without
stopping the run."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_cli
from sqlindexer.scan import IMAGE_EXTENSIONS

HIDDEN = "real/naming/.hidden_dir/hidden.png"
META_KEYS = {"path", "filename", "size_bytes", "creation_time", "modification_time", "width", "height", "exif"}
SUMMARY = re.compile(
    r"^scanned (\d+), new (\d+), modified (\d+), unchanged (\d+), deleted (\d+), failed (\d+), "
    r"exported (\d+) in [\d.]+ s$"
)


class Run:
    """One CLI run: its result, the exported records (by corpus-relative path) and the
    `files` rows of its working database."""

    @classmethod
    def index(cls, corpus: Path, folder: Path, out_dir: Path, model: Path, *extra: str) -> Run:
        out = out_dir / "index.jsonl"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("HF_HOME", str(out_dir / "hf-home"))
            return cls(corpus, out, run_cli(CliRunner(), ["-i", folder, "-o", out, "--model-name", model, *extra]))

    def __init__(self, corpus: Path, out: Path, result) -> None:
        self.result = result
        self.lines = out.read_text(encoding="utf-8").splitlines()
        self.record_list = [json.loads(line) for line in self.lines]
        self.records = {rel(corpus, r["metadata"]["path"]): r for r in self.record_list}
        conn = sqlite3.connect(out.with_suffix(".sqlite"))
        conn.row_factory = sqlite3.Row
        self.files = {rel(corpus, row["path"]): dict(row) for row in conn.execute("SELECT * FROM files")}
        conn.close()
        summary = self.result.stderr.strip().splitlines()[-1]
        m = SUMMARY.match(summary)
        assert m, summary
        keys = ("scanned", "new", "modified", "unchanged", "deleted", "failed", "exported")
        self.counts = dict(zip(keys, map(int, m.groups())))


def rel(corpus: Path, path: str) -> str:
    return Path(path).relative_to(corpus).as_posix()


@pytest.fixture(scope="module")
def real_run(corpus, real_corpus_index) -> Run:
    return Run(corpus, *real_corpus_index)


@pytest.fixture(scope="module")
def bad_run(corpus, tiny_model, tmp_path_factory) -> Run:
    return Run.index(corpus, corpus / "bad", tmp_path_factory.mktemp("corpus-bad"), tiny_model)


def real_rows(manifest) -> dict[str, dict]:
    return {p: row for p, row in manifest.items() if p.startswith("real/")}


def displayed_size(row: dict) -> tuple[int, int]:
    """The manifest's size is before EXIF orientation; Pillow's TIFF reader applies it itself."""
    w, h = int(row["width"]), int(row["height"])
    if row["orientation"] in ("5", "6", "7", "8") and row["format"] != "TIFF":
        return h, w
    return w, h


# -- real/ -----------------------------------------------------------------------------
def test_manifest_is_what_the_tests_expect(manifest):
    real = real_rows(manifest)
    assert len(real) == 292
    assert HIDDEN in real
    assert all(row["load_status"].startswith("ok") for row in real.values())


def test_every_real_file_indexed_once(real_run, manifest):
    real = real_rows(manifest)
    assert sorted(real_run.records) == sorted(real)
    assert len(real_run.record_list) == len(real) == 292  # no duplicates
    assert set(real_run.files) == set(real)
    assert {row["status"] for row in real_run.files.values()} == {"ok"}
    assert all(row["error"] is None for row in real_run.files.values())
    c = real_run.counts
    assert (c["scanned"], c["new"], c["failed"], c["exported"]) == (292, 292, 0, 292)


def test_sizes_are_upright_sizes(real_run, manifest):
    wrong = {}
    for path, row in real_rows(manifest).items():
        meta = real_run.records[path]["metadata"]
        got = (meta["width"], meta["height"])
        db_row = real_run.files[path]
        assert (db_row["width"], db_row["height"]) == got
        if got != displayed_size(row):
            wrong[path] = (got, displayed_size(row), row["format"], row["orientation"])
    assert not wrong, wrong
    # The orientation cases really are there (and TIFF's exception to the swap).
    rotated = [r for r in real_rows(manifest).values() if r["orientation"] in ("5", "6", "7", "8")]
    assert {r["format"] for r in rotated} >= {"JPEG", "TIFF", "WEBP", "AVIF"}


def test_record_layout(real_run, corpus):
    dims = set()
    for line, record in zip(real_run.lines, real_run.record_list):
        assert line.startswith("{") and line.endswith("}")
        assert set(record) == {"vector", "metadata"}
        meta = record["metadata"]
        assert set(meta) == META_KEYS
        assert Path(meta["path"]).is_absolute() and Path(meta["path"]).is_file()
        assert meta["filename"] == Path(meta["path"]).name
        assert meta["size_bytes"] == Path(meta["path"]).stat().st_size
        assert isinstance(meta["width"], int) and isinstance(meta["height"], int)
        assert isinstance(meta["exif"], dict)
        json.dumps(meta["exif"], allow_nan=False)
        v = record["vector"]
        assert isinstance(v, list) and all(type(x) is float for x in v)
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4)
        dims.add(len(v))
    assert len(dims) == 1
    paths = [r["metadata"]["path"] for r in real_run.record_list]
    assert paths == sorted(paths)


def test_exif_present_where_the_manifest_says(real_run, manifest):
    real = real_rows(manifest)
    missing = [p for p, row in real.items()
               if row["has_exif"] == "True" and not real_run.records[p]["metadata"]["exif"]]
    assert not missing
    for fmt in ("HEIF", "TIFF", "JPEG", "PNG", "WEBP", "AVIF"):
        with_exif = [p for p, row in real.items() if row["format"] == fmt and row["has_exif"] == "True"]
        assert with_exif, fmt
        assert any(real_run.records[p]["metadata"]["exif"] for p in with_exif), fmt


def test_make_model_and_date_match_manifest(real_run, manifest):
    # make_model is Make and Model joined by one space, as Pillow reads them.
    checked = 0
    for path, row in real_rows(manifest).items():
        exif = real_run.records[path]["metadata"]["exif"]
        if row["make_model"]:
            assert f"{exif.get('Make')} {exif.get('Model')}" == row["make_model"], path
            checked += 1
        if row["datetime_original"]:
            assert exif["ExifOffset"]["DateTimeOriginal"] == row["datetime_original"], path
    assert checked >= 50
    formats = {row["format"] for row in real_rows(manifest).values() if row["make_model"]}
    assert {"JPEG", "HEIF", "TIFF"} <= formats


def _no_python_reprs(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _no_python_reprs(v, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _no_python_reprs(v, where)
    elif isinstance(value, str):
        assert not re.match(r"^(b'|b\"|\(.*,.*\)$|IFDRational)", value), (where, value)
    else:
        assert value is None or type(value) in (int, float, bool), (where, value)


def test_gps_is_nested_json(real_run, manifest):
    with_gps = [p for p, row in real_rows(manifest).items() if row["gps"] == "True"]
    assert len(with_gps) >= 5
    triples = 0
    for path in with_gps:
        gps = real_run.records[path]["metadata"]["exif"]["GPSInfo"]
        assert isinstance(gps, dict) and gps, path
        _no_python_reprs(gps, path)
        for key in ("GPSLatitude", "GPSLongitude"):
            value = gps.get(key)
            if isinstance(value, list):
                assert len(value) == 3 and all(type(x) is float for x in value), (path, value)
                triples += 1
            else:
                assert value is None or type(value) is float, (path, value)
    assert triples >= 10
    # One known value: the Stonehenge HEIC.
    stonehenge = real_run.records["real/heic/exiv2/Stonehenge.heic"]["metadata"]["exif"]["GPSInfo"]
    assert stonehenge["GPSLatitudeRef"] == "N" and stonehenge["GPSLongitudeRef"] == "W"
    assert stonehenge["GPSLatitude"] == pytest.approx([51.0, 10.0, 41.81])


def test_all_exif_is_plain_json(real_run):
    for path, record in real_run.records.items():
        _no_python_reprs(record["metadata"]["exif"], path)


def test_hidden_file_only_with_include_hidden(real_run, corpus, tiny_model, tmp_path_factory):
    assert HIDDEN in real_run.records
    # Without the flag, on the folder that holds the hidden one (a small run).
    naming = Run.index(corpus, corpus / "real" / "naming", tmp_path_factory.mktemp("corpus-naming"), tiny_model)
    expected = sorted(p for p in real_run.records if p.startswith("real/naming/") and p != HIDDEN)
    assert len(expected) == 6
    assert sorted(naming.records) == expected
    assert HIDDEN not in naming.files
    assert naming.counts["scanned"] == 6
    # The same files give the same vectors whatever else is in their batch: to float32's
    # rounding, or within bfloat16's tolerance (README: cosine 0.999) where the default
    # choice for this CPU computes in bfloat16.
    for p in expected:
        a, b = naming.records[p]["vector"], real_run.records[p]["vector"]
        cosine = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        assert cosine >= 0.999, (p, cosine)


# -- bad/ ------------------------------------------------------------------------------
def bad_rows(manifest) -> dict[str, dict]:
    return {p: row for p, row in manifest.items()
            if p.startswith("bad/") and Path(p).suffix.lower() in IMAGE_EXTENSIONS}


def test_bad_files_recorded_failed_or_ok(bad_run, manifest):
    rows = bad_rows(manifest)
    skipped = {p for p in manifest if p.startswith("bad/")} - set(rows)
    assert {Path(p).suffix for p in skipped} == {".ico", ".jxl"}
    assert set(bad_run.files) == set(rows)
    mismatched = {}
    for path, row in rows.items():
        db_row = bad_run.files[path]
        should_load = row["load_status"].startswith("ok")
        if should_load:
            ok = db_row["status"] == "ok" and db_row["error"] is None and path in bad_run.records
        else:
            ok = db_row["status"] == "failed" and bool(db_row["error"]) and path not in bad_run.records
        if not ok:
            mismatched[path] = (row["format"][:60], row["load_status"][:60], db_row["status"], db_row["error"])
    assert not mismatched, mismatched
    # Both kinds are there.
    n_failed = sum(not row["load_status"].startswith("ok") for row in rows.values())
    assert 0 < n_failed < len(rows)


def test_bad_run_exits_0_and_counts_failures(bad_run, manifest):
    rows = bad_rows(manifest)
    n_failed = sum(not row["load_status"].startswith("ok") for row in rows.values())
    assert bad_run.result.exit_code == 0
    c = bad_run.counts
    expected = (len(rows), len(rows), n_failed, len(rows) - n_failed)
    assert (c["scanned"], c["new"], c["failed"], c["exported"]) == expected
    assert len(bad_run.records) == len(rows) - n_failed
    # Each failure is logged once with its file and reason, and there is no traceback.
    assert "Traceback" not in bad_run.result.stderr
    warned = [line for line in bad_run.result.stderr.splitlines() if line.startswith("WARNING: skipping ")]
    assert len(warned) == n_failed
    for path, row in rows.items():
        if not row["load_status"].startswith("ok"):
            assert sum(f"/{path}: " in line for line in warned) == 1, path


def test_bad_files_that_load_are_indexed_properly(bad_run, manifest):
    for path, row in bad_rows(manifest).items():
        if row["load_status"].startswith("ok"):
            record = bad_run.records[path]
            assert (record["metadata"]["width"], record["metadata"]["height"]) == displayed_size(row), path
            assert math.isclose(sum(x * x for x in record["vector"]), 1.0, abs_tol=1e-4)


def test_decompression_bombs_fail_with_reason(bad_run, manifest):
    bombs = [p for p, row in bad_rows(manifest).items()
             if p.startswith("bad/bomb/") and not row["load_status"].startswith("ok")]
    assert bombs
    for path in bombs:
        assert bad_run.files[path]["status"] == "failed"
    heif = bad_run.files["bad/bomb/pillow_heif_200MP.heic"]["error"]
    assert "decompression bomb" in heif
