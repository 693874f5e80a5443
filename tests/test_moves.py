"""Photos that move are not new: a --reindex gives a renamed, moved, copied, re-rooted or
touched file the vector its content already has (neither decoded nor embedded), and only
a change of the bytes is embedded again. Each case checks the runs table's counts and the
exported vectors bit for bit against the originals; then --exclude and duplicates --exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import bump_mtime, make_photo, open_db, read_jsonl, run_cli, summary_line

from sqlindexer.run import byte_size

N = 6


def _last_run(db: Path) -> dict:
    with open_db(db) as conn:
        return dict(conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())


def _counts(db: Path, *names: str) -> tuple:
    run = _last_run(db)
    return tuple(run[n] for n in names)


def _exported(out: Path) -> dict[str, dict]:
    """path -> record, with the vector as the float32 bytes the database stores."""
    import numpy as np

    found = {}
    for record in read_jsonl(out):
        record["bits"] = np.asarray(record["vector"], dtype="<f4").tobytes()
        found[record["metadata"]["path"]] = record
    return found


def _rows(db: Path) -> dict[str, dict]:
    with open_db(db) as conn:
        return {r["path"]: dict(r) for r in conn.execute("SELECT * FROM files")}


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    for i in range(N):
        make_photo(root / "photos" / f"p{i}.jpg", size=(64 + 4 * i, 48), seed=i)
    make_photo(root / "other" / "o.png", seed=40, fmt="PNG")
    return root


def _index(runner, root: Path, tmp_path: Path, model: Path, *extra, reindex: bool = True):
    args = ["-i", root, "-o", tmp_path / "index.jsonl", "--model-name", model, *extra]
    return run_cli(runner, [*args, "--reindex"] if reindex else args)


def _first(runner, lib, tmp_path, model) -> tuple[Path, dict[str, dict]]:
    _index(runner, lib, tmp_path, model, reindex=False)
    return tmp_path / "index.sqlite", _exported(tmp_path / "index.jsonl")


def _same_vectors(after: dict[str, dict], before: dict[str, dict], pairs: dict[str, str]) -> None:
    """new path -> old path: same vector bits, width, height and EXIF; own path and name."""
    for new, old in pairs.items():
        a, b = after[new], before[old]
        assert a["bits"] == b["bits"], f"{new} did not keep the vector of {old}"
        for key in ("width", "height", "exif"):
            assert a["metadata"][key] == b["metadata"][key], (new, key)
        assert a["metadata"]["filename"] == Path(new).name
        assert a["metadata"]["size_bytes"] == os.stat(new).st_size


def test_first_index_stores_the_fingerprint_of_what_it_decoded(runner, tmp_path, lib, tiny_model):
    from sqlindexer import fingerprint

    db, _ = _first(runner, lib, tmp_path, tiny_model)
    rows = _rows(db)
    assert len(rows) == N + 1
    for path, row in rows.items():
        assert row["content"] == fingerprint.digest(Path(path).read_bytes()), path
        st = os.stat(path)
        assert (row["dev"], row["ino"]) == (st.st_dev, st.st_ino)
    total = sum(os.stat(p).st_size for p in rows)
    assert _counts(db, "decoded", "embedded", "reused", "hashed_bytes") == (N + 1, N + 1, 0, total)


def test_folder_moved_on_one_filesystem_is_reused_without_reading(runner, tmp_path, lib, tiny_model):
    db, before = _first(runner, lib, tmp_path, tiny_model)
    (lib / "photos").rename(lib / "photos-2024")

    result = _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "deleted", "decoded", "embedded", "reused", "renamed", "hashed_bytes") == \
        (N, N, 0, 0, N, N, 0)
    assert "reused the vectors of 6 moved, copied or touched files (6 renamed, read 0 bytes" in summary_line(result)
    after = _exported(tmp_path / "index.jsonl")
    assert len(after) == N + 1
    _same_vectors(after, before, {str(lib / "photos-2024" / f"p{i}.jpg"): str(lib / "photos" / f"p{i}.jpg")
                                  for i in range(N)})


def test_renamed_file_moves_its_row_and_no_vector_is_written(runner, tmp_path, lib, tiny_model):
    # A rename moves the old row to the new path: same id, no row inserted or deleted, and
    # no vector written (a trigger of the test's own records every write of one).
    db, before = _first(runner, lib, tmp_path, tiny_model)
    ids = {path: row["id"] for path, row in _rows(db).items()}
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE written (id INTEGER, what TEXT);"
            "CREATE TRIGGER t_vec AFTER UPDATE OF embedding ON files BEGIN INSERT INTO written VALUES (NEW.id, 'vector'); END;"
            "CREATE TRIGGER t_ins AFTER INSERT ON files BEGIN INSERT INTO written VALUES (NEW.id, 'insert'); END;"
            "CREATE TRIGGER t_del AFTER DELETE ON files BEGIN INSERT INTO written VALUES (OLD.id, 'delete'); END;"
        )
    (lib / "photos").rename(lib / "photos-2024")

    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "deleted", "decoded", "embedded", "reused", "renamed") == (N, N, 0, 0, N, N)
    with open_db(db) as conn:
        assert conn.execute("SELECT * FROM written").fetchall() == []
        run_id = conn.execute("SELECT max(id) FROM runs").fetchone()[0]
    rows = _rows(db)
    for i in range(N):
        new, old = str(lib / "photos-2024" / f"p{i}.jpg"), str(lib / "photos" / f"p{i}.jpg")
        assert rows[new]["id"] == ids[old] and rows[new]["changed_run"] == run_id
        assert rows[new]["ctime_ns"] == os.stat(new).st_ctime_ns
    assert set(rows) == {p.replace("/photos/", "/photos-2024/") for p in ids}
    _same_vectors(_exported(tmp_path / "index.jsonl"), before,
                  {str(lib / "photos-2024" / f"p{i}.jpg"): str(lib / "photos" / f"p{i}.jpg") for i in range(N)})


def test_renamed_files_past_the_held_limit_still_keep_their_vectors(runner, tmp_path, lib, tiny_model, monkeypatch):
    # Past state.HELD_NEW new files the scan writes them as they come; the reuse step's
    # inode rule then gives the renamed ones their vectors, still without reading them.
    from sqlindexer import state

    monkeypatch.setattr(state, "HELD_NEW", 2)
    db, before = _first(runner, lib, tmp_path, tiny_model)
    (lib / "photos").rename(lib / "photos-2024")

    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "deleted", "decoded", "embedded", "reused", "renamed", "hashed_bytes") == \
        (N, N, 0, 0, N, N, 0)
    _same_vectors(_exported(tmp_path / "index.jsonl"), before,
                  {str(lib / "photos-2024" / f"p{i}.jpg"): str(lib / "photos" / f"p{i}.jpg") for i in range(N)})


def test_files_renamed_keep_their_vectors(runner, tmp_path, lib, tiny_model):
    db, before = _first(runner, lib, tmp_path, tiny_model)
    (lib / "photos" / "p0.jpg").rename(lib / "photos" / "holiday.jpg")
    (lib / "photos" / "p1.jpg").rename(lib / "other" / "p1-moved.jpg")
    # Two files swap names: each path now holds the other's bytes.
    (lib / "photos" / "p2.jpg").rename(lib / "tmp.jpg")
    (lib / "photos" / "p3.jpg").rename(lib / "photos" / "p2.jpg")
    (lib / "tmp.jpg").rename(lib / "photos" / "p3.jpg")

    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "modified", "deleted", "decoded", "embedded", "reused") == (2, 2, 2, 0, 0, 4)
    after = _exported(tmp_path / "index.jsonl")
    p = lib / "photos"
    _same_vectors(after, before, {str(p / "holiday.jpg"): str(p / "p0.jpg"),
                                  str(lib / "other" / "p1-moved.jpg"): str(p / "p1.jpg"),
                                  str(p / "p2.jpg"): str(p / "p3.jpg"), str(p / "p3.jpg"): str(p / "p2.jpg")})


def test_folder_copied_takes_the_vectors_by_fingerprint(runner, tmp_path, lib, tiny_model):
    db, before = _first(runner, lib, tmp_path, tiny_model)
    shutil.copytree(lib / "photos", lib / "backup")  # new files, new mtimes: only the bytes are the same

    result = _index(runner, lib, tmp_path, tiny_model)
    size = sum(p.stat().st_size for p in (lib / "backup").iterdir())
    assert _counts(db, "new", "deleted", "decoded", "embedded", "reused", "renamed", "hashed_bytes") == \
        (N, 0, 0, 0, N, 0, size)
    assert f"({0} renamed, read " in summary_line(result)
    after = _exported(tmp_path / "index.jsonl")
    assert len(after) == 2 * N + 1
    _same_vectors(after, before, {str(lib / "backup" / f"p{i}.jpg"): str(lib / "photos" / f"p{i}.jpg")
                                  for i in range(N)})
    # The originals are untouched.
    for i in range(N):
        assert after[str(lib / "photos" / f"p{i}.jpg")] == before[str(lib / "photos" / f"p{i}.jpg")]


@pytest.mark.parametrize("files, bytes_, commits", [(3, 1 << 30, [4, 2]), (1000, 1, [2, 2, 2])])
def test_copies_are_hashed_in_batches_and_committed_in_larger_ones(runner, tmp_path, lib, tiny_model, monkeypatch,
                                                                   files, bytes_, commits):
    # Batches of 2 are hashed; the matches are committed once ADOPT_FILES files or
    # ADOPT_BYTES bytes are held, and at the end.
    from sqlindexer import content, reuse

    monkeypatch.setattr(reuse, "BATCH", 2)
    monkeypatch.setattr(reuse, "ADOPT_FILES", files)
    monkeypatch.setattr(reuse, "ADOPT_BYTES", bytes_)
    sizes = []
    adopt = content.adopt

    def recorded(conn, adoptions, run, **kw):
        sizes.append(len(adoptions))
        return adopt(conn, adoptions, run, **kw)

    monkeypatch.setattr(content, "adopt", recorded)
    db, before = _first(runner, lib, tmp_path, tiny_model)
    shutil.copytree(lib / "photos", lib / "backup")

    _index(runner, lib, tmp_path, tiny_model)
    assert sizes == commits
    assert _counts(db, "new", "decoded", "embedded", "reused") == (N, 0, 0, N)
    _same_vectors(_exported(tmp_path / "index.jsonl"), before,
                  {str(lib / "backup" / f"p{i}.jpg"): str(lib / "photos" / f"p{i}.jpg") for i in range(N)})


def test_tree_copied_to_a_new_root_reuses_everything(runner, tmp_path, lib, tiny_model):
    # A new disk: the library copied whole under another root, the old one gone; other
    # inodes, other mtimes, the same bytes.
    out = tmp_path / "index.jsonl"
    run_cli(runner, ["-i", lib, "-o", out, "--model-name", tiny_model])
    before = _exported(out)
    new_root = tmp_path / "mnt" / "nas" / "lib"
    shutil.copytree(lib, new_root, copy_function=shutil.copyfile)
    shutil.rmtree(lib)

    run_cli(runner, ["-i", new_root, "-o", out, "--model-name", tiny_model, "--reindex"])
    db = tmp_path / "index.sqlite"
    assert _counts(db, "new", "deleted", "decoded", "embedded", "reused", "renamed") == (N + 1, N + 1, 0, 0, N + 1, 0)
    after = _exported(out)
    _same_vectors(after, before, {str(new_root / Path(p).relative_to(lib)): p for p in before})


def test_touched_file_takes_back_its_own_vector(runner, tmp_path, lib, tiny_model):
    db, before = _first(runner, lib, tmp_path, tiny_model)
    target = lib / "photos" / "p2.jpg"
    bump_mtime(target)
    rows = _rows(db)

    result = _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "modified", "decoded", "embedded", "reused", "hashed_bytes") == \
        (1, 0, 0, 1, target.stat().st_size)
    assert "reused the vectors of 1 moved" in summary_line(result)
    after = _exported(tmp_path / "index.jsonl")
    assert after[str(target)]["bits"] == before[str(target)]["bits"]
    assert after[str(target)]["metadata"]["modification_time"] != before[str(target)]["metadata"]["modification_time"]
    row = _rows(db)[str(target)]
    assert row["id"] == rows[str(target)]["id"] and row["mtime_ns"] == target.stat().st_mtime_ns


def test_new_bytes_with_old_size_and_mtime_restored_by_hand_are_unchanged_by_design(runner, tmp_path, lib,
                                                                                    tiny_model):
    # Size and mtime are what a re-index trusts: a file rewritten with other bytes of the
    # same length, its mtime set back by hand, is not read again (as before fingerprints).
    db, before = _first(runner, lib, tmp_path, tiny_model)
    target = lib / "photos" / "p1.jpg"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # inside the JPEG's entropy-coded data, before its end marker
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "unchanged", "modified", "decoded", "embedded", "reused", "hashed_bytes") == \
        (N + 1, 0, 0, 0, 0, 0)
    assert _exported(tmp_path / "index.jsonl")[str(target)]["bits"] == before[str(target)]["bits"]


def test_file_edited_in_place_is_embedded_again(runner, tmp_path, lib, tiny_model):
    from sqlindexer import fingerprint

    db, before = _first(runner, lib, tmp_path, tiny_model)
    target = lib / "photos" / "p3.jpg"
    make_photo(target, size=(64 + 12, 48), seed=33)
    bump_mtime(target)

    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "modified", "decoded", "embedded", "reused") == (1, 1, 1, 0)
    after = _exported(tmp_path / "index.jsonl")
    assert after[str(target)]["bits"] != before[str(target)]["bits"]
    assert _rows(db)[str(target)]["content"] == fingerprint.digest(target.read_bytes())


def test_copy_whose_original_is_then_deleted(runner, tmp_path, lib, tiny_model):
    db, before = _first(runner, lib, tmp_path, tiny_model)
    original, copy = lib / "photos" / "p4.jpg", lib / "keep" / "p4-copy.jpg"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "decoded", "embedded", "reused") == (1, 0, 0, 1)

    original.unlink()
    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "deleted", "decoded", "embedded", "reused") == (1, 0, 0, 0)
    after = _exported(tmp_path / "index.jsonl")
    assert str(original) not in after
    _same_vectors(after, before, {str(copy): str(original)})

    # Copied and the original deleted within one run: the copy finds the vector on the row
    # this run finds gone.
    moved = lib / "elsewhere" / "p5.jpg"
    moved.parent.mkdir()
    shutil.copyfile(lib / "photos" / "p5.jpg", moved)
    (lib / "photos" / "p5.jpg").unlink()
    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "deleted", "decoded", "embedded", "reused", "renamed") == (1, 1, 0, 0, 1, 0)
    _same_vectors(_exported(tmp_path / "index.jsonl"), before, {str(moved): str(lib / "photos" / "p5.jpg")})


def test_full_build_embeds_everything_anew(runner, tmp_path, lib, tiny_model):
    db, _ = _first(runner, lib, tmp_path, tiny_model)
    (lib / "photos").rename(lib / "moved")
    shutil.copytree(lib / "moved", lib / "copy")
    _index(runner, lib, tmp_path, tiny_model, reindex=False)
    assert _counts(db, "decoded", "embedded", "reused") == (2 * N + 1, 2 * N + 1, 0)


def test_other_model_is_not_reused(runner, tmp_path, lib, tiny_model, other_tiny_model):
    db, _ = _first(runner, lib, tmp_path, tiny_model)
    (lib / "photos").rename(lib / "moved")
    _index(runner, lib, tmp_path, other_tiny_model)
    assert _counts(db, "embedded", "reused") == (N + 1, 0)


def test_database_made_before_fingerprints(runner, tmp_path, lib, tiny_model):
    # What the migration leaves of an older database: no fingerprints, no inodes. The
    # first scan records the inodes (nothing embedded); a copy of an indexed file makes
    # the original be read and fingerprinted, then both share the vector.
    db, before = _first(runner, lib, tmp_path, tiny_model)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE files SET content = NULL, dev = NULL, ino = NULL")
    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "unchanged", "decoded", "embedded", "reused") == (N + 1, 0, 0, 0)
    assert all(r["ino"] is not None and r["content"] is None for r in _rows(db).values())

    (lib / "photos" / "p0.jpg").rename(lib / "photos" / "renamed.jpg")  # the inode rule, from this run on
    shutil.copyfile(lib / "photos" / "p1.jpg", lib / "p1-copy.jpg")
    _index(runner, lib, tmp_path, tiny_model)
    assert _counts(db, "new", "decoded", "embedded", "reused", "renamed") == (2, 0, 0, 2, 1)
    rows = _rows(db)
    assert rows[str(lib / "photos" / "p1.jpg")]["content"] is not None  # read and fingerprinted on the way
    _same_vectors(_exported(tmp_path / "index.jsonl"), before,
                  {str(lib / "p1-copy.jpg"): str(lib / "photos" / "p1.jpg"),
                   str(lib / "photos" / "renamed.jpg"): str(lib / "photos" / "p0.jpg")})


def test_moved_corpus_photos_are_neither_decoded_nor_embedded(runner, tmp_path, corpus, tiny_model):
    # The measurement on real images: the corpus's photos/ folder moved to
    # photos-2024/ (here on the same filesystem, then copied across roots).
    root = tmp_path / "lib"
    # A part of the folder, to keep the test short; bench/rescan.py moves 10,000 files.
    src = corpus / "real" / "photos"
    for photo in sorted(p for p in src.rglob("*") if p.is_file())[:40]:
        (root / "photos" / photo.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, root / "photos" / photo.relative_to(src))
    shutil.copytree(corpus / "real" / "jpeg", root / "jpeg")
    out = tmp_path / "index.jsonl"
    run_cli(runner, ["-i", root, "-o", out, "--model-name", tiny_model])
    db = tmp_path / "index.sqlite"
    ok = _last_run(db)["embedded"]
    before = _exported(out)
    moved = sum(1 for p in before if "/photos/" in p)
    (root / "photos").rename(root / "photos-2024")

    run_cli(runner, ["-i", root, "-o", out, "--model-name", tiny_model, "--reindex"])
    run = _last_run(db)
    assert (run["decoded"], run["embedded"]) == (0, 0)
    assert run["new"] == run["deleted"] == run["renamed"] == run["reused"] == moved > 30
    after = _exported(out)
    assert len(after) == ok
    _same_vectors(after, before, {p: p.replace("/photos-2024/", "/photos/") for p in after if "/photos-2024/" in p})


# -- --exclude ---------------------------------------------------------------------------
def test_exclude_patterns_skip_folders_and_files(runner, tmp_path, lib, tiny_model):
    make_photo(lib / "photos" / "@eaDir" / "p0.jpg" / "SYNOPHOTO_THUMB_XL.jpg", seed=50)
    make_photo(lib / "photos" / "p0_thumb.jpg", seed=51)
    make_photo(lib / "Screenshots" / "s.png", seed=52, fmt="PNG")
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, ["-i", lib, "-o", out, "--model-name", tiny_model])
    assert _last_run(db)["scanned"] == N + 4

    # An excluded folder is not walked: one that cannot be listed is not even noticed.
    (lib / "photos" / "@eaDir").chmod(0)
    try:
        result = run_cli(runner, ["-i", lib, "-o", out, "--model-name", tiny_model, "--reindex",
                                  "--exclude", "@eaDir/", "--exclude", "*_thumb.jpg", "--exclude", "Screenshots/"])
    finally:
        (lib / "photos" / "@eaDir").chmod(0o755)
    assert "cannot list" not in result.stderr
    assert _counts(db, "scanned", "deleted", "embedded") == (N + 1, 3, 0)
    assert sorted(Path(p).name for p in _exported(out)) == sorted([f"p{i}.jpg" for i in range(N)] + ["o.png"])

    # The same from YAML.
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"input_dirs": [str(lib)], "output_file": str(out), "model_name": str(tiny_model),
                                  "exclude": ["other/"], "reindex": True}))
    run_cli(runner, ["-c", config])
    assert _counts(db, "scanned", "deleted") == (N + 3, 1)  # other/o.png gone; the rest is back
    assert str(lib / "other" / "o.png") not in _exported(out)


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_malformed_exclude_pattern_is_one_line_before_any_work(runner, tmp_path, lib, tiny_model, where):
    out = tmp_path / "index.jsonl"
    args = ["-i", lib, "-o", out, "--model-name", tiny_model]
    if where == "cli":
        args += ["--exclude", "ok/", "--exclude", "\\"]
    else:
        config = tmp_path / "config.yaml"
        config.write_text("exclude:\n  - '!'\n")
        args += ["-c", config]
    result = run_cli(runner, args, ok=False)
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a valid gitignore pattern" in lines[0], result.stderr
    assert not (tmp_path / "index.sqlite").exists()


def test_scanner_matches_patterns_relative_to_each_root(tmp_path):
    from sqlindexer.scan import Scanner

    for rel in ("a/x.jpg", "a/skip/y.jpg", "b/skip/z.jpg", "b/top.jpg", "b/sub/top.jpg", "a/n_thumb.jpg"):
        make_photo(tmp_path / rel)
    found = [Path(r.path).relative_to(tmp_path).as_posix()
             for r in Scanner([tmp_path / "a", tmp_path / "b"], exclude=["skip/", "/top.jpg", "*_thumb.jpg"])]
    assert found == ["a/x.jpg", "b/sub/top.jpg"]


# -- duplicates --exact ------------------------------------------------------------------
def test_duplicates_exact_groups_byte_identical_files(runner, tmp_path, lib, tiny_model):
    db, _ = _first(runner, lib, tmp_path, tiny_model)
    shutil.copyfile(lib / "photos" / "p0.jpg", lib / "other" / "p0 copy.jpg")
    shutil.copyfile(lib / "photos" / "p0.jpg", lib / "other" / "p0 copy 2.jpg")
    shutil.copyfile(lib / "photos" / "p3.jpg", lib / "p3.jpg")
    _index(runner, lib, tmp_path, tiny_model)

    result = run_cli(runner, ["duplicates", "--exact", "--db", db, "--json"])
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["size"] for g in groups] == [3, 2]
    assert [Path(i["path"]).name for i in groups[0]["images"]] == ["p0 copy 2.jpg", "p0 copy.jpg", "p0.jpg"]
    assert groups[0]["bytes"] == (lib / "photos" / "p0.jpg").stat().st_size
    assert "2 groups of byte-identical files (5 files) among 10 fingerprinted files" in result.stderr

    text = run_cli(runner, ["duplicates", "--exact", "--db", db, "--table"]).stdout
    assert text.splitlines()[0].startswith("group 1: 3 identical files")

    page = tmp_path / "exact.html"
    run_cli(runner, ["duplicates", "--exact", "--db", db, "--html", page])
    html = page.read_text(encoding="utf-8")
    assert "Byte-identical files" in html and html.count("<section") == 2, html[:2000]
    assert all(name in html for name in ("p0 copy 2.jpg", "p0 copy.jpg", "p3.jpg"))


def test_hash_file_refuses_a_file_that_changed(tmp_path):
    from sqlindexer import fingerprint

    path = make_photo(tmp_path / "a.jpg")
    st = path.stat()
    assert fingerprint.hash_file(str(path), size=st.st_size, mtime_ns=st.st_mtime_ns) == \
        fingerprint.digest(path.read_bytes())
    assert fingerprint.hash_file(str(path), size=st.st_size + 1, mtime_ns=st.st_mtime_ns) is None
    assert fingerprint.hash_file(str(tmp_path / "gone.jpg"), size=1, mtime_ns=1) is None


def test_status_shows_reused_files(runner, tmp_path, lib, tiny_model):
    db, _ = _first(runner, lib, tmp_path, tiny_model)
    (lib / "photos").rename(lib / "moved")
    _index(runner, lib, tmp_path, tiny_model)
    info = json.loads(run_cli(runner, ["status", "--db", db, "--json"]).stdout)
    total = sum(p.stat().st_size for p in lib.rglob("*.*"))
    assert [(r["reused"], r["renamed"], r["embedded"], r["hashed_bytes"]) for r in info["runs"]] == \
        [(N, N, 0, 0), (0, 0, N + 1, total)]
    lines = run_cli(runner, ["status", "--db", db, "--table"]).stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["id", "mode"])
    # Columns are two spaces apart or more; a cell ("started (UTC)", "0 s", "1.2 KiB") has one at most.
    header, latest, first = (re.split(r"\s{2,}", line.strip()) for line in lines[at : at + 3])
    assert len(header) == len(latest) == len(first) == 14, lines
    assert dict(zip(header, latest)) | {"started (UTC)": "", "took": ""} == {
        "id": "2", "mode": "reindex", "status": "completed", "started (UTC)": "", "took": "", "scanned": str(N + 1),
        "new": str(N), "modified": "0", "deleted": str(N), "reused": str(N), "hashed": "0 bytes", "embedded": "0",
        "failed": "0", "exported": str(N + 1)}
    # The first index hashed every file it decoded.
    assert dict(zip(header, first))["hashed"] == byte_size(total)
