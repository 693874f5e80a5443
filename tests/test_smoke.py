from pathlib import Path

from conftest import make_photo, read_jsonl, run_cli


def test_index_small_tree(runner, tiny_model, tmp_path):
    photos = tmp_path / "photos"
    for i in range(3):
        make_photo(photos / f"p{i}.jpg", seed=i)
    out = tmp_path / "index.jsonl"
    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model])
    assert "scanned 3, new 3" in result.stderr
    records = read_jsonl(out)
    assert [Path(r["metadata"]["path"]).name for r in records] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert (tmp_path / "index.sqlite").is_file()
