"""The approximate index (sqlindexer/ann.py) of search, similar and duplicates: it agrees
with exhaustive search, a damaged, foreign or stale index beside the database is rebuilt,
an update after a re-index gives what a rebuild gives, and bad input stays one line.

The index only pays from tens of thousands of vectors; SQLINDEXER_EXACT_BELOW=0 forces it
here on a real library (the real model code on the session's tiny SigLIP 2) and on a few
thousand synthetic vectors in a real working database.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import bump_mtime, run_cli
from test_search import copy_resized, index, json_lines, noise_photo, one_error_line

from sqlindexer import ann, db, duplicates, runs, search, state, vector_store, vectors, vectors_update

DIM = 32
MODEL = "synthetic/m"


@pytest.fixture(autouse=True)
def _force_the_index(monkeypatch):
    monkeypatch.setenv("SQLINDEXER_EXACT_BELOW", "0")
    # A few thousand rows have about a hundred cells, fewer than a query scans at scale:
    # scan half of them (as before the cells were made smaller), so that the candidates
    # really are a choice.
    monkeypatch.setattr(ann, "PROBES", 50)


# -- synthetic vectors in a real working database ----------------------------------------
def clustered(n: int, seed: int = 0, *, pairs: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around n / 50 centres (cosine ~0.5 within), with `pairs` rows replaced
    by near-copies (cosine ~0.97) of others: (vectors, (original, copy) rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 50, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((n, DIM))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) + centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    planted = rng.choice(n, size=(pairs, 2), replace=False)
    noise = rng.standard_normal((pairs, DIM))
    copies = x[planted[:, 0]] + 0.25 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    x[planted[:, 1]] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return x.astype(np.float32), planted


def path_of(i: int) -> str:
    return f"/p/{i // 100:03d}/{i:05d}.jpg"


def fill(path: Path, x: np.ndarray) -> None:
    conn = db.connect(path)
    run = runs.start_run(conn, mode="reindex", model=MODEL, config={}, pid=0)
    exif = [{"Model": "Canon EOS"} if i % 2 else {} for i in range(len(x))]
    state.import_vectors(conn, (state.Imported(path_of(i), 1, 1, 1, v.astype("<f4").tobytes(), DIM, 1, 1, exif[i])
                                for i, v in enumerate(x)), run)
    conn.close()


def load(path: Path) -> tuple[sqlite3.Connection, vectors.VectorIndex, ann.AnnIndex]:
    conn = db.open_readonly(path)
    model = vectors.choose_model(conn, None, where=str(path))
    index = vectors.load_index(conn, path, model)
    return conn, index, ann.load_ann(conn, index)


def ranked(index, approx, query, *, pin=None, filters=None, top=20) -> list[tuple[str, float]]:
    results = search._rank(index, query, top, filters or search.Filters(), pin=pin, ann=approx)
    assert results.approximate == (approx is not None)
    return [(h.path, h.score) for h in results.hits]


def recall(a: list, b: list) -> float:
    return len({p for p, _ in a} & {p for p, _ in b}) / max(1, len(b))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthetic")
    x, planted = clustered(4000, pairs=40)
    fill(root / "s.sqlite", x)
    return {"db": root / "s.sqlite", "x": x, "planted": planted}


def copy_db(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / src.name)
    return dst_dir / src.name


def test_approximate_agrees_with_exact_and_prints_true_cosines(synthetic, tmp_path):
    path = copy_db(synthetic["db"], tmp_path)
    conn, index, approx = load(path)
    try:
        assert approx.origin == "built" and approx.nlist == ann.cell_count(4000) > 1
        x = synthetic["x"]
        rng = np.random.default_rng(1)
        texts = rng.standard_normal((20, DIM)) + x[rng.integers(0, len(x), 20)]
        filters = search.Filters(cameras=("canon",))
        for q in texts:
            assert len(approx.candidates(index, q / np.linalg.norm(q), 20, None)) < 0.7 * len(index)
            got, want = ranked(index, approx, q), ranked(index, None, q)
            assert recall(got, want) >= 0.9
            truth = {path_of(i): float(v) for i, v in enumerate(x @ (q / np.linalg.norm(q)))}
            assert all(score == pytest.approx(truth[p], abs=1e-5) for p, score in got)  # re-scored exactly
            assert recall(ranked(index, approx, q, filters=filters), ranked(index, None, q, filters=filters)) >= 0.9
        hits = 0
        for row in rng.choice(len(x), 20, replace=False):
            got = ranked(index, approx, np.array(index.vectors[row]), pin=int(row))
            assert got[0] == (index.paths[int(row)], pytest.approx(1.0, abs=1e-5))
            hits += recall(got, ranked(index, None, np.array(index.vectors[row]), pin=int(row)))
        assert hits / 20 >= 0.95
    finally:
        conn.close()


def test_duplicates_from_the_cells_find_the_planted_pairs(synthetic, tmp_path):
    path = copy_db(synthetic["db"], tmp_path)
    conn = db.open_readonly(path)
    try:
        from_cells = duplicates.find_duplicates(conn, path, threshold=0.95)
        from_every = duplicates.find_duplicates(conn, path, threshold=0.95, exhaustive=True)
    finally:
        conn.close()
    assert from_cells.approximate and not from_every.approximate
    cells, every = from_cells.groups, from_every.groups
    assert (tmp_path / "s.sqlite").exists() and any(p.name.startswith("s.sqlite.ann-") for p in tmp_path.iterdir())
    found = {frozenset(p for p, _ in g.members) for g in cells}
    assert found == {frozenset(p for p, _ in g.members) for g in every}
    planted = {frozenset((path_of(a), path_of(b))) for a, b in synthetic["planted"]}
    assert len(planted & found) >= 0.99 * len(planted)


def ann_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".ann-"))


@pytest.mark.parametrize("damage", ["truncated", "garbage info", "no ids", "other ids", "foreign"])
def test_a_damaged_or_foreign_index_is_rebuilt(synthetic, tmp_path, damage, caplog):
    path = copy_db(synthetic["db"], tmp_path / "mine")
    conn, index, approx = load(path)
    q = synthetic["x"][7] + 0.5 * synthetic["x"][8]
    want = ranked(index, approx, q)  # the same vectors build the same index
    assert recall(want, ranked(index, None, q)) >= 0.9
    conn.close()
    [folder] = ann_folders(path)
    if damage == "truncated":
        with open(folder / "index.faiss", "r+b") as f:
            f.truncate(1000)
    elif damage == "garbage info":
        (folder / "info.json").write_bytes(b"\x00not json")
    elif damage == "no ids":
        (folder / "ids.npy").unlink()
    elif damage == "other ids":
        ids = np.load(folder / "ids.npy")
        np.save(folder / "ids.npy", ids + 1)
    else:  # the index of another database with the same vectors, under this one's name
        other = copy_db(synthetic["db"], tmp_path / "other")
        rw = sqlite3.connect(other)
        rw.execute("UPDATE meta SET value = 'another database' WHERE key = 'database_id'")
        rw.commit()
        rw.close()
        load(other)[0].close()
        shutil.rmtree(folder)
        shutil.copytree(ann_folders(other)[0], folder)
    with caplog.at_level(logging.WARNING):
        conn, index, approx = load(path)
    try:
        assert approx.origin == "built"
        assert ranked(index, approx, q) == want
        assert damage == "no ids" or "approximate index" in caplog.text
        assert load(path)[2].origin == "cache"
    finally:
        conn.close()


# -- updates ---------------------------------------------------------------------------
def change(path: Path, seed: int, k: int) -> None:
    """Re-embed k rows, delete k, rename k / 4 and add k, as a re-index would; half the new
    and all the renamed paths sort in among the kept ones, not after them."""
    rng = np.random.default_rng(seed)
    rw = sqlite3.connect(path)
    picked = rng.choice(4000, 2 * k + k // 4, replace=False)
    fresh = clustered(3 * k, seed)[0]
    for i, v in zip(picked[:k], fresh):
        rw.execute("UPDATE files SET embedding = ? WHERE path = ?", (v.tobytes(), path_of(int(i))))
    rw.executemany("DELETE FROM files WHERE path = ?", [(path_of(int(i)),) for i in picked[k : 2 * k]])
    rw.executemany("UPDATE files SET path = ? WHERE path = ?",
                   [(f"/p/{(int(i) * 7) % 40:03d}/moved-{seed}-{i}.jpg", path_of(int(i))) for i in picked[2 * k :]])
    for j, v in enumerate(fresh[k : 2 * k]):
        where = f"/p/{(j * 13) % 40:03d}" if j % 4 < 2 else "/p/new"
        rw.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding, exif) "
                   "VALUES (?, 1, 1, 1, 'ok', ?, ?, ?, ?)",
                   (f"{where}/{'été-' if j % 2 else ''}{seed}-{j}.jpg", MODEL, DIM, v.tobytes(),
                    json.dumps({"Model": "Pixel"})))
    rw.commit()
    rw.close()


def test_an_update_gives_what_a_rebuild_gives(synthetic, tmp_path, monkeypatch):
    path = copy_db(synthetic["db"], tmp_path / "updated")
    load(path)[0].close()
    copied = []
    real_copy = vectors_update.copy_forward
    monkeypatch.setattr(vectors_update, "copy_forward", lambda *a: copied.append(1) or real_copy(*a))
    store_inode = (next(path.parent.glob("s.sqlite.vectors-*")) / vector_store.STORE).stat().st_ino
    for seed in (1, 2):
        # The first update shares the older cache's store and the older index's faiss file
        # (2% of the rows changed); the second, from it, copies the store into a new one
        # (told to compact) and writes a new faiss file (4% of the rows changed since).
        if seed == 2:
            monkeypatch.setattr(vectors_update, "COMPACT", 1.0)
        change(path, seed, 20)
        conn, index, approx = load(path)
        assert (index.origin, approx.origin, len(copied)) == ("built", "delta" if seed == 1 else "updated", seed)
        [folder] = path.parent.glob("s.sqlite.vectors-*")
        shared = (folder / vector_store.STORE).stat().st_ino == store_inode
        assert shared == (seed == 1) and (index.slots is not None) == (seed == 1)
        assert len(ann_folders(path)) == 1 and len(list(path.parent.glob("s.sqlite.vectors-*"))) == 1
        rebuilt_path = copy_db(path, tmp_path / f"rebuilt{seed}")  # the same database, no cache beside it
        rconn, rebuilt, rebuilt_ann = load(rebuilt_path)
        assert (rebuilt.origin, rebuilt_ann.origin) == ("built", "built")
        for name in ("vectors", "ids", "taken", "id_sorted", "id_rows"):
            assert np.array_equal(getattr(index, name), getattr(rebuilt, name)), name
        assert index.paths.blob.tobytes() == rebuilt.paths.blob.tobytes()
        assert np.array_equal(index.paths.offsets, rebuilt.paths.offsets)
        assert [index.cameras[c] if c >= 0 else None for c in index.camera] == \
            [rebuilt.cameras[c] if c >= 0 else None for c in rebuilt.camera]
        assert np.array_equal(approx.ids, rebuilt_ann.ids) and approx.faiss_index.ntotal == len(index)
        rng = np.random.default_rng(seed)
        for q in rng.standard_normal((10, DIM)) + synthetic["x"][rng.integers(0, 4000, 10)]:
            exact = ranked(rebuilt, None, q)
            assert recall(ranked(index, approx, q), exact) >= 0.9
            assert recall(ranked(rebuilt, rebuilt_ann, q), exact) >= 0.9
            new = search.Filters(cameras=("pixel",))  # only the rows added: beside the shared faiss file
            assert ranked(index, approx, q, filters=new) == ranked(rebuilt, None, q, filters=new)
        groups = duplicates.cell_duplicate_groups(index, approx.cells_by_row(index), 0.95)
        again = duplicates.cell_duplicate_groups(rebuilt, rebuilt_ann.cells_by_row(rebuilt), 0.95)
        assert [g.members for g in groups] == [g.members for g in again]
        conn.close()
        rconn.close()


def test_an_update_reads_the_state_of_its_vectors_while_an_index_run_writes(synthetic, tmp_path):
    """Rows changed after the vectors were read (a commit between the cache and the index)
    are taken as the vectors hold them: the index is the index of those vectors."""
    path = copy_db(synthetic["db"], tmp_path)
    load(path)[0].close()
    change(path, 3, 40)
    conn = db.open_readonly(path)
    try:
        model = vectors.choose_model(conn, None, where="db")
        index = vectors.load_index(conn, path, model)
        change(path, 4, 40)  # committed now, after the vectors were read
        approx = ann.load_ann(conn, index)
        assert approx.origin == "updated" and np.array_equal(approx.ids, index.id_sorted)
        assert approx.faiss_index.ntotal == len(index) and len(approx.extra_ids) == 0
        for row in (0, 1000, 2500):
            got = ranked(index, approx, np.array(index.vectors[row]), pin=row)
            assert got[0][0] == index.paths[row]
    finally:
        conn.close()


# -- a real library, through the CLI ---------------------------------------------------
@pytest.fixture
def library(tmp_path, tiny_model) -> dict:
    photos = tmp_path / "photos"
    for seed in range(6):
        noise_photo(photos / f"n{seed}.jpg", seed, quality=95)
    copy_resized(photos / "n1.jpg", photos / "n1_small.png", (64, 48))
    copy_resized(photos / "n2.jpg", photos / "n2_q60.jpg", (96, 72), quality=60)
    index(CliRunner(), photos, tmp_path / "index.jsonl", tiny_model)
    return {"photos": photos, "db": tmp_path / "index.sqlite", "out": tmp_path / "index.jsonl", "model": tiny_model}


def test_cli_approximate_equals_exact_on_a_real_library_and_after_a_reindex(runner, library):
    photos, dbp = library["photos"], library["db"]

    def compare() -> None:
        for query in sorted(photos.iterdir()):
            args = ["similar", query, "--db", dbp, "--top", 5, "--json"]
            approximate = run_cli(runner, args)
            assert json_lines(approximate.stdout) == json_lines(run_cli(runner, [*args, "--exact"]).stdout)
            assert json_lines(approximate.stdout) == json_lines(run_cli(runner, [*args, "--exhaustive"]).stdout)
        args = ["duplicates", "--db", dbp, "--json"]
        groups = json_lines(run_cli(runner, args).stdout)
        assert groups == json_lines(run_cli(runner, [*args, "--exhaustive"]).stdout)
        assert [sorted(Path(i["path"]).name for i in g["images"]) for g in groups] == \
            [["n1.jpg", "n1_small.png"], ["n2.jpg", "n2_q60.jpg"]]
        text = ["search", "a red car", "--db", dbp, "--json"]
        assert json_lines(run_cli(runner, text).stdout) == json_lines(run_cli(runner, [*text, "--exact"]).stdout)

    compare()
    [before] = ann_folders(dbp)
    noise_photo(photos / "n0.jpg", 40, quality=95)  # a new photo under an old name
    bump_mtime(photos / "n0.jpg")
    (photos / "n5.jpg").unlink()
    noise_photo(photos / "n9.jpg", 9)
    run_cli(runner, ["-i", photos, "-o", library["out"], "--model-name", library["model"], "--workers", "0",
                     "--reindex"])
    compare()
    [after] = ann_folders(dbp)
    assert after != before and json.loads((after / "info.json").read_text())["count"] == 8


def test_the_summary_says_how_a_query_was_answered(runner, library, monkeypatch):
    photos, dbp = library["photos"], library["db"]
    for command in (["search", "a red car"], ["similar", photos / "n0.jpg"]):
        approximate = run_cli(runner, [*command, "--db", dbp, "--json"]).stderr.splitlines()[-1]
        exhaustive = run_cli(runner, [*command, "--db", dbp, "--exact"]).stderr.splitlines()[-1]
        assert "ranked by the approximate index in" in approximate, approximate
        assert "ranked exhaustively in" in exhaustive, exhaustive
    approximate = run_cli(runner, ["duplicates", "--db", dbp]).stderr.splitlines()[-1]
    exhaustive = run_cli(runner, ["duplicates", "--db", dbp, "--exhaustive"]).stderr.splitlines()[-1]
    assert approximate.endswith("compared the approximate index's candidate pairs"), approximate
    assert exhaustive.endswith("compared every pair"), exhaustive
    monkeypatch.setenv("SQLINDEXER_EXACT_BELOW", "1000")  # too few images for an index to pay
    below = run_cli(runner, ["search", "a red car", "--db", dbp]).stderr.splitlines()[-1]
    assert "ranked exhaustively in" in below, below
    assert run_cli(runner, ["duplicates", "--db", dbp]).stderr.splitlines()[-1].endswith("compared every pair")


def test_bad_input_is_one_line(runner, library, tmp_path):
    dbp = library["db"]
    for threshold in ("0", "1.5", "-1"):
        result = run_cli(runner, ["duplicates", "--db", dbp, "--threshold", threshold], ok=False)
        assert result.exit_code == 2 and "'--threshold'" in result.stderr.splitlines()[-1]
    for command in (["search", "x"], ["similar", library["photos"] / "n0.jpg"]):
        result = run_cli(runner, [*command, "--db", dbp, "--top", "0"], ok=False)
        assert result.exit_code == 2 and "'--top'" in result.stderr.splitlines()[-1]
        result = run_cli(runner, [*command, "--db", dbp, "--model-name", "other/model", "--exact"], ok=False)
        assert result.exit_code == 1 and "no vectors of model other/model" in one_error_line(result)
    result = run_cli(runner, ["duplicates", "--db", dbp, "--model-name", "other/model"], ok=False)
    assert result.exit_code == 1 and "no vectors of model other/model" in one_error_line(result)
    conn = db.open_readonly(dbp)
    try:
        for threshold in (0.0, 1.01):
            with pytest.raises(search.SearchError, match=r"the threshold must be in \(0, 1\]"):
                duplicates.find_duplicates(conn, dbp, threshold=threshold)
    finally:
        conn.close()


@pytest.mark.parametrize("kind", [".vectors-", ".ann-"])
def test_the_sweep_beside_the_database_keeps_only_the_current_and_newer(tmp_path, kind):
    import os
    import time

    def folder(name: str, info: dict | None = None, *, age: float = 0.0) -> Path:
        path = tmp_path / f"x.sqlite{kind}{name}"
        path.mkdir()
        if info is not None:
            (path / "info.json").write_text(json.dumps(info))
        if age:
            os.utime(path, (time.time() - age, time.time() - age))
        return path

    current = folder("model1-cur", {"database_id": "D", "vectors_version": 5})
    kept = [current, folder("model1-newer", {"database_id": "D", "vectors_version": 6}),
            folder("model1-cur.tmp-1-ab"),  # another query may be building it
            folder("model2-older", {"database_id": "D", "vectors_version": 1})]  # another model's
    gone = [folder("model1-older", {"database_id": "D", "vectors_version": 4}),
            folder("model1-foreign", {"database_id": "E", "vectors_version": 9}),
            folder("model1-broken"),
            folder("model1-cur.tmp-2-cd", age=vectors.STALE_TMP_SECONDS + 60)]
    (tmp_path / f"x.sqlite{kind}model1-junk").write_text("a file, not a folder")
    vectors.remove_stale(current, vectors.newer_than(("D", 5)))
    assert all(p.exists() for p in kept) and not any(p.exists() for p in gone)
    assert (tmp_path / f"x.sqlite{kind}model1-junk").exists()


def test_nearest_cells_in_bfloat16_agree_with_float32(synthetic, monkeypatch):
    x = synthetic["x"]
    centroids = x[np.random.default_rng(2).choice(len(x), 100, replace=False)]
    exact = ann.nearest_cells(centroids, x, ann.DUPLICATE_CELLS)
    monkeypatch.setattr(ann, "BFLOAT16_FROM", 0)
    monkeypatch.setattr(ann, "TORCH_LOAD_FROM", 0)  # (torch may not be loaded yet)
    fast = ann.nearest_cells(centroids, x, ann.DUPLICATE_CELLS)
    assert fast.shape == exact.shape == (len(x), ann.DUPLICATE_CELLS) and fast.dtype == np.int32
    s = x @ centroids.T
    # The same nearest cell but where two cells tie within bfloat16's rounding.
    home = np.take_along_axis(s, fast[:, :1], axis=1)[:, 0]
    assert np.all(home >= s.max(axis=1) - 0.01) and np.mean(fast[:, 0] == exact[:, 0]) >= 0.97
    assert np.mean(np.sort(fast, axis=1) == np.sort(exact, axis=1)) >= 0.9
    import torch  # a CPU without bfloat16 in hardware: the same product in float32

    monkeypatch.setattr(ann, "score_dtype", lambda: torch.float32)
    assert np.mean(ann.nearest_cells(centroids, x, ann.DUPLICATE_CELLS) == exact) >= 0.99


def test_exact_below_knob(monkeypatch, caplog):
    monkeypatch.setenv("SQLINDEXER_EXACT_BELOW", "123")
    assert ann.exact_below() == 123 and duplicates.exact_below() == 123
    monkeypatch.setenv("SQLINDEXER_EXACT_BELOW", "many")
    with caplog.at_level(logging.WARNING):
        assert ann.exact_below() == ann.EXACT_BELOW
    assert "SQLINDEXER_EXACT_BELOW" in caplog.text
    monkeypatch.delenv("SQLINDEXER_EXACT_BELOW")
    assert (ann.exact_below(), duplicates.exact_below()) == (ann.EXACT_BELOW, duplicates.DUPLICATES_EXACT_BELOW)
