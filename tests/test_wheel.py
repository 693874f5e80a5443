"""The wheel as users get it: built from the tree, installed into a fresh virtualenv, run
from outside the repository; the migrations must travel inside the package."""

from __future__ import annotations

import os
import site
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, make_photo, read_jsonl

pytestmark = pytest.mark.slow


def _run(args, *, cwd: Path, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, nothing pointing at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--outdir", outdir, REPO]
    result = _run(build, cwd=outdir)
    if result.returncode != 0:
        # Isolation fetches hatchling from the package index; without one, build with the
        # hatchling installed here.
        isolated_log = result.stdout + result.stderr
        result = _run([*build, "--no-isolation"], cwd=outdir)
        assert result.returncode == 0, f"isolated:\n{isolated_log}\n--no-isolation:\n{result.stdout}{result.stderr}"
    [whl] = outdir.glob("*.whl")
    return whl


def _running_site_dirs() -> list[str]:
    """The site-packages of the interpreter running the tests, minus any that holds a copy of
    sqlindexer (the checkout itself, should it be on the path). A site-packages inside the
    repository (the README's .venv) stays: it holds no copy, only the editable install's .pth.

    ``venv --system-site-packages`` run from inside a virtualenv links the *base* interpreter's
    site-packages, not the virtualenv's, so the wheel's venv would miss everything installed in
    it (Pillow, torch, transformers). Listing these directories in a ``.pth`` file adds them as
    plain paths; the ``.pth`` files inside them are not processed, so an editable install's
    pointer back at the checkout stays out as well."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and not (Path(d) / "sqlindexer" / "__init__.py").exists()]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv that sees the packages of the running environment (torch,
    transformers, Pillow) and has the wheel, and only the wheel, installed into it."""
    root = tmp_path_factory.mktemp("venv") / "env"
    work = root.parent
    result = _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=work)
    assert result.returncode == 0, result.stderr
    python = root / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    venv_site = _run([python, "-c", purelib], cwd=work, env=_clean_env())
    assert venv_site.returncode == 0, venv_site.stderr
    # Paths from a .pth file go after the venv's own site-packages on sys.path, so the wheel's
    # copy of sqlindexer is the one imported even where the running environment has one too.
    pth = Path(venv_site.stdout.strip()) / "running_env.pth"
    pth.write_text("".join(f"{d}\n" for d in _running_site_dirs()))
    # pip comes from the running environment's site-packages and installs into the venv (its sys.prefix).
    result = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=work, env=_clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_wheel_ships_the_migrations(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "migrations").glob("*.sql"))
    assert shipped
    for name in shipped:
        assert f"sqlindexer/migrations/{name}" in names
    assert "sqlindexer/cli.py" in names and "sqlindexer/__main__.py" in names
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "image-indexer = sqlindexer.cli:cli" in text
    # Nothing of the test suite or the repository's tooling in the wheel.
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_installed_wheel_indexes_from_outside_the_repo(venv, tiny_model, tmp_path):
    python = venv / "bin" / "python"
    where = _run([python, "-c", "import sys, sqlindexer, sqlindexer.db as db; print(sqlindexer.__file__); "
                  "print(db._migrations_dir()); print(*sys.path, sep='\\n')"], cwd=tmp_path, env=_clean_env())
    assert where.returncode == 0, where.stderr
    module_file, migrations_dir, *sys_path = (Path(line) for line in where.stdout.splitlines() if line)
    # The checkout itself (a copy of the package at the top); the README's .venv inside it is fine.
    leaked = [p for p in sys_path
              if (p / "sqlindexer" / "__init__.py").exists() and not p.resolve().is_relative_to(venv.resolve())]
    assert not leaked, f"the checkout is on the wheel venv's sys.path: {leaked}"
    assert module_file.resolve().is_relative_to(venv.resolve()), module_file
    assert not module_file.resolve().is_relative_to(REPO.resolve()), module_file
    assert migrations_dir.resolve().is_relative_to(venv.resolve()), migrations_dir

    help_ = _run([python, "-m", "sqlindexer", "--help"], cwd=tmp_path, env=_clean_env())
    assert help_.returncode == 0, help_.stderr
    assert "--input-dirs" in help_.stdout and "--reindex" in help_.stdout

    photos = tmp_path / "photos"
    for i in range(3):
        make_photo(photos / f"p{i}.jpg", seed=i)
    out = tmp_path / "index.jsonl"
    result = _run([venv / "bin" / "image-indexer", "-i", photos, "-o", out, "--model-name", tiny_model],
                  cwd=tmp_path, env=_clean_env(HF_HOME=str(tmp_path / "hf-home")))
    assert result.returncode == 0, result.stderr
    assert "exported 3" in result.stderr
    records = read_jsonl(out)
    assert [Path(r["metadata"]["path"]).name for r in records] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert all(len(r["vector"]) == len(records[0]["vector"]) > 0 for r in records)
    conn = sqlite3.connect(out.with_suffix(".sqlite"))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(list((REPO / "migrations").glob("*.sql")))
        assert conn.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    finally:
        conn.close()
