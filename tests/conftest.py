"""Shared fixtures: a tiny random SigLIP 2 saved once per session, the shared corpus,
generated images, and a hermetic environment."""

from __future__ import annotations

import contextlib
import csv
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SQLINDEXER_CORPUS", REPO.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised SigLIP 2 (hidden 32, 2 layers) with its image processor and
    tokenizer, built by transformers and save_pretrained'd: the real loading and
    inference code runs on it."""
    from sqlindexer.testing import build_random_siglip2

    return build_random_siglip2(tmp_path_factory.mktemp("tiny-siglip2"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """A second tiny model with other random weights, for model-change tests."""
    from sqlindexer.testing import build_random_siglip2

    return build_random_siglip2(tmp_path_factory.mktemp("tiny-siglip2-b"), seed=1, with_tokenizer=False)


@pytest.fixture(scope="session", autouse=True)
def _openvino_cache(tmp_path_factory):
    """OpenVINO's converted and compiled models in one folder per session (not the user's
    cache): the tiny tower is converted once, then read back by every run."""
    os.environ["SQLINDEXER_OPENVINO_CACHE"] = str(tmp_path_factory.mktemp("openvino-cache"))


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        pytest.skip(f"shared test corpus not found at {CORPUS} (it lives beside the repository in CI)")
    return CORPUS


@pytest.fixture(scope="session")
def real_corpus_index(corpus, tiny_model, tmp_path_factory):
    """The corpus's real/ indexed once for the session with the tiny model (hidden files
    included): (its index.jsonl, the CLI's result). The tests that use it change neither
    the index nor the database's rows (pages write thumbnails beside it): indexing those
    292 files is the suite's longest setup."""
    out = tmp_path_factory.mktemp("corpus-real") / "index.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(out.parent / "hf-home"))
        result = run_cli(CliRunner(), ["-i", corpus / "real", "-o", out, "--model-name", tiny_model,
                                       "--include-hidden"])
    return out, result


@pytest.fixture(scope="session")
def manifest(corpus) -> dict[str, dict[str, str]]:
    with open(corpus / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f, delimiter="\t")}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def make_photo(path: Path, size=(64, 48), color=(200, 30, 30), *, exif=None, fmt=None, seed=None) -> Path:
    """Write a small image with some structure (a gradient and a block), optionally with EXIF."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(im)
    w, h = size
    shift = (seed or 0) * 7
    for x in range(w):
        draw.line([(x, 0), (x, h // 3)], fill=((x * 4 + shift) % 256, (x * 2) % 256, 255 - (x * 3) % 256))
    draw.rectangle([w // 4, h // 2, w // 2 + (seed or 0) % (w // 4 or 1), h - 2], fill=(20, 200, 40))
    kwargs = {}
    if exif is not None:
        kwargs["exif"] = exif
    im.save(path, format=fmt, **kwargs)
    return path


def bump_mtime(path: Path, seconds: float = 10.0) -> None:
    """Move a file's mtime forward, as an edit would (same size: only the mtime tells)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


_QUERY_COMMANDS = ("search", "similar", "duplicates", "status", "export")


def run_cli(runner: CliRunner, args: list[str], *, ok: bool = True, **kwargs):
    """Run the CLI in this process. An index run decodes in-process (--workers 0) unless the
    test says otherwise: starting a pool of spawned workers costs seconds, and the pool has
    tests of its own (test_decode, the kill points, the subprocess runs)."""
    from sqlindexer.cli import cli

    args = [str(a) for a in args]
    if args and args[0] not in _QUERY_COMMANDS and not {"--workers", "--help", "-h"} & set(args):
        args += ["--workers", "0"]
    result = runner.invoke(cli, args, catch_exceptions=not ok, **kwargs)
    if ok:
        assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def index(runner: CliRunner, tree: Path, out: Path, model: Path, *extra):
    """Index tree into out with model, in this process; it must succeed."""
    return run_cli(runner, ["-i", tree, "-o", out, "--model-name", model, *extra])


def one_error_line(result) -> str:
    """The one line a failed command wrote on stderr (and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def summary_line(result) -> str:
    """The index run's closing summary on stderr ("scanned N, new N, ...")."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("scanned ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def json_lines(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines()]


def copy_resized(src: Path, dst: Path, size: tuple[int, int], **save) -> Path:
    """A resized (and, with save options, re-encoded) copy of an image."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").resize(size, Image.LANCZOS).save(dst, **save)
    return dst


def read_jsonl(path: Path) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_pkl(path: Path) -> list[dict]:
    import pickle

    out = []
    with open(path, "rb") as f:
        while True:
            try:
                out.append(pickle.load(f))
            except EOFError:
                return out


def original_record(path: Path, vector: list[float], *, width: int | None = None, height: int | None = None,
                    exif: dict | None = None) -> dict:
    """A record as the original image-indexer wrote it for a real file (its README's layout,
    its time format), so it matches the file; width/height are read from the image if not given."""
    from datetime import datetime

    from PIL import Image

    st = path.stat()
    if width is None or height is None:
        with Image.open(path) as im:
            width, height = im.size
    return {
        "vector": vector,
        "metadata": {
            "path": str(path),
            "filename": path.name,
            "size_bytes": st.st_size,
            "creation_time": datetime.fromtimestamp(st.st_ctime).isoformat(),
            "modification_time": datetime.fromtimestamp(st.st_mtime).isoformat(),
            "width": width,
            "height": height,
            "exif": exif if exif is not None else {},
        },
    }


def live_in_group(pgid: int) -> list[str]:
    """Processes (not zombies) still in process group pgid, as 'pid cmdline'."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {cmd[:200]}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def cli_subprocess(*args, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m sqlindexer ARGS` in a child process, offline, with this checkout first on
    the path; its output captured."""
    return subprocess.run([sys.executable, "-m", "sqlindexer", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)), timeout=timeout)


@contextlib.contextmanager
def open_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A working database opened as a user would with sqlite3, rows by column name."""
    conn = sqlite3.connect(path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at where (created here) with these mount options, unmounted at the
    end; skips the test without root, or where mounting is not allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
