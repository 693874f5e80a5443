"""--engine ray on a real local Ray cluster: the same index as the local engine, an actor
killed mid-job, a path a worker cannot read, a driver killed and the job resumed, and the
one-line error without Ray.

One Ray head (2 CPUs, no dashboard) is started for the module in a helper process; every
run is a real `python -m sqlindexer --engine ray --ray-address <it>` subprocess, with the
tiny random SigLIP 2 from conftest in a model actor that stands in for a GPU one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_photo, read_jsonl, run_cli

pytestmark = pytest.mark.slow

BATCH = 4
ACTOR_TITLE = b"MapBatches(_EmbedActor)"

HEAD = r"""
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin
ray.shutdown()
"""


def _env(**extra: str) -> dict[str, str]:
    # The module's own throwaway cluster, on this machine only: no token to hand around.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.update(extra)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray head for the module's runs to join; its address."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'image-indexer[ray]' to run the Ray tests")
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env(), text=True, start_new_session=True)
    address = head.stdout.readline().strip()
    assert address, "the Ray head did not start"
    yield address
    head.stdin.close()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Photos of several formats and sizes (large ones decode slowly enough for a run to be
    caught mid-job), one turned by EXIF orientation, and one broken file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ray-tree")
    for i in range(23):
        size = (1600, 1200) if i % 3 == 0 else (120, 90) if i % 2 else (90, 120)
        make_photo(root / "a" / f"img{i:03d}.jpg", size=size, color=(i * 9 % 256, 120, 200), seed=i)
    make_photo(root / "a" / "big.png", size=(2000, 1500), seed=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise
    exif[0x0110] = "TestCam"  # Model
    make_photo(root / "b" / "turned.jpg", size=(160, 90), seed=51, exif=exif)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


N_OK = 25  # tree's images, broken.jpg aside


@pytest.fixture(scope="module")
def local_index(tree, tiny_model, tmp_path_factory) -> list[dict]:
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("local") / "index.jsonl"
    run_cli(CliRunner(), ["-i", tree, "-o", out, "--model-name", tiny_model, "--batch-size", BATCH])
    records = read_jsonl(out)
    assert len(records) == N_OK
    return records, _query(out.with_suffix(".sqlite"), "SELECT path, error FROM files WHERE status = 'failed'")


def _start(tree: Path, out: Path, model: Path, address: str, *extra: str, env=None, prefix=()) -> subprocess.Popen:
    args = [*prefix, sys.executable, "-m", "sqlindexer", "-i", str(tree), "-o", str(out), "--model-name", str(model),
            "--batch-size", str(BATCH), "--engine", "ray", "--ray-address", address, *extra]
    log = open(out.with_suffix(".stderr"), "wb")
    with log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                env=env or _env(), start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 180) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    err = out.with_suffix(".stderr").read_text(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{err}"
    return err


def _same_index(got: list[dict], expected: list[dict]) -> None:
    assert [r["metadata"] for r in got] == [r["metadata"] for r in expected]
    for a, b in zip(got, expected):
        u, v = np.asarray(a["vector"]), np.asarray(b["vector"])
        assert float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) >= 0.9999, a["metadata"]["path"]


def _query(db: Path, sql: str, params=()) -> list[tuple]:
    """Read-only, tolerating a database that does not exist yet or is busy."""
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
        try:
            return [tuple(r) for r in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()
    except sqlite3.Error:
        return []


def _committed(db: Path) -> int:
    rows = _query(db, "SELECT count(*) FROM files WHERE status = 'ok'")
    return rows[0][0] if rows else 0


def _wait_until(check, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def _actor_pids() -> list[int]:
    """Processes whose title (Ray sets it) names our model actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if ACTOR_TITLE in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


# -- tests -------------------------------------------------------------------------------
# Runs the CLI given after it and says, at exit, whether torch or transformers was imported.
IMPORTS_PROBE = ("import atexit, runpy, sys\n"
                 "atexit.register(lambda: print('imported:', *sorted({'torch', 'transformers'} & set(sys.modules)),"
                 " file=sys.stderr))\n"
                 "sys.argv = ['sqlindexer', *sys.argv[sys.argv.index('sqlindexer') + 1:]]\n"
                 "runpy.run_module('sqlindexer', run_name='__main__')\n")


def test_ray_run_gives_the_local_index(cluster, tree, tiny_model, local_index, tmp_path):
    out = tmp_path / "index.jsonl"
    err = _finish(_start(tree, out, tiny_model, cluster, prefix=(sys.executable, "-c", IMPORTS_PROBE)), out)
    assert "on Ray" in err and "failed 1, exported 25" in err, err
    # The driver reads the vector width and patch geometry from the checkpoint's files:
    # the model runs on the actors only.
    assert [line for line in err.splitlines() if line.startswith("imported:")] == ["imported:"], err
    records, failed = local_index
    _same_index(read_jsonl(out), records)
    # The broken file is failed with the reason the local engine gives.
    assert _query(out.with_suffix(".sqlite"), "SELECT path, error FROM files WHERE status = 'failed'") == failed
    assert [Path(p).name for p, _ in failed] == ["broken.jpg"]
    # Each file's fingerprint, hashed by the worker that decoded it, is of its bytes.
    from sqlindexer import fingerprint

    hashed = _query(out.with_suffix(".sqlite"), "SELECT path, content FROM files WHERE status = 'ok'")
    assert len(hashed) == N_OK
    for path, content in hashed:
        assert content == fingerprint.digest(Path(path).read_bytes()), path


def test_an_actor_killed_mid_job_is_replaced_and_the_job_completes(cluster, tree, tiny_model, local_index, tmp_path):
    out = tmp_path / "index.jsonl"
    db = out.with_suffix(".sqlite")
    proc = _start(tree, out, tiny_model, cluster)
    # The tiny model embeds the whole tree in well under a second once loaded, so the
    # actor is killed (a real SIGKILL) as soon as its process is there: loading the model
    # or on its first batches, with the decode tasks running and nothing or little committed.
    victims: list[int] = []
    _wait_until(lambda: victims.extend(_actor_pids()) or victims, proc, "a model actor")
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    assert _committed(db) < N_OK, "the job ended before the actor could be killed"
    replaced: set[int] = set()
    while proc.poll() is None:
        replaced.update(pid for pid in _actor_pids() if pid != victims[0])
        time.sleep(0.02)
    err = _finish(proc, out)
    assert replaced, f"no new actor replaced the killed one:\n{err}"
    _same_index(read_jsonl(out), local_index[0])
    runs = _query(db, "SELECT status, embedded, failed FROM runs")
    assert runs == [("completed", N_OK, 1)], (runs, err)


def test_a_path_a_worker_cannot_read_is_failed_and_the_job_goes_on(cluster, tree, tiny_model, tmp_path):
    # The driver runs in its own mount namespace, where a tmpfs holds one more photo: it
    # scans it, the cluster's workers (outside the namespace) cannot open it, as on a node
    # without the shared storage.
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root or CAP_SYS_ADMIN) to show the driver a path the workers lack")
    inputs = tmp_path / "in"
    hidden = inputs / "only-on-driver"
    hidden.mkdir(parents=True)
    for i in range(3):
        make_photo(inputs / f"shared{i}.jpg", seed=i)
    source = make_photo(tmp_path / "private.jpg", seed=9)
    out = tmp_path / "index.jsonl"
    script = f'mount -t tmpfs tmpfs "{hidden}" && cp "{source}" "{hidden}/" && exec "$@"'
    proc = _start(inputs, out, tiny_model, cluster, prefix=("unshare", "-m", "sh", "-c", script, "sh"))
    err = _finish(proc, out)
    assert "failed 1, exported 3" in err, err
    failed = _query(out.with_suffix(".sqlite"), "SELECT path, error FROM files WHERE status = 'failed'")
    assert [p for p, _ in failed] == [str(hidden / "private.jpg")]
    assert "cannot be read on Ray node" in failed[0][1], failed


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory) -> Path:
    """60 photos of 1600x1200: decoding them takes seconds, so a driver killed after its
    first commit cannot have received every result already (the 25 of `tree` could all
    arrive between two polls of the database)."""
    root = tmp_path_factory.mktemp("ray-slow-tree")
    for i in range(SLOW_N):
        make_photo(root / f"d{i % 4}" / f"img{i:03d}.jpg", size=(1600, 1200), color=(i * 7 % 256, 90, 40), seed=i)
    return root


SLOW_N = 60


def test_a_killed_driver_resumes_without_embedding_twice(cluster, slow_tree, tiny_model, tmp_path):
    out = tmp_path / "index.jsonl"
    db = out.with_suffix(".sqlite")
    proc = _start(slow_tree, out, tiny_model, cluster)
    _wait_until(lambda: _committed(db) >= BATCH, proc, "a committed batch")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _committed(db)
    assert BATCH <= kept < SLOW_N
    assert not out.exists()
    err = _finish(_start(slow_tree, out, tiny_model, cluster), out)
    assert f"failed 0, exported {SLOW_N}" in err, err
    assert sorted(r["metadata"]["path"] for r in read_jsonl(out)) == \
        sorted(str(p) for p in slow_tree.rglob("*.jpg"))
    runs = _query(db, "SELECT status, embedded FROM runs ORDER BY id")
    # The killed run keeps what it committed; the next one embeds only the rest, so no
    # image was committed twice.
    assert [s for s, _ in runs] == ["interrupted", "completed"], (runs, err)
    assert runs[0][1] == kept and sum(n for _, n in runs) == SLOW_N, runs


def test_without_ray_the_error_is_one_line(tree, tiny_model, tmp_path):
    # Ray made unimportable, as where the extra is not installed.
    site = tmp_path / "no-ray"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = _env(PYTHONPATH=f"{site}{os.pathsep}{REPO}")
    done = subprocess.run([sys.executable, "-m", "sqlindexer", "-i", str(tree), "-o", str(tmp_path / "i.jsonl"),
                           "--model-name", str(tiny_model), "--engine", "ray"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "Error: --engine ray needs Ray: pip install 'image-indexer[ray]'\n"
    assert not (tmp_path / "i.sqlite").exists()


def test_the_local_engine_never_imports_ray(tiny_model, tmp_path):
    make_photo(tmp_path / "in" / "one.jpg")
    probe = (
        "import sys\n"
        "from sqlindexer.cli import cli\n"
        "try:\n"
        f"    cli(['-i', {str(tmp_path / 'in')!r}, '-o', {str(tmp_path / 'i.jsonl')!r}, '--model-name', {str(tiny_model)!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_ray_reindex_reuses_moved_and_copied_files(cluster, tiny_model, tmp_path):
    # The driver matches what the database already holds; the cluster decodes (and
    # hashes) only the file whose content is new.
    import shutil

    from click.testing import CliRunner

    from sqlindexer import fingerprint

    lib, out = tmp_path / "lib", tmp_path / "index.jsonl"
    for i in range(6):
        make_photo(lib / "a" / f"p{i}.jpg", size=(64 + 4 * i, 48), seed=i)
    # The first index in this process, on the local engine: what the Ray run reuses is
    # what the database holds, whichever engine wrote it (and a Ray job costs seconds).
    run_cli(CliRunner(), ["-i", lib, "-o", out, "--model-name", tiny_model, "--batch-size", BATCH])
    before = {r["metadata"]["path"]: r["vector"] for r in read_jsonl(out)}
    db = out.with_suffix(".sqlite")

    (lib / "a").rename(lib / "b")
    shutil.copytree(lib / "b", lib / "c")
    make_photo(lib / "new.jpg", seed=9)
    _finish(_start(lib, out, tiny_model, cluster, "--reindex"), out)
    [run] = _query(db, "SELECT reused, renamed, decoded, embedded FROM runs ORDER BY id DESC LIMIT 1")
    assert run == (12, 6, 1, 1)
    after = {r["metadata"]["path"]: r["vector"] for r in read_jsonl(out)}
    for i in range(6):
        for folder in ("b", "c"):
            assert after[str(lib / folder / f"p{i}.jpg")] == before[str(lib / "a" / f"p{i}.jpg")]
    [(content,)] = _query(db, "SELECT content FROM files WHERE path = ?", (str(lib / "new.jpg"),))
    assert content == fingerprint.digest((lib / "new.jpg").read_bytes())
