"""Issue 8: an index file, a config file or a model folder never runs code or writes
outside its place. Every test here is hostile: real files crafted to attack, real
processes, the real tiny model (never mocked). Each attack that is meant to run code
also shows, as a control, that the payload is real (a bare pickle.load, torch.load or
trust_remote_code=True does run it).

See also: tests/test_source_index.py (a pkl whose __reduce__ calls os.system, foreign
records), tests/test_config.py (python/ tags, billion laughs as each key's value) and
tests/test_export.py (a planted <output>.tmp symlink, a pkl export with no globals).
"""

from __future__ import annotations

import ast
import copyreg
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_photo, original_record, read_jsonl, read_pkl, run_cli

DIM = 32  # the tiny model's vector size
PACKAGE = REPO / "sqlindexer"


# -- helpers ---------------------------------------------------------------------------
def one_error(result, *needles: str, code: int = 1) -> str:
    """A failed run: exit `code`, no traceback, one 'Error:' line (the last one), naming needles."""
    out = result.stdout + result.stderr
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def record(path: Path, vector: list[float], **meta) -> dict:
    """A record in the original tool's layout for a real file (it matches the file)."""
    rec = original_record(path, vector, width=64, height=48)
    rec["metadata"].update(meta)
    return rec


def vec(i: int) -> list[float]:
    return [(100 * (i + 1) + k) / 256 for k in range(DIM)]


def wait_for(path: Path, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def rows(db: Path, sql: str = "SELECT * FROM files ORDER BY path") -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def last_run(db: Path) -> dict:
    return rows(db, "SELECT * FROM runs ORDER BY id DESC LIMIT 1")[0]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for i in range(2):
        make_photo(tmp_path / "photos" / f"p{i}.jpg", seed=i)
    return tmp_path / "photos"


# == 1. Pickle: --source-index never runs code ==========================================
class Call:
    """Pickles as a call of func(*args): what a crafted pickle asks the unpickler to do."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


_EXT_CODE = 0xF0  # a copyreg extension code, registered for the "ext1-registered" case


def _payload(kind: str, marker: Path) -> tuple[bytes, set[str]]:
    """(pickle bytes of one record carrying the payload, the opcodes it must use)."""
    touch = f"touch {marker}"
    if kind.startswith("os.system-p"):
        proto = int(kind[-1])
        evil = Call(os.system, touch)
        ops = {"GLOBAL" if proto < 4 else "STACK_GLOBAL", "REDUCE"}
    elif kind == "builtins.eval":
        proto, evil, ops = 4, Call(eval, f"__import__('os').system({touch!r})"), {"STACK_GLOBAL", "REDUCE"}
    elif kind == "subprocess.Popen":
        proto, evil, ops = 5, Call(subprocess.Popen, ["touch", str(marker)]), {"STACK_GLOBAL", "REDUCE"}
    elif kind == "ext1-registered":
        proto, evil, ops = 2, Call(os.system, touch), {"EXT1", "REDUCE"}
    elif kind == "inst-opcode":
        # Protocol 0's INST: import module.name and call it with the marked arguments.
        data = b"(dp0\nVvector\np1\n(lp2\nF0.5\naVmetadata\np3\n(S'" + touch.encode() + b"'\nios\nsystem\ns."
        return data, {"INST"}
    elif kind == "persistent-id":
        return b"\x80\x02}q\x00X\x08\x00\x00\x00metadataq\x01Pos.system\nq\x02s.", {"PERSID"}
    else:
        raise AssertionError(kind)
    data = pickle.dumps({"vector": [0.5] * DIM, "metadata": {"path": evil}}, protocol=proto)
    return data, ops


# kind -> what the error line names
REFUSED_AS = {
    "os.system-p0": "it refers to posix.system", "os.system-p2": "it refers to posix.system",
    "os.system-p4": "it refers to posix.system", "os.system-p5": "it refers to posix.system",
    "builtins.eval": "it refers to builtins.eval", "subprocess.Popen": "it refers to subprocess.Popen",
    "ext1-registered": "it refers to posix.system", "inst-opcode": "it refers to os.system",
    "persistent-id": "persistent",
}
PICKLE_ATTACKS = list(REFUSED_AS)


@pytest.mark.parametrize("kind", PICKLE_ATTACKS)
def test_hostile_pickle_never_runs(runner, tmp_path, photos, kind):
    marker = tmp_path / f"marker-{kind}"
    if kind == "ext1-registered":
        copyreg.add_extension("posix", "system", _EXT_CODE)
    try:
        payload, ops = _payload(kind, marker)
        used = {op.name for op, _, _ in pickletools.genops(io.BytesIO(payload))}
        assert ops <= used, used  # the file really uses the opcodes it is named after
        source = tmp_path / "evil.pkl"
        source.write_bytes(pickle.dumps(record(photos / "p0.jpg", vec(0))) + payload)
        out = tmp_path / "index.jsonl"
        # No model: the source index is read before any model is loaded, and is refused.
        result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tmp_path / "no-model", "--reindex",
                                  "--source-index", source], ok=False)
        one_error(result, str(source), "record 2", REFUSED_AS[kind])
        assert not marker.exists()
        assert not out.exists()
        assert last_run(tmp_path / "index.sqlite")["status"] == "failed"
    finally:
        if kind == "ext1-registered":
            copyreg.remove_extension("posix", "system", _EXT_CODE)
    if kind == "persistent-id":
        return
    # Control: a bare pickle.load (in another process) does run it.
    register = f"copyreg.add_extension('posix', 'system', {_EXT_CODE})" if kind == "ext1-registered" else "pass"
    subprocess.run([sys.executable, "-c", f"import copyreg, pickle, sys\n{register}\n"
                    "with open(sys.argv[1], 'rb') as f:\n    pickle.load(f); pickle.load(f)\n", str(source)],
                   capture_output=True, timeout=30)
    assert wait_for(marker), "the payload did not run under a bare pickle.load: the test proves nothing"


def test_whole_list_dump_with_a_payload_is_refused(runner, tmp_path, photos):
    # Some writers pickle the list of all records in one dump: the payload may sit anywhere.
    marker = tmp_path / "marker"
    source = tmp_path / "evil.pkl"
    evil = record(photos / "p1.jpg", vec(1))
    evil["metadata"]["exif"] = {"Make": Call(os.system, f"touch {marker}")}
    source.write_bytes(pickle.dumps([record(photos / "p0.jpg", vec(0)), evil], protocol=4))
    result = run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", tmp_path / "no-model",
                              "--reindex", "--source-index", source], ok=False)
    one_error(result, str(source), "posix.system")
    assert not marker.exists()


def test_inert_containers_are_admitted_as_plain_values(runner, tmp_path, photos, tiny_model):
    """Decision: tuple, bytes, bytearray, set and frozenset are admitted. pickle builds them
    from opcodes, without find_class; they hold data and nothing callable. They become
    JSON values (lists, text); the original tool's plain dicts and lists load as before
    (tests/test_source_index.py)."""
    weird = tmp_path / "photos" / os.fsdecode(b"not-utf8-\xff.jpg")
    make_photo(weird, seed=5)
    exif = {"Make": b"Cam\x00", "Pair": (1, 2), "Set": frozenset({3}), "Raw": bytearray(b"ab"), 42: "int key",
            "Nested": {"t": (1.5, None)}, "Lone": "\ud800x"}
    source = tmp_path / "old.pkl"
    with open(source, "wb") as f:
        pickle.dump(record(photos / "p0.jpg", tuple(vec(0)), exif=exif, width=10**30), f, protocol=5)
        pickle.dump(record(photos / "p1.jpg", vec(1)), f, protocol=0)
        pickle.dump(record(weird, vec(2)), f)  # a name the scan skips: skipped here too
    out = tmp_path / "index.jsonl"
    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--reindex",
                              "--source-index", source, "--workers", "0"])
    assert (last_run(tmp_path / "index.sqlite")["imported"]) == 2, result.stderr
    records = {Path(r["metadata"]["path"]).name: r for r in read_jsonl(out)}
    assert sorted(records) == ["p0.jpg", "p1.jpg"]
    p0 = records["p0.jpg"]
    assert np.array_equal(np.asarray(p0["vector"], dtype="<f4"), np.asarray(vec(0), dtype="<f4"))
    assert p0["metadata"]["exif"] == {"Make": "Cam", "Pair": [1, 2], "Set": [3], "Raw": "ab", "42": "int key",
                                      "Nested": {"t": [1.5, None]}, "Lone": "?x"}
    assert p0["metadata"]["width"] is None  # 10**30 is no width


def _shared_bomb(levels: int = 9) -> list:
    # Nine references to a list of nine references to ...: 9**9 values, a few hundred bytes.
    node: list = ["lol"] * 9
    for _ in range(levels - 1):
        node = [node] * 9
    return node


def _hostile_plain(case: str, path: Path, photo: Path) -> None:
    if case == "pkl-shared-list-bomb":
        data = pickle.dumps(record(photo, vec(0), exif={"MakerNote": _shared_bomb()}))
        assert len(data) < 2000
        path.write_bytes(data)
    elif case == "pkl-self-referential":
        exif: dict = {}
        exif["self"] = exif
        path.write_bytes(pickle.dumps(record(photo, vec(0), exif=exif)))
    elif case == "pkl-huge-int-in-vector":
        path.write_bytes(pickle.dumps(record(photo, [10**400] * DIM)))
    elif case == "jsonl-deep-nesting":
        path.write_text('{"vector": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    elif case == "jsonl-huge-int":
        line = json.dumps(record(photo, vec(0), exif={"N": 1})).replace('"N": 1', '"N": ' + "9" * 5000)
        path.write_text(line + "\n", encoding="utf-8")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case,needle", [
    ("pkl-shared-list-bomb", "more than 100000 values"),
    ("pkl-self-referential", "nested more than"),
    ("pkl-huge-int-in-vector", "out of range"),
    ("jsonl-deep-nesting", "nested too deeply"),
    ("jsonl-huge-int", "not valid JSON"),
])
def test_hostile_plain_data_is_refused_quickly(runner, tmp_path, photos, case, needle):
    # Plain values can still attack: shared references expand exponentially when walked,
    # a structure can contain itself, JSON can nest past Python's stack.
    source = tmp_path / "hostile.idx"
    _hostile_plain(case, source, photos / "p0.jpg")
    started = time.monotonic()
    result = run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", tmp_path / "no-model",
                              "--reindex", "--source-index", source], ok=False)
    assert time.monotonic() - started < 10
    one_error(result, str(source), needle)


# == 2. YAML: safe loader, bounded ======================================================
@pytest.mark.parametrize("text", [
    'batch_size: !!python/object/apply:os.system ["touch {marker}"]\n',
    "model_name: !!python/name:os.system\n",
    'input_dirs:\n  - !!python/object/new:subprocess.Popen [["touch", "{marker}"]]\n',
    "device: !!python/module:os\n",
    'laughs: !!python/object/apply:subprocess.check_call [["touch", "{marker}"]]\n',
])
def test_yaml_code_tags_are_refused(runner, tmp_path, photos, text):
    marker = tmp_path / "pwned-by-yaml"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    result = run_cli(runner, ["-c", cfg, "-i", photos, "-o", tmp_path / "out.jsonl",
                              "--model-name", tmp_path / "no-model"], ok=False)
    line = one_error(result, str(cfg), "(line ", "is not allowed", "!!python/")
    assert len(line) < 300
    assert not marker.exists()
    assert not (tmp_path / "out.sqlite").exists()


def _laughs(key: str) -> str:
    text = '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for level in range(1, 10):
        text += f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]\n"
    return f"{key}:\n{text}"


def _merge_bomb() -> str:
    # PyYAML's constructor copies what a merge key (<<) brings in: unlike a plain alias,
    # this one is expanded by yaml.safe_load itself (it ran for minutes before the bound).
    text = "m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}\n"
    for level in range(1, 10):
        text += f"m{level}: &m{level}\n  <<: [" + ", ".join([f"*m{level - 1}"] * 9) + "]\n"
    return text + "batch_size: *m9\n"


YAML_BOMBS = {
    "laughs-input-dirs": (_laughs("input_dirs"), ["'input_dirs'", "expands to more than 100000 values"]),
    "merge-key-bomb": (_merge_bomb(), ["expands to more than 100000 values"]),
    "deep-nesting": ("input_dirs: " + "[" * 200_000 + "]" * 200_000 + "\n", ["'input_dirs'", "nested more than"]),
    "recursive-alias": ("input_dirs: &a [*a]\n", ["'input_dirs'", "refers to itself"]),
}


@pytest.mark.parametrize("case", list(YAML_BOMBS))
def test_yaml_bombs_are_refused_while_parsing(tmp_path, photos, case):
    text, needles = YAML_BOMBS[case]
    # In a subprocess with a memory cap and a timeout: a regression fails the test instead
    # of exhausting the machine.
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text, encoding="utf-8")
    assert cfg.stat().st_size < 1 << 20  # within the config size limit: the bound is what stops it

    def limit_memory() -> None:  # pragma: no cover - runs in the child
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sqlindexer", "-c", str(cfg), "-i", str(photos), "-o", str(tmp_path / "o.jsonl"),
             "--model-name", str(tmp_path / "no-model")],
            capture_output=True, text=True, timeout=30, cwd=tmp_path, preexec_fn=limit_memory,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: not refused within 30 s")
    assert time.monotonic() - started < 15
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"Error: config file {cfg} is refused (line ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_yaml_anchors_within_bounds_still_work(runner, tmp_path, photos, tiny_model):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"input_dirs: &dirs\n  - {photos}\nsource_index: null\noutput_file: out.jsonl\n"
                   f"model_name: {tiny_model}\nworkers: 0\n", encoding="utf-8")
    run_cli(runner, ["-c", cfg])
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2


# == 3. Model folders: no remote code, safetensors first, weights_only pickles ==========
def _checkpoint_copy(tiny_model: Path, folder: Path, *, safetensors: bool) -> Path:
    shutil.copytree(tiny_model, folder)
    if not safetensors:
        (folder / "model.safetensors").unlink()
    return folder


def _state_dict(tiny_model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(tiny_model / "model.safetensors"))


@pytest.fixture(scope="module")
def pickle_checkpoints(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as pytorch_model.bin only; the same with a payload in the pickle;
    safetensors plus that hostile .bin. (transformers 5's save_pretrained always writes
    safetensors, safe_serialization=False included, so the .bin is written with
    torch.save, as older transformers did.)"""
    import torch

    root = tmp_path_factory.mktemp("pickle-checkpoints")
    weights = _state_dict(tiny_model)
    plain = _checkpoint_copy(tiny_model, root / "bin-only", safetensors=False)
    torch.save(weights, plain / "pytorch_model.bin")
    evil = _checkpoint_copy(tiny_model, root / "evil-bin", safetensors=False)
    torch.save({**weights, "pwn": Call(os.system, f"touch {root / 'MARKER'}")}, evil / "pytorch_model.bin")
    both = _checkpoint_copy(tiny_model, root / "safetensors-and-evil-bin", safetensors=True)
    shutil.copy(evil / "pytorch_model.bin", both / "pytorch_model.bin")
    return {"bin-only": plain, "evil-bin": evil, "both": both, "marker": root / "MARKER"}


def test_weights_options(tiny_model, pickle_checkpoints):
    from sqlindexer.embed import _weights_options

    assert _weights_options(str(tiny_model)) == {"trust_remote_code": False, "use_safetensors": True,
                                                 "weights_only": True}
    assert _weights_options(str(pickle_checkpoints["bin-only"]))["use_safetensors"] is False
    assert _weights_options(str(pickle_checkpoints["both"]))["use_safetensors"] is True


def test_hub_snapshot_with_safetensors_is_read_as_safetensors(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sqlindexer.embed import _weights_options

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"{}")
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _weights_options("org/tiny")["use_safetensors"] is True
    # Not in the cache: unknown before the download; transformers tries safetensors first.
    assert _weights_options("org/other")["use_safetensors"] is None


def test_pickle_only_checkpoint_loads_with_weights_only(tiny_model, pickle_checkpoints):
    from PIL import Image

    from sqlindexer.embed import Embedder

    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 90), (10, 120, 250))]
    want = Embedder(str(tiny_model), device="cpu").load().embed_images(images)
    got = Embedder(str(pickle_checkpoints["bin-only"]), device="cpu").load().embed_images(images)
    assert np.array_equal(got, want)  # the same weights, read from the pickle


def test_hostile_pickle_checkpoint_is_refused(runner, tmp_path, photos, pickle_checkpoints):
    import torch

    evil, marker = pickle_checkpoints["evil-bin"], pickle_checkpoints["marker"]
    assert b"system" in (evil / "pytorch_model.bin").read_bytes() or "posix" in str(
        (evil / "pytorch_model.bin").read_bytes())
    result = run_cli(runner, ["-i", photos, "-o", tmp_path / "index.jsonl", "--model-name", evil,
                              "--workers", "0"], ok=False)
    one_error(result, f"cannot load model '{evil}'", "weights_only", "posix.system")
    assert not marker.exists()
    assert not (tmp_path / "index.jsonl").exists()
    # Control: a plain torch.load without weights_only runs the payload.
    torch.load(evil / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_safetensors_are_preferred_to_a_hostile_bin(runner, tmp_path, photos, pickle_checkpoints):
    out = tmp_path / "index.jsonl"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", pickle_checkpoints["both"], "--workers", "0"])
    assert len(read_jsonl(out)) == 2
    assert not pickle_checkpoints["marker"].exists()


def test_remote_code_never_runs(runner, tmp_path, photos, tiny_model):
    # A model folder whose config asks for its own Python. transformers left to decide
    # (trust_remote_code=None) asks on stdin, and a "y" there runs the code.
    marker = tmp_path / "remote-code-ran"
    folder = _checkpoint_copy(tiny_model, tmp_path / "custom-code-model", safetensors=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_net", auto_map={"AutoConfig": "evil_code.EvilConfig",
                                                   "AutoModel": "evil_code.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_net'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n")
    from sqlindexer.cli import cli

    result = runner.invoke(cli, ["-i", str(photos), "-o", str(tmp_path / "index.jsonl"), "--model-name", str(folder),
                                 "--workers", "0"], input="y\ny\n")
    one_error(result, f"cannot load model '{folder}'", "custom code")
    assert not marker.exists()


def test_every_from_pretrained_refuses_remote_code():
    """Static: each from_pretrained call in the package passes trust_remote_code=False,
    literally or through **_weights_options(...)."""
    calls = 0
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            safe_names = {
                t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                and getattr(n.value.func, "id", None) == "_weights_options" for t in n.targets if isinstance(t, ast.Name)
            }
            for call in [n for n in ast.walk(func) if isinstance(n, ast.Call)]:
                if getattr(call.func, "attr", None) != "from_pretrained":
                    continue
                calls += 1
                ok = any(
                    (k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False)
                    or (k.arg is None and isinstance(k.value, ast.Name) and k.value.id in safe_names)
                    or (k.arg is None and isinstance(k.value, ast.Call)
                        and getattr(k.value.func, "id", None) == "_weights_options")
                    for k in call.keywords
                )
                assert ok, f"{path.name}:{call.lineno}: from_pretrained without trust_remote_code=False"
    assert calls >= 4


# == 4. Output files: never written through a link, modes from the umask ===============
def test_links_at_output_and_tmp_are_not_followed(runner, tmp_path, photos, tiny_model):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim, tmp_victim = elsewhere / "victim.jsonl", elsewhere / "victim.tmp"
    victim.write_bytes(b"precious")
    tmp_victim.write_bytes(b"also precious")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "index.jsonl"
    out.symlink_to(victim)
    (outdir / "index.jsonl.tmp").symlink_to(tmp_victim)
    map_victim = elsewhere / "victim.lines"
    map_victim.write_bytes(b"precious too")
    (outdir / "index.sqlite.export-lines.tmp").symlink_to(map_victim)
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"])
    # The link at the output path was replaced by the index (os.replace renames over the
    # link itself); no target was written, the line map's temporary file included.
    assert victim.read_bytes() == b"precious" and tmp_victim.read_bytes() == b"also precious"
    assert map_victim.read_bytes() == b"precious too"
    assert not out.is_symlink() and stat.S_ISREG(out.lstat().st_mode)
    assert len(read_jsonl(out)) == 2
    assert sorted(p.name for p in outdir.iterdir()) == ["index.jsonl", "index.sqlite", "index.sqlite.export-lines",
                                                      "index.sqlite.lock"]
    assert not (outdir / "index.sqlite.export-lines").is_symlink()


def test_pkl_export_replaces_a_link_at_the_output(tmp_path):
    from sqlindexer.index_file import write_index
    from sqlindexer.records import ExportRow

    victim = tmp_path / "victim.pkl"
    victim.write_bytes(b"precious")
    out = tmp_path / "dir" / "index.pkl"
    out.parent.mkdir()
    out.symlink_to(victim)
    row = ExportRow("/p/a.jpg", 1, 10**18, 10**18, 4, 3, None, np.ones(4, "<f4").tobytes(), 4)
    assert write_index([row], out, "pkl") == 1
    assert victim.read_bytes() == b"precious" and not out.is_symlink()
    assert read_pkl(out)[0]["metadata"]["path"] == "/p/a.jpg"


def test_link_at_the_lock_file_is_not_followed(runner, tmp_path, photos, tiny_model):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "index.jsonl"
    (tmp_path / "index.sqlite.lock").symlink_to(victim)
    result = run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model], ok=False)
    one_error(result, "index.sqlite.lock", "symlink")
    assert victim.read_bytes() == b"precious"  # not truncated to a pid
    assert not out.exists() and not (tmp_path / "index.sqlite").exists()


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_created_files_respect_the_umask(runner, tmp_path, photos, tiny_model, umask):
    out = tmp_path / "index.jsonl"
    previous = os.umask(umask)
    try:
        run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"])
    finally:
        os.umask(previous)
    created = [p for p in tmp_path.iterdir() if p.name.startswith("index.")]
    assert {p.name for p in created} >= {"index.jsonl", "index.sqlite", "index.sqlite.lock"}
    for path in created:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & umask == 0, f"{path.name}: {mode:o} under umask {umask:03o}"
        assert mode & 0o002 == 0, f"{path.name} is world-writable"
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # the index: exactly what the umask allows


def test_a_replaced_index_keeps_its_mode(runner, tmp_path, photos, tiny_model):
    out = tmp_path / "index.pkl"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"])
    out.chmod(0o600)
    make_photo(photos / "p2.jpg", seed=2)
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0", "--reindex"])
    assert len(read_pkl(out)) == 3
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # a private index stays private


# == 5. SQL: values are parameters ======================================================
_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|PRAGMA|WHERE|VALUES)\b")
# What may be formatted into SQL text, and why each is safe.
_SQL_FORMATTED = {
    "placeholders": "a run of '?' joined by commas",
    "','.join('?' * len(chunk))": "a run of '?' joined by commas",
    "','.join(['(?, ?)'] * len(chunk))": "a run of '(?, ?)' rows joined by commas (content.py)",
    "', '.join('?' * len(chunk))": "a run of '?' joined by commas",
    "sets": "column names from runs.COUNTERS (add_counts filters every key through it)",
    "', '.join(COUNTERS)": "the constant tuple of counter columns",
    "columns": "the counter columns of runs.COUNTERS (or 0 AS the name) present in the table",
    "script": "a migration file shipped with the package",
    "number": "the migration's number, an int",
    "_TAKEN": "a constant SQL expression (state.py)",
    "_REQUEUE": "a constant SQL expression (state.py)",
    "_EXPORT_COLUMNS": "a constant list of column names (state.py)",
}


def test_sql_text_is_never_formatted_with_values():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if not _SQL.search(text):
                    continue
                for value in node.values:
                    if isinstance(value, ast.FormattedValue):
                        expr = ast.unparse(value.value)
                        found.append(expr)
                        assert expr in _SQL_FORMATTED, (
                            f"{path.name}:{node.lineno}: SQL text formatted with {expr!r}; pass values as ? "
                            "parameters (or add a vetted constant to _SQL_FORMATTED)")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant) \
                    and isinstance(node.left.value, str) and _SQL.search(node.left.value):
                pytest.fail(f"{path.name}:{node.lineno}: SQL text built with %")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "format" \
                    and isinstance(node.func.value, ast.Constant) and _SQL.search(str(node.func.value.value)):
                pytest.fail(f"{path.name}:{node.lineno}: SQL text built with str.format")
    assert any("'?'" in expr for expr in found), found  # the check does see the package's SQL


def test_add_counts_takes_column_names_from_its_whitelist_only(tmp_path):
    from sqlindexer import db, runs

    conn = db.connect(tmp_path / "x.sqlite")
    try:
        run = runs.start_run(conn, mode="full", model="m", config={}, pid=1)
        before = rows(tmp_path / "x.sqlite", "SELECT * FROM runs")
        hostile = {"scanned = 99, status = 'pwned' --": 1, "new; DROP TABLE files; --": 1}
        for key, value in hostile.items():
            with pytest.raises((ValueError, KeyError, TypeError, sqlite3.Error)):
                with db.transaction(conn):
                    runs.add_counts(conn, run.id, **{key: value})
        assert rows(tmp_path / "x.sqlite", "SELECT * FROM runs") == before
        assert rows(tmp_path / "x.sqlite", "SELECT count(*) AS n FROM files") == [{"n": 0}]
    finally:
        conn.close()


HOSTILE_NAMES = [
    "it's \"quoted\".jpg",
    "semi;colon.jpg",
    "100% %s %d {0}.jpg",
    "'); DROP TABLE files; --.jpg",
    "\" OR 1=1 --.jpg",
    "été 写真 📷.jpg",
    "back\\slash ?1 :name $1.jpg",
    "tab\tand\nnewline.jpg",
    "dir '; DROP TABLE runs; --/x.jpg",
]


def test_hostile_file_names_round_trip(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    paths = [make_photo(photos / name, seed=i) for i, name in enumerate(HOSTILE_NAMES)]
    out, db_path = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    args = ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"]
    run_cli(runner, args)
    assert sorted(r["metadata"]["path"] for r in read_jsonl(out)) == sorted(map(str, paths))
    assert sorted(r["metadata"]["filename"] for r in read_jsonl(out)) == sorted(p.name for p in paths)
    assert sorted(r["path"] for r in rows(db_path)) == sorted(map(str, paths))
    assert len(rows(db_path, "SELECT * FROM runs")) == 1

    # Re-index: nothing changed; then one modified, one deleted.
    run_cli(runner, [*args, "--reindex"])
    assert last_run(db_path)["unchanged"] == len(paths)
    make_photo(paths[3], size=(80, 60), seed=9)
    paths.pop(4).unlink()
    run_cli(runner, [*args, "--reindex"])
    run = last_run(db_path)
    assert (run["modified"], run["deleted"], run["embedded"]) == (1, 1, 1)
    exported = read_jsonl(out)
    assert sorted(r["metadata"]["path"] for r in exported) == sorted(map(str, paths))

    # Through a pkl index and --source-index into a new database: every vector is kept.
    pkl = tmp_path / "index.pkl"
    run_cli(runner, ["-i", photos, "-o", pkl, "--model-name", tiny_model, "--state-db", tmp_path / "p.sqlite",
                     "--reindex", "--source-index", out, "--workers", "0"])
    run = last_run(tmp_path / "p.sqlite")
    assert (run["imported"], run["embedded"]) == (len(paths), 0)
    assert {r["metadata"]["path"]: r["vector"] for r in read_pkl(pkl)}.keys() == set(map(str, paths))


# == 6. Resource limits: max_image_pixels ===============================================
def test_default_pixel_limit_is_pillows():
    from sqlindexer.config import DEFAULT_MAX_IMAGE_PIXELS, Config

    assert DEFAULT_MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3) == Config().max_image_pixels


@pytest.mark.parametrize("text,needle", [
    ('max_image_pixels: "lots"\n', "must be an integer"),
    ("max_image_pixels: 1.5e8\n", "must be an integer"),
    ("max_image_pixels: true\n", "must be an integer"),
    ("max_image_pixels: 0\n", "positive number of pixels"),
    ("max_image_pixels: -5\n", "positive number of pixels"),
    ("max_image_pixels: null\n", "must be an integer"),
])
def test_bad_pixel_limit_in_yaml(runner, tmp_path, photos, text, needle):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text, encoding="utf-8")
    result = run_cli(runner, ["-c", cfg, "-i", photos, "-o", tmp_path / "o.jsonl", "--model-name",
                              tmp_path / "no-model"], ok=False)
    one_error(result, "max_image_pixels", needle)


def test_bad_pixel_limit_on_the_command_line(runner, tmp_path, photos):
    result = run_cli(runner, ["-i", photos, "-o", tmp_path / "o.jsonl", "--model-name", tmp_path / "no-model",
                              "--max-image-pixels", "0"], ok=False)
    assert result.exit_code == 2 and "--max-image-pixels" in result.stderr


def test_pixel_limit_reaches_the_decoders(runner, tmp_path, tiny_model):
    from PIL import Image

    photos = tmp_path / "photos"
    make_photo(photos / "big.png", size=(64, 48))  # 3072 pixels
    make_photo(photos / "small.png", size=(32, 32))  # 1024 pixels
    out, db_path = tmp_path / "index.jsonl", tmp_path / "index.sqlite"

    def errors() -> dict[str, str | None]:
        return {Path(r["path"]).name: r["error"] for r in rows(db_path)}

    # In a worker process, from the command line: 3072 is over 2000 (Pillow only warns
    # between 1x and 2x the limit; that is a failure too).
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "1",
                     "--max-image-pixels", "2000"])
    failed = errors()
    assert failed["small.png"] is None
    assert failed["big.png"] == "refused as a decompression bomb: 3072 pixels, more than max_image_pixels (2000)"
    assert json.loads(last_run(db_path)["config"])["max_image_pixels"] == 2000
    # In-process, from the YAML file: over twice the limit (Pillow raises).
    cfg = tmp_path / "config.yaml"
    cfg.write_text("max_image_pixels: 1500\nworkers: 0\n", encoding="utf-8")
    make_photo(photos / "big.png", size=(48, 64))  # modified: decoded again
    run_cli(runner, ["-c", cfg, "-i", photos, "-o", out, "--model-name", tiny_model, "--reindex"])
    assert errors()["big.png"] == "refused as a decompression bomb: 3072 pixels, more than max_image_pixels (1500)"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the run's limit did not leak into this process
    # The default admits both.
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"])
    assert set(errors().values()) == {None} and len(read_jsonl(out)) == 2


# Peak RSS of the process itself. Not getrusage's ru_maxrss: Linux carries the high-water
# mark of the image a process replaced across execve, and this child was forked (or
# vforked) from pytest, several hundred MB with torch loaded. VmHWM is the peak of the
# child's own memory map.
_MEASURE = """
import resource, sys
from sqlindexer import decode
path, draft, limit = sys.argv[1], sys.argv[2] == "draft", int(sys.argv[3])
p = decode.prepare(path, decode.DecodeOptions(draft=draft, max_image_pixels=limit))
try:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1 << 20 if sys.platform == "darwin" else 1024)
print(peak, p.error, p.width, p.height, None if p.pixels is None else p.pixels.shape)
"""


def _peak(path: Path, mode: str, limit: int) -> tuple[int, str]:
    """Peak RSS (MB) of a fresh process that prepares path, and what prepare returned."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode, str(limit)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
    peak, rest = proc.stdout.strip().split(" ", 1)
    return int(peak), rest


def test_a_100_megapixel_jpeg_decodes_in_bounded_memory(tmp_path):
    big = tmp_path / "100mp.jpg"
    subprocess.run([sys.executable, "-c", "import sys\nfrom PIL import Image, ImageDraw\n"
                    "im = Image.new('RGB', (12000, 8400), (90, 140, 200))\n"
                    "ImageDraw.Draw(im).rectangle([3000, 2000, 6000, 4000], fill=(250, 30, 30))\n"
                    "im.save(sys.argv[1], quality=60)\n", str(big)], check=True, timeout=120)
    full_rgb_mb = 12000 * 8400 * 3 / 2**20  # 288 MB
    # Draft mode: decoded at 1/8 scale (1500 x 1050), full size reported.
    peak, result = _peak(big, "draft", 200_000_000)
    assert result == "None 12000 8400 (208, 304, 3)"
    assert peak < 150 < full_rgb_mb, f"peak RSS {peak} MB with draft mode"
    # Control: the same file decoded at full size does allocate its pixels.
    peak_full, result = _peak(big, "full", 200_000_000)
    assert result == "None 12000 8400 (208, 304, 3)"
    assert peak_full > full_rgb_mb, f"peak RSS {peak_full} MB without draft mode: the measure proves nothing"
    # And at the default limit it is a bomb: the limit counts the file's own pixels.
    _, result = _peak(big, "draft", 89_478_485)
    assert result.startswith("refused as a decompression bomb: 100800000 pixels")


@pytest.mark.parametrize("limit", [50_000_000, 60_000_000])  # over 2x the limit (error), and 1x-2x (warning)
def test_a_large_png_beyond_the_limit_is_refused_unread(tmp_path, limit):
    from PIL import Image

    from sqlindexer import decode

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 9000), 1).save(bomb)  # 108 megapixels in a few kB
    assert bomb.stat().st_size < 100_000
    started = time.monotonic()
    p = decode.prepare(str(bomb), decode.DecodeOptions(max_image_pixels=limit))
    assert time.monotonic() - started < 2
    assert p.pixels is None
    assert p.error == f"refused as a decompression bomb: 108000000 pixels, more than max_image_pixels ({limit})"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
