"""search, similar and duplicates: text and image queries against the working database, the
--where filters, the vector cache beside the database and when it is rebuilt, and the
errors a query reports in one line.

Every query runs the real model code on the session's tiny random SigLIP 2 (`tiny_model`),
offline, with the tokenizer the fixture saved. The test photos are blocky random-noise
images: the tiny random model tells those apart (cosine at most ~0.85 between two of them)
while it sees a resized or re-encoded copy as the same image (cosine > 0.999). Photos with
a gradient and a block (conftest.make_photo) are too alike for it (~0.98).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import bump_mtime, copy_resized, index, json_lines, one_error_line, run_cli

from sqlindexer import db, duplicates, errors, records, runs, search, state
from sqlindexer import vectors as vectors_mod
from sqlindexer.errors import DatabaseError

CANON = "Canon PowerShot S40"
NIKON = "NIKON D1X"


def noise_photo(path: Path, seed: int, size=(96, 72), *, exif=None, fmt=None, **save) -> Path:
    """An 8x8 grid of random colours, scaled up: a photo the tiny model tells apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif is not None:
        save["exif"] = exif
    im.save(path, format=fmt, **save)
    return path


def camera_exif(model: str, taken: str):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0110] = model  # Model
    exif.get_ifd(0x8769)[0x9003] = taken  # ExifOffset -> DateTimeOriginal
    return exif


def set_mtime(path: Path, when: datetime) -> None:
    os.utime(path, (when.timestamp(), when.timestamp()))


def stored_vectors(db_path: Path) -> dict[str, np.ndarray]:
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT path, embedding FROM files WHERE status = 'ok'").fetchall()
    finally:
        conn.close()
    return {path: np.frombuffer(blob, dtype="<f4") for path, blob in rows}


def cache_folders(db_path: Path) -> list[Path]:
    return sorted(p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name + ".vectors-"))


# -- a library indexed once for the module ---------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model) -> dict:
    """photos/2003/{canon,nikon}.jpg with EXIF camera and date; photos/2003-summer/beach.jpg
    without EXIF (mtime 2021-07-01); photos/misc/n4..n7.jpg (mtime 2022-01-15), with a
    resized PNG and a re-encoded JPEG of n4 and a PNG copy of n5."""
    root = tmp_path_factory.mktemp("library")
    photos = root / "photos"
    noise_photo(photos / "2003" / "canon.jpg", 1, exif=camera_exif(CANON, "2003:12:14 12:01:44"))
    noise_photo(photos / "2003" / "nikon.jpg", 2, exif=camera_exif(NIKON, "2003:06:01 08:00:00"))
    set_mtime(noise_photo(photos / "2003-summer" / "beach.jpg", 3), datetime(2021, 7, 1, 12))
    misc = photos / "misc"
    for seed in range(4, 8):
        noise_photo(misc / f"n{seed}.jpg", seed, quality=95)
    copy_resized(misc / "n4.jpg", misc / "n4_small.png", (64, 48))
    copy_resized(misc / "n4.jpg", misc / "n4_q60.jpg", (96, 72), quality=60)
    copy_resized(misc / "n5.jpg", misc / "n5_copy.png", (96, 72))
    for p in misc.iterdir():
        set_mtime(p, datetime(2022, 1, 15, 9))
    out = root / "index.jsonl"
    index(CliRunner(), photos, out, tiny_model)
    return {"root": root, "photos": photos, "db": root / "index.sqlite", "out": out,
            "paths": sorted(str(p) for p in photos.rglob("*") if p.is_file())}


def _reference_text_vector(model: Path, text: str) -> np.ndarray:
    """The text embedding computed straight with transformers, as SigLIP 2 was trained:
    lower-cased, right-padded to 64 tokens, no attention mask, Siglip2Model.get_text_features."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "right"
    ids = tokenizer([text.lower()], padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    full = transformers.AutoModel.from_pretrained(model).eval()
    with torch.inference_mode():
        out = full.get_text_features(input_ids=ids)
    vec = (out.pooler_output if hasattr(out, "pooler_output") else out)[0].numpy()
    return vec / np.linalg.norm(vec)


def test_search_ranks_by_cosine_with_the_text_tower_offline(runner, library, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    text = "A Red Car at Night"
    result = run_cli(runner, ["search", text, "--top", 5, "--db", library["db"], "--model-name", tiny_model])
    hits = json_lines(result.stdout)  # not a terminal: JSON lines
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)

    query = _reference_text_vector(tiny_model, text)
    vectors = stored_vectors(library["db"])
    expected = sorted(vectors, key=lambda p: -float(vectors[p] @ query))[:5]
    assert [h["path"] for h in hits] == expected
    for h in hits:
        assert h["score"] == pytest.approx(float(vectors[h["path"]] @ query), abs=1e-5)
    assert "5 of 10 images" in result.stderr


def test_search_without_model_name_uses_the_databases_model_and_prints_a_table(runner, library):
    result = run_cli(runner, ["search", "a photo of a dog", "--db", library["db"], "--table", "--top", 100])
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "path"]
    assert len(lines) == 1 + len(library["paths"])  # --top larger than the index: everything
    assert sorted(line.split()[2] for line in lines[1:]) == library["paths"]
    scores = [float(line.split()[1]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)


def test_db_from_environment_variable(runner, library, monkeypatch):
    monkeypatch.setenv("SQLINDEXER_DB", str(library["db"]))
    result = run_cli(runner, ["similar", library["photos"] / "misc" / "n6.jpg", "--top", 1])
    assert json_lines(result.stdout)[0]["path"].endswith("n6.jpg")


def test_similar_indexed_image_comes_first_with_score_one(runner, library):
    query = library["photos"] / "2003" / "canon.jpg"
    result = run_cli(runner, ["similar", query, "--db", library["db"], "--json", "--top", 3])
    hits = json_lines(result.stdout)
    assert hits[0]["path"] == str(query)
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[1]["score"] < 0.95
    # A relative path with '..' is the same indexed file.
    os.chdir(library["photos"] / "misc")
    result = run_cli(runner, ["similar", "../2003/./canon.jpg", "--db", library["db"], "--top", 1])
    assert json_lines(result.stdout)[0]["path"] == str(query)


def test_similar_puts_the_query_before_an_identical_copy(runner, library):
    """n5_copy.png holds n5.jpg's decoded pixels: the same vector, a tie that path order
    would give to n5.jpg."""
    misc = library["photos"] / "misc"
    for query, other in (("n5_copy.png", "n5.jpg"), ("n5.jpg", "n5_copy.png")):
        hits = json_lines(run_cli(runner, ["similar", misc / query, "--db", library["db"], "--top", 2]).stdout)
        assert [Path(h["path"]).name for h in hits] == [query, other]
        assert hits[0]["score"] == pytest.approx(hits[1]["score"], abs=1e-6)
    hits = json_lines(run_cli(runner, ["similar", misc / "n5_copy.png", "--db", library["db"], "--top", 1,
                                       "--camera", "nikon"]).stdout)
    assert [Path(h["path"]).name for h in hits] == ["nikon.jpg"]  # filtered out: not pinned


def test_similar_embeds_a_file_that_is_not_indexed(runner, library, tmp_path):
    outside = tmp_path / "elsewhere" / "query.jpg"
    outside.parent.mkdir()
    shutil.copy(library["photos"] / "misc" / "n7.jpg", outside)  # same bytes: same decode, same vector
    result = run_cli(runner, ["similar", outside, "--db", library["db"], "--top", 2])
    hits = json_lines(result.stdout)
    assert hits[0]["path"] == str(library["photos"] / "misc" / "n7.jpg")
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_duplicates_groups_resized_and_reencoded_copies(runner, library):
    """A resized PNG and a quality-60 JPEG of n4, a PNG of n5: two groups, largest first;
    the distinct noise photos stay apart at the default threshold of 0.95."""
    result = run_cli(runner, ["duplicates", "--db", library["db"], "--json"])
    groups = json_lines(result.stdout)
    misc = library["photos"] / "misc"
    assert [[Path(i["path"]).name for i in g["images"]] for g in groups] == [
        ["n4.jpg", "n4_q60.jpg", "n4_small.png"],
        ["n5.jpg", "n5_copy.png"],
    ]
    assert [g["group"] for g in groups] == [1, 2] and [g["size"] for g in groups] == [3, 2]
    assert groups[0]["images"][0] == {"path": str(misc / "n4.jpg"), "score": pytest.approx(1.0, abs=1e-5)}
    assert all(i["score"] >= 0.95 for g in groups for i in g["images"])
    assert "2 groups of near-duplicates (5 images) among 10 images" in result.stderr

    table = run_cli(runner, ["duplicates", "--db", library["db"], "--table"]).stdout.splitlines()
    assert table[0] == "group 1: 3 images" and table[4] == "group 2: 2 images" and len(table) == 7
    assert table[1].split() == ["1.0000", str(misc / "n4.jpg")]


# -- filters ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, expected",
    [
        (["--path-prefix", "photos/2003"], ["canon.jpg", "nikon.jpg"]),  # a folder: not 2003-summer
        (["--path-prefix", "photos/2003-s"], ["beach.jpg"]),  # not a folder: a prefix of the path
        (["--path-prefix", "photos/2003", "--path-prefix", "photos/2003-summer/"],
         ["beach.jpg", "canon.jpg", "nikon.jpg"]),
        (["--camera", "canon"], ["canon.jpg"]),
        (["--camera", "CANON", "--camera", "d1x"], ["canon.jpg", "nikon.jpg"]),
        (["--after", "2003-07", "--before", "2004"], ["canon.jpg"]),  # EXIF DateTimeOriginal
        (["--after", "2021", "--before", "2021-12-31"], ["beach.jpg"]),  # no EXIF: the mtime
        (["--before", "2003-06-01 08:00:00"], []),
        (["--before", "2003-06-01 08:00:01"], ["nikon.jpg"]),
        (["--after", "2022-01-15", "--path-prefix", "photos/misc"],
         ["n4.jpg", "n4_q60.jpg", "n4_small.png", "n5.jpg", "n5_copy.png", "n6.jpg", "n7.jpg"]),
        (["--camera", "canon", "--path-prefix", "photos/misc"], []),
    ],
)
def test_where_filters(runner, library, options, expected):
    os.chdir(library["root"])
    result = run_cli(runner, ["similar", "photos/misc/n6.jpg", "--db", "index.sqlite", "--top", 100, *options])
    assert sorted(Path(h["path"]).name for h in json_lines(result.stdout)) == expected


def test_search_applies_filters_too(runner, library):
    result = run_cli(runner, ["search", "a cat", "--db", library["db"], "--camera", "nikon", "--camera", "canon"])
    assert sorted(Path(h["path"]).name for h in json_lines(result.stdout)) == ["canon.jpg", "nikon.jpg"]
    assert "2 of 2 images" in result.stderr


@pytest.mark.parametrize("value", ["2023-13", "yesterday", "2023-02-30", "23-01-01"])
def test_bad_date_is_a_usage_error(runner, library, value):
    result = run_cli(runner, ["search", "x", "--db", library["db"], "--after", value], ok=False)
    assert result.exit_code == 2
    assert "is not a date" in result.stderr


# -- the vector cache ------------------------------------------------------------------
def test_cache_is_reused_until_a_reindex_changes_vectors(runner, tmp_path, tiny_model):
    photos, out, dbp = tmp_path / "photos", tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    for seed in range(3):
        noise_photo(photos / f"p{seed}.jpg", seed)
    index(runner, photos, out, tiny_model)

    def query() -> tuple[dict[str, float], str]:
        result = run_cli(runner, ["search", "a red car", "--db", dbp, "--top", 10])
        return {Path(h["path"]).name: h["score"] for h in json_lines(result.stdout)}, result.stderr

    first, err = query()
    assert "vectors cached now" in err
    [folder] = cache_folders(dbp)
    inode = (folder / "vectors.f32").stat().st_ino
    again, err = query()
    assert "vectors from the cache" in err and again == first

    # A re-index that changes nothing writes nothing: the same cache serves.
    index(runner, photos, out, tiny_model, "--reindex")
    unchanged, err = query()
    assert "vectors from the cache" in err and unchanged == first
    assert cache_folders(dbp) == [folder] and (folder / "vectors.f32").stat().st_ino == inode

    # New content for p1: another vector, so another cache; the stale one is removed.
    noise_photo(photos / "p1.jpg", 99)
    bump_mtime(photos / "p1.jpg", 1)
    index(runner, photos, out, tiny_model, "--reindex")
    changed, err = query()
    assert "vectors cached now" in err
    assert changed["p1.jpg"] != pytest.approx(first["p1.jpg"], abs=1e-4)
    assert changed["p0.jpg"] == pytest.approx(first["p0.jpg"], abs=1e-6)
    [new_folder] = cache_folders(dbp)
    assert new_folder != folder

    # A deleted file leaves the results (and the cache) as well.
    (photos / "p2.jpg").unlink()
    index(runner, photos, out, tiny_model, "--reindex")
    after_delete, err = query()
    assert "vectors cached now" in err and set(after_delete) == {"p0.jpg", "p1.jpg"}


def test_unwritable_cache_folder_falls_back_to_memory(runner, library, monkeypatch):
    """As root a chmod does not stop a write, so the refusal is simulated where the cache
    folder is created."""
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if ".vectors-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    for folder in cache_folders(library["db"]):
        shutil.rmtree(folder)
    monkeypatch.setattr(Path, "mkdir", refuse)
    result = run_cli(runner, ["similar", library["photos"] / "misc" / "n6.jpg", "--db", library["db"], "--top", 1])
    assert "read from the database (not cached)" in result.stderr
    assert "keeping it in memory" in result.stderr
    assert json_lines(result.stdout)[0]["path"].endswith("n6.jpg")
    assert cache_folders(library["db"]) == []


def test_broken_cache_is_rebuilt(runner, library):
    run_cli(runner, ["similar", library["photos"] / "misc" / "n6.jpg", "--db", library["db"], "--top", 1])
    [folder] = cache_folders(library["db"])
    (folder / "vectors.f32").write_bytes(b"not an array")
    result = run_cli(runner, ["similar", library["photos"] / "misc" / "n6.jpg", "--db", library["db"], "--top", 1])
    assert "ignoring the broken vector cache" in result.stderr and "cached now" in result.stderr
    assert json_lines(result.stdout)[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_rows_are_read_in_path_order_without_a_sort(library):
    """The build reads every vector: it must walk the path index, not sort the rows."""
    conn = db.connect(library["db"], readonly=True)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        rows = [r for page in records.iter_search_rows(conn, "x", 1) for r in page]
        assert rows == []
        sql = next(s for s in statements if "embedding" in s)
        plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
    finally:
        conn.close()
    assert "TEMP B-TREE" not in plan, plan


# -- the change counter (migrations/0002_search.sql) -----------------------------------
def _counter(conn: sqlite3.Connection) -> int:
    return records.vectors_version(conn)[1]


def test_change_counter_moves_only_with_what_a_search_sees(tmp_path):
    conn = db.connect(tmp_path / "state.sqlite")
    try:
        database_id, start = records.vectors_version(conn)
        assert len(database_id) == 32 and start == 0
        run = runs.start_run(conn, mode="reindex", model="m", config={}, pid=0)
        vec = np.ones(4, dtype="<f4").tobytes()
        imported = [state.Imported(f"/p/{i}.jpg", 1, 1, 1, vec, 4, 1, 1, {}) for i in range(3)]
        state.import_vectors(conn, imported, run)
        assert _counter(conn) == 3  # three ok rows inserted
        conn.execute("UPDATE files SET ctime_ns = 5")  # not something a search reads
        conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns) VALUES ('/p/new.jpg', 1, 1, 1)")
        assert _counter(conn) == 3  # a pending row holds no vector
        conn.execute("UPDATE files SET status = 'failed' WHERE path = '/p/new.jpg'")
        assert _counter(conn) == 3
        conn.execute("UPDATE files SET status = 'pending' WHERE path = '/p/0.jpg'")
        assert _counter(conn) == 4
        conn.execute("UPDATE files SET exif = '{\"Model\": \"X\"}' WHERE path = '/p/1.jpg'")
        assert _counter(conn) == 5
        conn.execute("DELETE FROM files WHERE path IN ('/p/2.jpg', '/p/new.jpg')")
        assert _counter(conn) == 6
    finally:
        conn.close()


def test_upgrade_from_schema_1_keeps_rows_and_starts_the_counter(tmp_path, monkeypatch):
    from conftest import REPO

    path = tmp_path / "state.sqlite"
    only_first = tmp_path / "migrations"
    only_first.mkdir()
    shutil.copy(REPO / "migrations" / "0001_init.sql", only_first / "0001_init.sql")
    with monkeypatch.context() as m:
        m.setattr(db, "_migrations_dir", lambda: only_first)
        conn = db.connect(path)
        conn.execute("INSERT INTO files (path, size, mtime_ns, ctime_ns, status, model, dim, embedding) "
                     "VALUES ('/p/a.jpg', 1, 1, 1, 'ok', 'm', 1, x'0000803f')")
        conn.close()
    # A read-only connection cannot migrate: the old schema is served without the cache.
    ro = db.open_readonly(path)
    try:
        assert records.vectors_version(ro) is None
        model = vectors_mod.choose_model(ro, None, where="db")
        idx = vectors_mod.load_index(ro, path, model)
        assert idx.origin == "memory" and search.top_k(idx, np.ones(1), 1)[0].path == "/p/a.jpg"
    finally:
        ro.close()
    conn = db.connect(path)  # what any index run does
    try:
        assert records.schema_version(conn) == db.schema_version()
        assert records.vectors_version(conn)[1] == 0
        assert conn.execute("SELECT count(*) FROM files").fetchone()[0] == 1
        conn.execute("UPDATE files SET embedding = x'000080bf'")
        assert records.vectors_version(conn)[1] == 1
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "files_status_model" in names and "files_status" not in names
    finally:
        conn.close()


# -- errors ----------------------------------------------------------------------------
def test_missing_database_is_not_created(runner, tmp_path):
    missing = tmp_path / "nope.sqlite"
    for args in (["search", "x"], ["similar", "a.jpg"], ["duplicates"]):
        result = run_cli(runner, [*args, "--db", missing], ok=False)
        assert result.exit_code == 1
        assert "does not exist" in one_error_line(result)
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def test_db_is_required(runner, monkeypatch):
    monkeypatch.delenv("SQLINDEXER_DB", raising=False)
    result = run_cli(runner, ["search", "x"], ok=False)
    assert result.exit_code == 2 and "--db" in result.stderr


def test_file_that_is_not_sqlite(runner, tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_bytes(b"these are my notes, not a database\n" * 50)
    result = run_cli(runner, ["search", "x", "--db", bogus], ok=False)
    assert result.exit_code == 1
    assert "not a database" in one_error_line(result)
    assert bogus.read_bytes() == b"these are my notes, not a database\n" * 50


def test_empty_files(runner, tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    result = run_cli(runner, ["duplicates", "--db", empty], ok=False)
    assert result.exit_code == 1 and "not an image-indexer database" in one_error_line(result)
    assert empty.read_bytes() == b""
    fresh = tmp_path / "fresh.sqlite"
    db.connect(fresh).close()
    result = run_cli(runner, ["search", "x", "--db", fresh], ok=False)
    assert result.exit_code == 1 and "no indexed images" in one_error_line(result)


def test_unknown_model_and_several_models(runner, library, tmp_path):
    result = run_cli(runner, ["search", "x", "--db", library["db"], "--model-name", "google/other"], ok=False)
    line = one_error_line(result)
    assert result.exit_code == 1 and "no vectors of model google/other" in line and "10 x 32-d" in line

    two = tmp_path / "two.sqlite"
    shutil.copy(library["db"], two)
    conn = sqlite3.connect(two)
    conn.execute("UPDATE files SET model = 'another/model' WHERE path LIKE '%/2003/%'")
    conn.commit()
    conn.close()
    result = run_cli(runner, ["similar", library["photos"] / "misc" / "n6.jpg", "--db", two], ok=False)
    line = one_error_line(result)
    assert result.exit_code == 1 and "several models" in line and "--model-name" in line
    result = run_cli(runner, ["similar", library["photos"] / "2003" / "canon.jpg", "--db", two, "--top", 20,
                              "--model-name", "another/model"])
    assert sorted(Path(h["path"]).name for h in json_lines(result.stdout)) == ["canon.jpg", "nikon.jpg"]


def test_query_image_errors(runner, library, tmp_path):
    result = run_cli(runner, ["similar", tmp_path / "missing.jpg", "--db", library["db"]], ok=False)
    assert result.exit_code == 1 and "is not indexed" in one_error_line(result)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg" * 20)
    result = run_cli(runner, ["similar", junk, "--db", library["db"]], ok=False)
    assert result.exit_code == 1 and f"cannot read {junk}" in one_error_line(result)


def test_model_that_cannot_be_loaded(runner, library, tmp_path, tiny_model):
    gone = tmp_path / "gone-model"
    shutil.copytree(tiny_model, gone)
    dbp = tmp_path / "index.sqlite"
    shutil.copy(library["db"], dbp)
    conn = sqlite3.connect(dbp)
    conn.execute("UPDATE files SET model = ?", (str(gone),))
    conn.commit()
    conn.close()
    shutil.rmtree(gone)
    result = run_cli(runner, ["search", "x", "--db", dbp], ok=False)
    line = one_error_line(result)
    assert result.exit_code == 1 and "cannot load" in line and str(gone) in line


def test_readonly_wal_database_without_shm_is_read_as_immutable(library, tmp_path, monkeypatch):
    """SQLite refuses a read-only WAL database whose -shm it cannot create (a folder we may
    not write); as root that cannot be set up with chmod, so the refusal is injected."""
    copy = tmp_path / "ro.sqlite"
    shutil.copy(library["db"], copy)  # a cleanly closed database: no -wal to lose

    def refuse(path, *, readonly=False):
        cause = sqlite3.OperationalError("attempt to write a readonly database")
        raise DatabaseError(f"cannot open working database {path}: {cause}") from cause

    monkeypatch.setattr(db, "connect", refuse)
    conn = db.open_readonly(copy)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # immutable
        assert records.vector_models(conn)[0].count == 10
    finally:
        conn.close()
    Path(str(copy) + "-wal").write_bytes(b"x" * 100)  # committed work only the -wal holds
    with pytest.raises(errors.SearchError, match="ro.sqlite-wal holds transactions not yet in the database"):
        db.open_readonly(copy)


# -- the core, on synthetic vectors ----------------------------------------------------
def _index(vectors: np.ndarray, paths: list[str] | None = None) -> vectors_mod.VectorIndex:
    n = len(vectors)
    paths = paths or [f"/p/{i:05d}.jpg" for i in range(n)]
    blob = b"".join(p.encode() for p in paths)
    offsets = np.concatenate([[0], np.cumsum([len(p.encode()) for p in paths])]).astype(np.int64)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    return vectors_mod.VectorIndex("m", vectors.shape[1], vectors, np.arange(n), np.zeros(n, np.int64),
                              np.full(n, -1, np.int32), [], vectors_mod.PathTable(np.frombuffer(blob, np.uint8), offsets),
                              origin="memory")


def test_duplicate_groups_blockwise_equal_brute_force():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((12, 16))
    # 12 clusters of 1..5 noisy copies, shuffled, plus a chain a~b~c with a !~ c.
    vecs = np.concatenate([c + 0.05 * rng.standard_normal((1 + i % 5, 16)) for i, c in enumerate(centres)])
    turn = np.deg2rad(11.5)  # cos 11.5 deg = 0.980, cos 23 deg = 0.921
    chain = np.zeros((3, 16))
    chain[:, 0], chain[:, 1] = np.cos([0, turn, 2 * turn]), np.sin([0, turn, 2 * turn])
    vecs = np.concatenate([vecs, chain])[rng.permutation(len(vecs) + 3)]
    idx = _index(vecs)
    threshold = 0.97
    sims = idx.vectors @ idx.vectors.T
    # Brute force: connected components of the full matrix, by repeated merging.
    label = np.arange(len(vecs))
    a, b = np.nonzero(np.triu(sims >= threshold, 1))
    for _ in range(len(vecs)):
        for x, y in zip(a, b):
            label[x] = label[y] = min(label[x], label[y])
    expected = sorted((sorted(np.flatnonzero(label == lab).tolist()) for lab in set(label.tolist())
                       if (label == lab).sum() > 1), key=lambda g: (-len(g), g[0]))
    for block in (3, 7, 1000):
        groups = duplicates.duplicate_groups(idx, threshold, block=block)
        got = [[int(m[0].split("/")[-1][:5]) for m in g.members] for g in groups]
        assert got == expected, block
    assert any(sims[np.ix_(g, g)].min() < threshold for g in expected), "the test needs a chain: a~b~c, a!~c"


def test_top_k_matches_a_full_sort_with_and_without_rows():
    rng = np.random.default_rng(3)
    idx = _index(rng.standard_normal((500, 24)))
    q = rng.standard_normal(24)
    full = idx.vectors @ (q / np.linalg.norm(q))
    hits = search.top_k(idx, q, 10)
    assert [int(h.path[3:8]) for h in hits] == np.argsort(-full, kind="stable")[:10].tolist()
    for rows in (np.arange(100, 180), np.arange(0, 500, 3), np.array([5, 400])):
        hits = search.top_k(idx, q, 10, rows)
        expected = rows[np.argsort(-full[rows], kind="stable")][:10]
        assert [int(h.path[3:8]) for h in hits] == expected.tolist()
        assert [h.score for h in hits] == pytest.approx(full[expected].tolist(), abs=1e-6)
    assert search.top_k(idx, q, 10, np.array([], dtype=np.int64)) == []


def test_path_table_find_and_prefix_on_utf8_order():
    paths = sorted(["/a/b.jpg", "/a/b/c.jpg", "/a/bé.jpg", "/a/b-1.jpg", "/ä/x.jpg", "/a/z.jpg"],
                   key=lambda p: p.encode())
    table = _index(np.ones((len(paths), 2)), paths).paths
    assert [table[i] for i in range(len(table))] == paths
    assert all(table.find(p) == i for i, p in enumerate(paths))
    assert table.find("/a/b") is None and table.find("/zzz") is None
    lo, hi = table.prefix_range("/a/b/")
    assert paths[lo:hi] == ["/a/b/c.jpg"]
    lo, hi = table.prefix_range("/a/b")
    assert paths[lo:hi] == ["/a/b-1.jpg", "/a/b.jpg", "/a/b/c.jpg", "/a/bé.jpg"]


def test_parse_date():
    assert search.parse_date("2003") == search.parse_date("2003-01-01 00:00:00")
    assert search.parse_date("2003:12:14 12:01:44") - search.parse_date("2003-12-14") == 12 * 3600 + 104
    assert search.parse_date("2003-12-14T12:01") == search.parse_date("2003/12/14 12:01:00")
    for bad in ("2003-00", "14.12.2003", "2003-12-14 25:00", ""):
        with pytest.raises(ValueError):
            search.parse_date(bad)


def test_vectors_of_one_model_with_two_lengths_are_refused(tmp_path):
    conn = db.connect(tmp_path / "state.sqlite")
    try:
        run = runs.start_run(conn, mode="reindex", model="m", config={}, pid=0)
        state.import_vectors(conn, [state.Imported(f"/p/{d}.jpg", 1, 1, 1, np.ones(d, "<f4").tobytes(), d, 1, 1, {})
                                    for d in (2, 3)], run)
        for requested in (None, "m"):
            with pytest.raises(errors.SearchError, match="several lengths"):
                vectors_mod.choose_model(conn, requested, where="db")
    finally:
        conn.close()


def test_a_new_cache_folder_is_synced_whole_before_it_is_renamed_into_place(runner, tmp_path, tiny_model,
                                                                            monkeypatch):
    # Every file of the folder and the folder itself reach the disk before the rename:
    # after a power loss a cache under its final name holds whole files.
    photos, out, dbp = tmp_path / "photos", tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    for seed in range(3):
        noise_photo(photos / f"p{seed}.jpg", seed)
    index(runner, photos, out, tiny_model)
    synced, fsync = set(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.fstat(fd).st_ino), fsync(fd))[1])
    renamed_with, rename = [], os.rename

    def recording_rename(src, dst):
        if Path(dst).parent == dbp.parent and Path(src).is_dir():
            renamed_with.append(set(synced))
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", recording_rename)
    run_cli(runner, ["search", "a red car", "--db", dbp, "--top", 10])
    [folder] = cache_folders(dbp)
    want = {p.stat().st_ino for p in folder.iterdir()} | {folder.stat().st_ino}
    assert renamed_with and want <= renamed_with[0], "the cache folder was renamed into place before it was synced"
