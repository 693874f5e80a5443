"""Hostile config files: numbers far out of range, infinities, wrong types in nested places.
Each is one clear line naming the key, before any model is loaded and before a database is
created. (Anchor bombs, code tags, deep nesting: test_security.py and test_config.py.)
"""

from __future__ import annotations

import pytest

from conftest import make_photo, run_cli

CASES = {
    "huge-batch-size": ("batch_size: 99999999999999999999999999999999\n", ["batch_size", "between 1 and"]),
    "huge-workers": ("workers: 1000000000000\n", ["workers", "between 0 and 256"]),
    "huge-pixel-limit-float": ("max_image_pixels: 1e400\n", ["max_image_pixels", "integer"]),
    "infinite-batch-size": ("batch_size: .inf\n", ["batch_size", "integer"]),
    "nan-workers": ("workers: .nan\n", ["workers", "integer"]),
    "negative-huge-pixels": ("max_image_pixels: -99999999999999999999\n", ["max_image_pixels", "positive"]),
    "input-dirs-nested": ("input_dirs: [[a, b], {c: d}]\n", ["input_dirs", "list of directory paths"]),
    "model-name-mapping": ("model_name: {a: 1}\n", ["model_name"]),
    "reindex-number": ("reindex: 1\n", ["reindex", "true or false"]),
    "huge-key": ("x" * 5000 + ": 1\n", ["not valid YAML", "line 1"]),  # YAML caps a plain key at 1024 chars
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_config_values(runner, tmp_path, case):
    text, needles = CASES[case]
    make_photo(tmp_path / "photos" / "a.jpg", seed=1)
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    result = run_cli(runner, ["-c", config, "-i", tmp_path / "photos", "-o", tmp_path / "out.jsonl",
                              "--model-name" if case != "model-name-mapping" else "--log-level",
                              tmp_path / "no-model" if case != "model-name-mapping" else "INFO"], ok=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert len(lines[0]) < 600, "the error line repeats the hostile value in full"
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out.sqlite").exists()
