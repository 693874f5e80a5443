"""Configuration: YAML file + command line -> one effective Config, and every way to get it wrong.

Every error case runs with a --model-name that does not exist and an input folder that
holds an image: had the configuration been accepted, the run would have gone on to load
the model and failed with "cannot load model". So each case also proves that the error
was found before any model was loaded (test_control_nonexistent_model_fails_at_load
shows that the discriminator works).
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_photo, read_jsonl, read_pkl, run_cli

from sqlindexer.config import Config


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    make_photo(tmp_path / "photos" / "a.jpg", seed=1)
    return tmp_path / "photos"


def _no_model(tmp_path: Path) -> Path:
    return tmp_path / "no-such-model"


def _config_file(tmp_path: Path, **keys) -> Path:
    """tmp_path/config.yaml with one `key: value` line per keyword, in order."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("".join(f"{key}: {value}\n" for key, value in keys.items()), encoding="utf-8")
    return cfg


def _last_run(db: Path) -> sqlite3.Row:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()


def _effective_config(db: Path) -> dict:
    return json.loads(_last_run(db)["config"])


def _assert_config_error(result, *needles: str, usage: bool = False) -> str:
    """A non-zero exit with one 'Error:' line naming the problem, before any model load."""
    out = result.stdout + result.stderr
    assert result.exit_code != 0, out
    assert "cannot load model" not in out, f"the model was loaded before the configuration was checked:\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    if usage:
        assert result.exit_code == 2, out  # click's usage error: Usage/Try lines, then the error
    else:
        assert result.exit_code == 1, out
        assert result.stderr.strip() == errors[0], f"more than one line on stderr:\n{result.stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def test_control_nonexistent_model_fails_at_load(runner, tmp_path, photos):
    # The discriminator of every error test below: a valid configuration reaches the model.
    result = run_cli(runner, ["-i", photos, "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path)],
                     ok=False)
    assert result.exit_code == 1
    assert "cannot load model" in result.stderr


# (YAML text, substrings the error line must contain). The CLI always passes a valid
# -i and -o, so only the YAML is wrong.
YAML_ERRORS = {
    "unknown-key": ("colour: red\n", ["unknown key 'colour'"]),
    "batch-size-string": ('batch_size: "32"\n', ["batch_size", "integer", "'32'"]),
    "batch-size-zero": ("batch_size: 0\n", ["batch_size", "between 1 and"]),
    "reindex-string": ('reindex: "yes"\n', ["reindex", "true or false"]),
    "input-dirs-int": ("input_dirs: 5\n", ["input_dirs", "list of directory paths"]),
    "device-bad": ("device: gpu\n", ["device", "auto, cpu, cuda", "'gpu'"]),
    "output-format-bad": ("output_format: csv\n", ["output_format", "jsonl, pkl", "'csv'"]),
    "log-level-bad": ("log_level: loud\n", ["log_level", "DEBUG, INFO", "'loud'"]),
    "model-name-null": ("model_name: null\n", ["model_name", "non-empty string"]),
    "not-a-mapping": ("- a\n- b\n", ["must hold a mapping", "list"]),
    "scalar": ("just some text\n", ["must hold a mapping", "str"]),
    "invalid-yaml": ("batch_size: [1, 2\n", ["not valid YAML"]),
    "engine-bad": ("engine: spark\n", ["engine", "local, ray", "'spark'"]),
    "ray-workers-zero": ("ray_workers: 0\n", ["ray_workers", "between 1 and 4096"]),
    "ray-gpus-word": ("ray_gpus_per_worker: lots\n", ["ray_gpus_per_worker", "a number"]),
    "python-tag": ('batch_size: !!python/object/apply:os.system ["touch pwned-by-yaml"]\n', ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(YAML_ERRORS))
def test_yaml_error(runner, tmp_path, photos, case):
    text, needles = YAML_ERRORS[case]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text, encoding="utf-8")
    result = run_cli(
        runner, ["-c", cfg, "-i", photos, "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path)], ok=False
    )
    line = _assert_config_error(result, *needles)
    assert str(cfg) in line or "config file" in line
    assert not (tmp_path / "out.sqlite").exists(), "a working database was created for an invalid configuration"
    assert not (tmp_path / "pwned-by-yaml").exists()


# Bad values on the command line: click refuses them as usage errors (exit 2).
CLI_ERRORS = {
    "device": (["--device", "gpu"], ["--device", "gpu"]),
    "output-format": (["--output-format", "csv"], ["--output-format", "csv"]),
    "log-level": (["--log-level", "loud"], ["--log-level", "loud"]),
    "batch-size-word": (["--batch-size", "many"], ["--batch-size", "many"]),
    "engine": (["--engine", "spark"], ["--engine", "spark"]),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_value_error(runner, tmp_path, photos, case):
    args, needles = CLI_ERRORS[case]
    result = run_cli(
        runner, ["-i", photos, "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path), *args], ok=False
    )
    _assert_config_error(result, *needles, usage=True)
    assert not (tmp_path / "out.sqlite").exists()


def test_cli_batch_size_out_of_range(runner, tmp_path, photos):
    # A usage error like every bad value on the command line, in the words the YAML check uses.
    result = run_cli(
        runner, ["-i", photos, "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path), "--batch-size", "0"],
        ok=False,
    )
    _assert_config_error(result, "--batch-size", "between 1 and", usage=True)


def test_missing_config_file(runner, tmp_path, photos):
    result = run_cli(
        runner, ["-c", tmp_path / "nothere.yaml", "-i", photos, "-o", tmp_path / "out.jsonl",
                 "--model-name", _no_model(tmp_path)],
        ok=False,
    )
    _assert_config_error(result, "nothere.yaml", "does not exist")


def test_missing_input_directory(runner, tmp_path, photos):
    result = run_cli(
        runner, ["-i", photos, tmp_path / "gone", "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path)],
        ok=False,
    )
    _assert_config_error(result, "input directory", "gone", "does not exist")


def test_input_directory_in_yaml_missing(runner, tmp_path, photos):
    cfg = _config_file(tmp_path, input_dirs=f"[{photos}, {tmp_path / 'gone'}]", output_file="out.jsonl",
                       model_name=_no_model(tmp_path))
    result = run_cli(runner, ["-c", cfg], ok=False)
    _assert_config_error(result, "input directory", "gone", "does not exist")


def test_input_is_a_file(runner, tmp_path, photos):
    result = run_cli(
        runner, ["-i", photos / "a.jpg", "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path)], ok=False
    )
    _assert_config_error(result, "a.jpg", "not a directory")


def test_missing_output_folder(runner, tmp_path, photos):
    result = run_cli(
        runner, ["-i", photos, "-o", tmp_path / "nofolder" / "out.jsonl", "--model-name", _no_model(tmp_path)],
        ok=False,
    )
    _assert_config_error(result, "folder of output file", "nofolder", "does not exist")
    assert not (tmp_path / "nofolder").exists()


def test_no_input_and_no_output(runner, tmp_path, photos):
    result = run_cli(runner, ["-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path)], ok=False)
    _assert_config_error(result, "no input directories")
    result = run_cli(runner, ["-i", photos, "--model-name", _no_model(tmp_path)], ok=False)
    _assert_config_error(result, "no output file")


def test_missing_source_index(runner, tmp_path, photos):
    result = run_cli(
        runner, ["-i", photos, "-o", tmp_path / "out.jsonl", "--model-name", _no_model(tmp_path), "--reindex",
                 "--source-index", tmp_path / "old.jsonl"],
        ok=False,
    )
    _assert_config_error(result, "source index", "old.jsonl", "does not exist")


def _bomb(key: str) -> str:
    """A billion-laughs document: 9 levels of 9 aliases, 9**9 'lol's when expanded, as the value of key."""
    text = '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for level in range(1, 10):
        text += f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]\n"
    return f"{key}:\n{text}"


@pytest.mark.parametrize("key", ["batch_size", "input_dirs", "device", "laughs"])
def test_billion_laughs_is_refused_quickly(tmp_path, photos, key):
    # In a subprocess with a memory cap and a timeout: a regression must fail the test,
    # not exhaust the machine running it.
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_bomb(key), encoding="utf-8")

    def limit_memory() -> None:  # pragma: no cover - runs in the child
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sqlindexer", "-c", str(cfg), "-i", str(photos), "-o", str(tmp_path / "out.jsonl"),
             "--model-name", str(_no_model(tmp_path))],
            capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path, preexec_fn=limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a billion-laughs config file was not refused within 30 s")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert elapsed < 15, elapsed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr[-2000:]
    assert len(lines[0]) < 500
    assert key in lines[0]
    assert "cannot load model" not in proc.stderr


# -- precedence: command line > YAML > default ---------------------------------------
def test_cli_batch_size_beats_yaml_beats_default(runner, tmp_path, photos, tiny_model):
    out = tmp_path / "out.jsonl"
    base = ["-i", photos, "-o", out, "--model-name", tiny_model]
    run_cli(runner, base)
    assert _effective_config(tmp_path / "out.sqlite")["batch_size"] == 32

    cfg = tmp_path / "config.yaml"
    cfg.write_text("batch_size: 4\nlog_level: warning\n", encoding="utf-8")
    run_cli(runner, ["-c", cfg, *base])
    effective = _effective_config(tmp_path / "out.sqlite")
    assert effective["batch_size"] == 4
    assert effective["log_level"] == "WARNING"

    run_cli(runner, ["-c", cfg, *base, "--batch-size", "2"])
    assert _effective_config(tmp_path / "out.sqlite")["batch_size"] == 2


def test_no_reindex_flag_beats_yaml(runner, tmp_path, photos, tiny_model):
    cfg = _config_file(tmp_path, reindex="true", input_dirs=f"[{photos}]", output_file="out.jsonl",
                       model_name=tiny_model)
    db = tmp_path / "out.sqlite"
    run_cli(runner, ["-c", cfg])
    assert _last_run(db)["mode"] == "reindex"
    run_cli(runner, ["-c", cfg, "--no-reindex"])
    run = _last_run(db)
    assert run["mode"] == "full"
    assert run["embedded"] == 1  # a full build embeds every image again


def test_yaml_values_used_when_cli_does_not_give_them(runner, tmp_path, photos, tiny_model):
    # output_format pkl from the YAML, although the output is named .jsonl.
    # input_dirs as one path, not a list of them.
    cfg = _config_file(tmp_path, input_dirs=photos, output_file="out.jsonl", output_format="pkl",
                       model_name=tiny_model)
    out = tmp_path / "out.jsonl"
    run_cli(runner, ["-c", cfg])
    assert out.read_bytes()[:1] == b"\x80"
    records = read_pkl(out)
    assert [Path(r["metadata"]["path"]).name for r in records] == ["a.jpg"]
    # ... and the command line's --output-format beats it.
    run_cli(runner, ["-c", cfg, "--output-format", "JSONL"])
    assert [Path(r["metadata"]["path"]).name for r in read_jsonl(out)] == ["a.jpg"]
    # A -o on the command line beats output_file in the YAML.
    other = tmp_path / "other.pkl"
    run_cli(runner, ["-c", cfg, "-o", other])
    assert other.read_bytes()[:1] == b"\x80"


@pytest.mark.parametrize("name,fmt", [("idx.pkl", "pkl"), ("idx.PKL", "pkl"), ("idx.jsonl", "jsonl"),
                                      ("idx.json", "jsonl")])
def test_output_format_from_suffix(runner, tmp_path, photos, tiny_model, name, fmt):
    out = tmp_path / name
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model])
    data = out.read_bytes()
    if fmt == "pkl":
        assert data[:1] == b"\x80"
        assert len(read_pkl(out)) == 1
    else:
        assert data.startswith(b'{"vector":[')
        assert len(read_jsonl(out)) == 1
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(data)


@pytest.mark.parametrize("style", ["-i a b", "-i a -i b", "--input-dirs a b", "yaml list"])
def test_several_input_dirs(runner, tmp_path, tiny_model, style):
    a, b = tmp_path / "a", tmp_path / "b"
    make_photo(a / "one.jpg", seed=1)
    make_photo(b / "two.jpg", seed=2)
    out = tmp_path / "out.jsonl"
    tail = ["-o", out, "--model-name", tiny_model]
    if style == "-i a b":
        args = ["-i", a, b, *tail]
    elif style == "-i a -i b":
        args = ["-i", a, "-i", b, *tail]
    elif style == "--input-dirs a b":
        args = [*tail, "--input-dirs", a, b]
    else:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"input_dirs:\n  - {a}\n  - {b}\n", encoding="utf-8")
        args = ["-c", cfg, *tail]
    result = run_cli(runner, args)
    assert "scanned 2, new 2" in result.stderr
    assert sorted(Path(r["metadata"]["path"]).name for r in read_jsonl(out)) == ["one.jpg", "two.jpg"]
    assert sorted(_effective_config(tmp_path / "out.sqlite")["input_dirs"]) == sorted([str(a), str(b)])


def test_help_shows_real_defaults(runner):
    defaults = Config()
    for args in (["--help"], ["index", "--help"]):
        result = run_cli(runner, args)
        text = " ".join(result.stdout.split())
        assert f"[default: {defaults.batch_size}; 1<=x<=65536]" in text and defaults.batch_size == 32
        assert f"[default: {defaults.device}]" in text and defaults.device == "auto"
        assert f"[default: {defaults.log_level}]" in text and defaults.log_level == "INFO"
        assert f"[default: {defaults.model_name}]" in text
        assert "from the output suffix: .pkl -> pkl, else jsonl" in text
        for option in ("--config-file", "--input-dirs", "--output-file", "--reindex", "--source-index"):
            assert option in text


def test_config_example_has_every_key_commented_and_valid(tmp_path):
    import dataclasses

    import yaml

    from sqlindexer import config as cfg

    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    values = yaml.safe_load(example.read_text())
    assert set(values) == {f.name for f in dataclasses.fields(cfg.Config)} == {f.name for f in cfg.FIELDS}
    lines = example.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#", "-")):
            assert lines[i - 1].startswith("#"), f"key without a comment: {line}"
    (tmp_path / "in").mkdir()
    values.update(input_dirs=[str(tmp_path / "in")], output_file=str(tmp_path / "index.jsonl"))
    built = cfg.build(values, {})
    assert built.batch_size == 32 and built.workers is None and built.dtype == "auto"


# -- one declaration per setting: config.FIELDS makes Config, the YAML check and the options --
def _index_options() -> dict:
    from sqlindexer.cli import cli

    return {p.name: p for p in cli.commands["index"].params}


def test_config_fields_are_the_spec():
    import dataclasses

    from sqlindexer import config as cfg

    names = [f.name for f in cfg.FIELDS]
    assert len(names) == len(set(names))
    # Every Config field (computed values are properties, not fields) comes from the spec,
    # with its default.
    assert [(f.name, f.default) for f in dataclasses.fields(Config)] == [(f.name, f.default) for f in cfg.FIELDS]
    built = Config(batch_size=4, input_dirs=("a",))
    assert (built.batch_size, built.input_dirs, built.model_name) == (4, ("a",), cfg.DEFAULT_MODEL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.batch_size = 8
    # Worker processes and Ray receive a pickled Config.
    assert pickle.loads(pickle.dumps(built)) == built


def test_every_field_has_exactly_one_cli_option_like_it():
    import click

    from sqlindexer import config as cfg

    options = _index_options()
    assert set(options) == {f.name for f in cfg.FIELDS} | {"config_file", "wait"}  # -c and --wait: CLI only
    flags = [flag for p in options.values() for flag in (*p.opts, *p.secondary_opts)]
    assert len(flags) == len(set(flags))
    ctx = click.Context(click.Command("index"))
    for field in cfg.FIELDS:
        option = options[field.name]
        assert field.flag in option.opts
        assert (field.short in option.opts) if field.short else all(o.startswith("--") for o in option.opts)
        assert option.is_flag == (field.kind is bool) and option.multiple == (field.kind is list)
        assert option.secondary_opts == ([f"--no-{field.flag[2:]}"] if field.kind is bool else [])
        if field.default not in (None, ()):  # a None default is worked out during the run
            assert option.get_default(ctx, call=False) == field.default
        assert option.show_default == (field.default_text or field.default not in (None, ()))
        if field.choices:
            assert tuple(option.type.choices) == field.choices
        assert option.help == field.help and option.metavar == field.metavar


def _cli_accepts(option, text: str) -> str | None:
    import click

    try:
        option.type.convert(text, option, None)
    except click.BadParameter as e:
        return e.message
    return None


def _yaml_accepts(field, value) -> str | None:
    from sqlindexer import config as cfg

    try:
        cfg.check(field, value)
    except cfg.InvalidValue as e:
        return str(e)
    return None


def test_cli_and_yaml_share_the_bounds():
    from sqlindexer import config as cfg

    options = _index_options()
    bounded = [f for f in cfg.FIELDS if f.min is not None or f.max is not None]
    assert {f.name for f in bounded} >= {"batch_size", "workers", "max_image_pixels", "ray_workers"}
    for field in bounded:
        step = 1 if field.kind is int else 0.5
        inside = [b for b in (field.min, field.max) if b is not None]
        outside = ([field.min - step] if field.min is not None else []) + (
            [field.max + step] if field.max is not None else [])
        for value in inside:
            assert _cli_accepts(options[field.name], str(value)) is None, (field.name, value)
            assert _yaml_accepts(field, value) is None, (field.name, value)
        for value in outside:
            refused = _yaml_accepts(field, value)
            assert refused and field.range_text in refused, (field.name, value)
            assert _cli_accepts(options[field.name], str(value)) == refused, (field.name, value)


def test_a_list_option_like_exclude_is_one_spec_line(tmp_path):
    # What the next settings need (exclude: repeatable --exclude PATTERN, a YAML list):
    # a Field of kind list turned into an option by the same code as the real ones.
    import click
    from click.testing import CliRunner

    from sqlindexer import config as cfg
    from sqlindexer.cli_options import _option

    field = cfg.Field("exclude", list, (), "Skip paths matching PATTERN.", metavar="PATTERN",
                      noun="gitignore-style patterns")

    @click.command()
    @_option(field)
    def command(**values):
        click.echo(repr(cfg.check(field, values["exclude"])))

    result = CliRunner().invoke(command, ["--exclude", "*.tmp", "--exclude", "cache/"])
    assert result.exit_code == 0 and result.stdout.strip() == "('*.tmp', 'cache/')"
    assert "--exclude PATTERN" in CliRunner().invoke(command, ["--help"]).stdout
    assert CliRunner().invoke(command, ["--exclude", ""]).exit_code == 2
    assert cfg.check(field, ["*.tmp", "cache/"]) == ("*.tmp", "cache/")
    assert cfg.check(field, "*.tmp") == ("*.tmp",)
    assert _yaml_accepts(field, [1]) == "must be a list of gitignore-style patterns, got list [1]"
