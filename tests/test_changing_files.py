"""Files that change under a run, between the scan and the decode: deleted, truncated,
replaced, renamed. The run must not crash, must record each one as what it is, and must
never attach a vector to content it did not scan; the next run sets everything right.

The changes are made at the one moment that is always between the scan and the first
decode: when the run builds its embedder (the real model, created by run_index's
embedder_factory; the decoding then happens in a worker process).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

from conftest import make_photo, read_jsonl

from sqlindexer import config as cfg
from sqlindexer.run import run_index


def _config(photos: Path, out: Path, model: Path, **extra) -> cfg.Config:
    return cfg.build(None, dict(input_dirs=(str(photos),), output_file=str(out), model_name=str(model), workers=1,
                                batch_size=4, **extra))


def _changing(change):
    """An embedder factory that first changes the files, then builds the real Embedder."""
    from sqlindexer.embed import Embedder

    def make(*args, **kwargs):
        change()
        return Embedder(*args, **kwargs)

    return make


def _rows(db: Path) -> dict[str, tuple]:
    conn = sqlite3.connect(db)
    try:
        return {Path(p).name: (status, error, emb) for p, status, error, emb in
                conn.execute("SELECT path, status, error, embedding FROM files")}
    finally:
        conn.close()


def _vectors(out: Path) -> dict[str, np.ndarray]:
    return {Path(r["metadata"]["path"]).name: np.asarray(r["vector"], dtype=np.float32) for r in read_jsonl(out)}


def test_files_changed_between_scan_and_decode(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i, name in enumerate(["keep", "deleted", "truncated", "replaced", "renamed"]):
        make_photo(photos / f"{name}.jpg", size=(80, 60), seed=i, color=(40 * i, 100, 200))
    replacement = make_photo(tmp_path / "elsewhere" / "replacement.jpg", size=(60, 80), seed=9, color=(5, 5, 5))
    # What each content embeds to, indexed on its own, for comparison.
    ref_out = tmp_path / "ref" / "index.jsonl"
    ref_out.parent.mkdir()
    run_index(_config(photos, ref_out, tiny_model))
    (tmp_path / "elsewhere" / "x").mkdir()
    run_index(_config(tmp_path / "elsewhere", tmp_path / "elsewhere" / "x" / "index.jsonl", tiny_model))
    reference = _vectors(ref_out) | _vectors(tmp_path / "elsewhere" / "x" / "index.jsonl")

    def change() -> None:
        (photos / "deleted.jpg").unlink()
        data = (photos / "truncated.jpg").read_bytes()
        (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
        os.replace(replacement, photos / "replaced.jpg")  # another image, another size, a new mtime
        os.rename(photos / "renamed.jpg", photos / "renamed-to.jpg")

    out = tmp_path / "out" / "index.jsonl"
    out.parent.mkdir()
    summary = run_index(_config(photos, out, tiny_model), embedder_factory=_changing(change))
    assert summary.counts["scanned"] == 5
    rows = _rows(summary.state_db)
    # The file that did not change is indexed; the others carry no vector from this run.
    assert rows["keep.jpg"][0] == "ok"
    assert rows["deleted.jpg"][:2] == ("failed", "file disappeared before it was read")
    assert rows["renamed.jpg"][:2] == ("failed", "file disappeared before it was read")
    # Changed since the scan: left pending, for the next run to read as it is now.
    assert rows["truncated.jpg"] == ("pending", None, None)
    assert rows["replaced.jpg"] == ("pending", None, None)
    assert "renamed-to.jpg" not in rows  # not there when the scan ran
    assert list(_vectors(out)) == ["keep.jpg"]

    # The next run: each file as it is now.
    summary = run_index(_config(photos, out, tiny_model, reindex=True))
    rows = _rows(summary.state_db)
    assert set(rows) == {"keep.jpg", "truncated.jpg", "replaced.jpg", "renamed-to.jpg"}
    assert rows["truncated.jpg"][0] == "failed" and "truncated" in rows["truncated.jpg"][1].lower()
    assert rows["replaced.jpg"][0] == rows["renamed-to.jpg"][0] == "ok"
    vectors = _vectors(out)
    assert sorted(vectors) == ["keep.jpg", "renamed-to.jpg", "replaced.jpg"]
    # Each vector is that of the content now at the path.
    np.testing.assert_allclose(vectors["replaced.jpg"], reference["replacement.jpg"], atol=1e-5)
    np.testing.assert_allclose(vectors["renamed-to.jpg"], reference["renamed.jpg"], atol=1e-5)
    np.testing.assert_allclose(vectors["keep.jpg"], reference["keep.jpg"], atol=1e-5)
    assert not np.allclose(reference["replacement.jpg"], reference["replaced.jpg"], atol=1e-3)
