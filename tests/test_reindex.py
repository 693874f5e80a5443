"""Full builds and --reindex against the working database: what is embedded, kept, replaced
and dropped, as counted in the runs table and seen in the files table and the export."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import bump_mtime, make_photo, read_jsonl, run_cli, summary_line

N = 4


def _query(db: Path, sql: str, *params) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _last_run(db: Path) -> dict:
    return dict(_query(db, "SELECT * FROM runs ORDER BY id DESC LIMIT 1")[0])


def _files(db: Path) -> dict[str, dict]:
    rows = _query(db, "SELECT * FROM files ORDER BY path")
    return {Path(r["path"]).name: dict(r) for r in rows}


def _export_vectors(out: Path) -> dict[str, list[float]]:
    records = read_jsonl(out)
    paths = [r["metadata"]["path"] for r in records]
    assert len(paths) == len(set(paths)), f"a path is exported twice: {paths}"
    return {Path(p).name: r["vector"] for p, r in zip(paths, records)}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    for i in range(N):
        make_photo(photos / f"p{i}.jpg", seed=i)
    return photos


def _args(tree: Path, out: Path, model: Path, *extra) -> list:
    return ["-i", tree, "-o", out, "--model-name", model, *extra]


def test_full_build_embeds_everything_again_and_retries_failures(runner, tmp_path, tree, tiny_model):
    (tree / "broken.jpg").write_bytes(b"this is not a jpeg" * 10)
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"

    first = run_cli(runner, _args(tree, out, tiny_model))
    assert summary_line(first).startswith(f"scanned {N + 1}, new {N + 1}, modified 0, unchanged 0, deleted 0, "
                                      f"failed 1, exported {N} in ")
    run1 = _last_run(db)
    assert (run1["mode"], run1["status"], run1["embedded"], run1["failed"], run1["decoded"]) == \
        ("full", "completed", N, 1, N + 1)
    files = _files(db)
    assert files["broken.jpg"]["status"] == "failed" and files["broken.jpg"]["error"]
    assert {f["build"] for f in files.values()} == {run1["build"]}
    vectors1 = _export_vectors(out)

    second = run_cli(runner, _args(tree, out, tiny_model))
    run2 = _last_run(db)
    assert run2["id"] == run1["id"] + 1
    assert (run2["mode"], run2["status"], run2["unchanged"], run2["new"]) == ("full", "completed", N + 1, 0)
    assert run2["embedded"] == N, "a full build must embed every image anew"
    assert run2["failed"] == 1 and run2["decoded"] == N + 1, "a full build must retry failed files"
    assert run2["build"] != run1["build"]
    files = _files(db)
    assert {f["build"] for f in files.values()} == {run2["build"]}
    assert {f["changed_run"] for f in files.values()} == {run2["id"]}
    assert len(files) == N + 1
    assert "failed 1, exported 4" in summary_line(second)
    # Same images, same model: same vectors.
    after = _export_vectors(out)
    assert after.keys() == vectors1.keys()
    for name in after:
        np.testing.assert_allclose(after[name], vectors1[name], atol=1e-5)


def test_reindex_new_modified_deleted_unchanged(runner, tmp_path, tree, tiny_model):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, _args(tree, out, tiny_model))
    before = _files(db)
    exported_before = _export_vectors(out)

    make_photo(tree / "sub" / "p9.jpg", seed=9)  # new
    make_photo(tree / "p1.jpg", seed=21)  # modified: other content
    bump_mtime(tree / "p1.jpg")
    bump_mtime(tree / "p2.jpg")  # modified: only its mtime
    (tree / "p3.jpg").unlink()  # deleted

    result = run_cli(runner, _args(tree, out, tiny_model, "--reindex"))
    assert summary_line(result).startswith(
        "scanned 4, new 1, modified 2, unchanged 1, deleted 1, failed 0, exported 4 in "
    ), result.stderr
    run = _last_run(db)
    assert (run["mode"], run["status"]) == ("reindex", "completed")
    assert (run["scanned"], run["new"], run["modified"], run["unchanged"], run["deleted"]) == (4, 1, 2, 1, 1)
    # p2's bytes did not change: it takes back its own vector (tests/test_moves.py), neither
    # decoded nor embedded.
    assert (run["embedded"], run["decoded"], run["failed"], run["exported"], run["imported"]) == (2, 2, 0, 4, 0)
    assert run["reused"] == 1

    after = _files(db)
    rows = _query(db, "SELECT path, count(*) AS n FROM files GROUP BY path HAVING n > 1")
    assert rows == []
    assert sorted(after) == ["p0.jpg", "p1.jpg", "p2.jpg", "p9.jpg"]
    # Unchanged: untouched row, byte-identical vector.
    assert after["p0.jpg"]["embedding"] == before["p0.jpg"]["embedding"]
    assert after["p0.jpg"]["changed_run"] == before["p0.jpg"]["changed_run"]
    # Modified rows are replaced in place (same id), with the new state.
    for name in ("p1.jpg", "p2.jpg"):
        assert after[name]["id"] == before[name]["id"]
        assert after[name]["changed_run"] == run["id"]
        assert after[name]["mtime_ns"] == (tree / name).stat().st_mtime_ns
        assert after[name]["size"] == (tree / name).stat().st_size
        assert after[name]["status"] == "ok"
    assert after["p1.jpg"]["embedding"] != before["p1.jpg"]["embedding"]
    assert after["p9.jpg"]["status"] == "ok" and after["p9.jpg"]["changed_run"] == run["id"]

    exported = _export_vectors(out)
    assert sorted(exported) == ["p0.jpg", "p1.jpg", "p2.jpg", "p9.jpg"]
    assert exported["p0.jpg"] == exported_before["p0.jpg"]
    assert not np.allclose(exported["p1.jpg"], exported_before["p1.jpg"], atol=1e-4)
    for name, vec in exported.items():
        assert np.asarray(vec, dtype="<f4").tobytes() == after[name]["embedding"]
    records = read_jsonl(out)
    p1 = next(r for r in records if r["metadata"]["filename"] == "p1.jpg")
    assert p1["metadata"]["size_bytes"] == (tree / "p1.jpg").stat().st_size


def test_reindex_without_changes_decodes_nothing(runner, tmp_path, tree, tiny_model):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, _args(tree, out, tiny_model))
    before = _files(db)
    exported_before = out.read_bytes()
    inode_before = (out.stat().st_ino, out.stat().st_mtime_ns)

    result = run_cli(runner, _args(tree, out, tiny_model, "--reindex"))
    assert summary_line(result).startswith(f"scanned {N}, new 0, modified 0, unchanged {N}, deleted 0, failed 0, "
                                       f"exported {N} in ")
    run = _last_run(db)
    assert (run["decoded"], run["embedded"], run["imported"], run["unchanged"], run["exported"]) == (0, 0, 0, N, N)
    assert run["status"] == "completed"
    after = _files(db)
    for name in before:
        assert after[name]["embedding"] == before[name]["embedding"]
        assert after[name]["changed_run"] == before[name]["changed_run"]
    assert out.read_bytes() == exported_before
    # Nothing changed and the file is our own last export: it is not rewritten at all.
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == inode_before


def test_failed_file_is_not_retried_until_it_changes(runner, tmp_path, tree, tiny_model):
    broken = tree / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"

    run_cli(runner, _args(tree, out, tiny_model, "--reindex"))  # the first run of a fresh database
    run = _last_run(db)
    assert (run["failed"], run["decoded"], run["embedded"]) == (1, N + 1, N)
    assert _files(db)["broken.jpg"]["status"] == "failed"

    result = run_cli(runner, _args(tree, out, tiny_model, "--reindex"))
    run = _last_run(db)
    assert (run["decoded"], run["embedded"], run["failed"], run["unchanged"]) == (0, 0, 0, N + 1)
    assert _files(db)["broken.jpg"]["status"] == "failed"
    assert "broken.jpg" not in _export_vectors(out)
    assert "failed 0" in summary_line(result)

    make_photo(broken, seed=42, fmt="JPEG")
    run_cli(runner, _args(tree, out, tiny_model, "--reindex"))
    run = _last_run(db)
    assert (run["modified"], run["decoded"], run["embedded"], run["failed"]) == (1, 1, 1, 0)
    row = _files(db)["broken.jpg"]
    assert row["status"] == "ok" and row["error"] is None and row["width"] == 64
    assert "broken.jpg" in _export_vectors(out)


def test_model_change_reembeds_everything(runner, tmp_path, tree, tiny_model, other_tiny_model):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, _args(tree, out, tiny_model))
    old = _export_vectors(out)

    result = run_cli(runner, _args(tree, out, other_tiny_model, "--reindex"))
    run = _last_run(db)
    assert run["model"] == str(other_tiny_model)
    assert (run["embedded"], run["decoded"], run["imported"]) == (N, N, 0), result.stderr
    files = _files(db)
    assert {f["model"] for f in files.values()} == {str(other_tiny_model)}
    new = _export_vectors(out)
    assert new.keys() == old.keys() and len(new) == N
    for name in new:
        assert len(new[name]) == files[name]["dim"]
        assert not np.allclose(new[name], old[name], atol=1e-3), f"{name} kept the old model's vector"
        assert np.asarray(new[name], dtype="<f4").tobytes() == files[name]["embedding"]

    # Another reindex with the new model has nothing to do.
    run_cli(runner, _args(tree, out, other_tiny_model, "--reindex"))
    assert (_last_run(db)["embedded"], _last_run(db)["decoded"]) == (0, 0)

    # Back to the first model: its own vectors again, not the second model's under its name.
    run_cli(runner, _args(tree, out, tiny_model, "--reindex"))
    run = _last_run(db)
    assert (run["embedded"], run["imported"]) == (N, 0)
    back = _export_vectors(out)
    for name in back:
        np.testing.assert_allclose(back[name], old[name], atol=1e-5)


def test_relative_and_dotdot_paths_match_absolute_ones(runner, tmp_path, tree, tiny_model, monkeypatch):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, _args(tree, out, tiny_model))
    before = _files(db)

    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    result = run_cli(runner, ["-i", "../../photos/../photos/.", "-o", "../../elsewhere/../index.jsonl",
                              "--model-name", tiny_model, "--reindex"])
    assert summary_line(result).startswith(f"scanned {N}, new 0, modified 0, unchanged {N}, deleted 0, ")
    run = _last_run(db)
    assert (run["new"], run["unchanged"], run["embedded"], run["decoded"]) == (0, N, 0, 0)
    after = _files(db)
    assert {n: r["path"] for n, r in after.items()} == {n: r["path"] for n, r in before.items()}
    for record in read_jsonl(out):
        path = record["metadata"]["path"]
        assert os.path.isabs(path) and ".." not in Path(path).parts and "/./" not in path
        assert path == str(tree / record["metadata"]["filename"])


def test_runs_table_records_each_run(runner, tmp_path, tree, tiny_model):
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, _args(tree, out, tiny_model))
    (tree / "p0.jpg").unlink()
    run_cli(runner, _args(tree, out, tiny_model, "--reindex"))
    runs = [dict(r) for r in _query(db, "SELECT * FROM runs ORDER BY id")]
    assert [(r["mode"], r["status"]) for r in runs] == [("full", "completed"), ("reindex", "completed")]
    assert [(r["scanned"], r["new"], r["unchanged"], r["deleted"], r["embedded"], r["exported"]) for r in runs] == \
        [(N, N, 0, 0, N, N), (N - 1, 0, N - 1, 1, 0, N - 1)]
    assert all(r["finished_at"] and r["error"] is None for r in runs)
    assert runs[1]["build"] == runs[0]["build"]  # a reindex continues the build it updates


def test_changes_spread_over_many_scan_batches(runner, tmp_path, tiny_model, other_tiny_model, monkeypatch):
    # The scan compares the walk with the database range by range, one batch of paths at a
    # time: files deleted, added and renamed at the edges of those ranges, between folders
    # that sort around each other ("a-b/" < "a.jpg" < "a/" < "a0.jpg"), must all be found.
    from sqlindexer import state

    monkeypatch.setattr(state, "SCAN_BATCH", 3)
    photos, out, db = tmp_path / "photos", tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    names = ["a-b/1.jpg", "a.jpg", "a/2.jpg", "a/3.jpg", "a0.jpg", "b/c/4.jpg", "b/c/5.jpg", "b/d.jpg",
             "m.jpg", "n/6.jpg", "z.jpg"]
    for i, name in enumerate(names):
        make_photo(photos / name, seed=i)
    run_cli(runner, _args(photos, out, tiny_model))
    before = {Path(r["path"]).relative_to(photos).as_posix(): dict(r) for r in _query(db, "SELECT * FROM files")}
    assert sorted(before) == sorted(names)

    (photos / "a-b" / "1.jpg").unlink()  # the first path
    (photos / "b" / "c" / "5.jpg").unlink()  # one in the middle
    (photos / "z.jpg").unlink()  # the last
    (photos / "a" / "3.jpg").rename(photos / "a" / "3b.jpg")  # same size and mtime, new name
    make_photo(photos / "0.jpg", seed=20)  # before everything
    make_photo(photos / "b" / "c0.jpg", seed=21)  # between two folders
    make_photo(photos / "zz" / "7.jpg", seed=22)  # after everything
    make_photo(photos / "m.jpg", seed=23)
    bump_mtime(photos / "m.jpg")  # modified

    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert summary_line(result).startswith("scanned 11, new 4, modified 1, unchanged 6, deleted 4, failed 0, exported 11 "), \
        result.stderr
    after = {Path(r["path"]).relative_to(photos).as_posix(): dict(r) for r in _query(db, "SELECT * FROM files")}
    on_disk = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    assert sorted(after) == on_disk
    assert all(row["status"] == "ok" for row in after.values())
    assert sorted(_export_vectors(out)) == sorted(Path(p).name for p in on_disk)
    for name in ("a.jpg", "a/2.jpg", "a0.jpg", "b/c/4.jpg", "b/d.jpg", "n/6.jpg"):
        assert after[name] == before[name], f"unchanged {name} was written"

    # Nothing changed: nothing is written, whatever the batches.
    result = run_cli(runner, _args(photos, out, tiny_model, "--reindex"))
    assert summary_line(result).startswith("scanned 11, new 0, modified 0, unchanged 11, deleted 0, "), result.stderr
    assert {r["path"]: dict(r) for r in _query(db, "SELECT * FROM files")} == \
        {str(photos / name): row for name, row in after.items()}

    # Another model: every row needs work again, in every batch; one new file among them.
    make_photo(photos / "a-b" / "8.jpg", seed=24)
    result = run_cli(runner, _args(photos, out, other_tiny_model, "--reindex"))
    assert summary_line(result).startswith("scanned 12, new 1, modified 0, unchanged 11, deleted 0, failed 0, exported 12 "), \
        result.stderr
    rows = _query(db, "SELECT path, status, model FROM files")
    assert len(rows) == 12 and {(r["status"], r["model"]) for r in rows} == {("ok", str(other_tiny_model))}


def test_scan_batches_out_of_path_order_are_refused(tmp_path):
    # The range-by-range comparison is only right for a walk in path order: a batch that is
    # not would make files look deleted, so it is an error, not a guess.
    from sqlindexer import db as dbmod, runs, state
    from sqlindexer.scan import FileRecord

    conn = dbmod.connect(tmp_path / "state.sqlite")
    run = runs.start_run(conn, mode="reindex", model="m", config={}, pid=os.getpid())
    scan = state.Scan(conn, run)
    scan.record([FileRecord("/p/b.jpg", 1, 1, 1), FileRecord("/p/c.jpg", 1, 1, 1)])
    with pytest.raises(ValueError, match="path order"):
        scan.record([FileRecord("/p/a.jpg", 1, 1, 1)])  # before the last batch
    with pytest.raises(ValueError, match="path order"):
        scan.record([FileRecord("/p/e.jpg", 1, 1, 1), FileRecord("/p/d.jpg", 1, 1, 1)])
    conn.close()
