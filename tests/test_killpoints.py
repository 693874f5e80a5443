"""Kill at any point: a seeded harness stops real `python -m sqlindexer` runs with SIGKILL,
SIGTERM or SIGINT at randomly chosen moments of the scan, the embedding, a commit and the
export, and checks after every stop and at the end of every chain of stops that

- the working database passes PRAGMA integrity_check and the lock died with the run;
- no process of the stopped run is left;
- a reader polling the index file in another process only ever saw the previous index or
  a whole new one, never a partial file;
- every vector committed before a stop is kept, byte for byte, by the runs after it;
- SIGTERM and SIGINT end the run with one "interrupted" line, status 143 / 130, no
  traceback and no .tmp left behind;
- once a run completes, the index equals the one an uninterrupted run wrote (same paths
  and metadata, vectors within 1e-5), and the runs of the chain embedded each image once
  in all: the counters are committed with the vectors, so what a stop lost (at most the
  one batch in flight) is not counted, and the sum is exactly the number of images.

Setup: a previous index of a 240-image tree exists; the tree then changes (12 files
modified, 8 deleted, 40 added, 2 broken files added; and, all of them reused rather than
embedded, 10 files renamed into another folder, 8 copied, 6 touched) and each run is
`--reindex` over it. The tree also holds 4,000 folders without images, so that its walk
lasts long enough for a scan stop to land in it. The reused files also count: over a chain each is reused once, none
is embedded, and their vectors are the originals bit for bit. Every chain of stops starts again from the previous index and
database. The runs of a chain are the interrupted run and its re-runs: a chain of k
stops is k interrupted runs, each resuming the one before, then one run to completion.
A run that embeds pays Python, torch and transformers start-up (about 5 s here), so
chaining the stops (rather than completing after each) is what keeps this under two
minutes; each stop is still checked on its own.

Moments: each stop waits for the phase's DEBUG line on the child's stderr ("scanning",
"scan committed" for the reuse step, "loaded model", "exporting"), then a seeded random delay within the time that phase took
in the uninterrupted run. A "commit" stop is sent the moment the database's -wal file
grows for the k-th time (k seeded) while the embedding runs, which lands in, or a
fraction of a millisecond after, a batch's COMMIT. A stop whose run had already ended is
recorded as a miss, not counted as a kill point. A scan stop that came once the scan had
committed counts as "after scan"; while no stop of the signal has landed in the scan
itself, the next run of the chain is stopped in its scan again, the moment its line is
read (SCAN_RETRIES times at most).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, live_in_group, make_photo, open_db, read_jsonl

from sqlindexer.lock import RunLock

pytestmark = pytest.mark.slow

# Another seed explores other moments: KILLPOINTS_SEED=n pytest tests/test_killpoints.py
SEED = int(os.environ.get("KILLPOINTS_SEED", "20261124"))
BATCH = 4
N_BEFORE = 240
N_MODIFIED, N_DELETED, N_NEW, N_BROKEN = 12, 8, 40, 2
N_MOVED, N_COPIED, N_TOUCHED = 10, 8, 6
# Folders holding no image (an archive's empty ones). Without them the walk of this tree
# ends sooner than the harness, reading the child's stderr in another process, can act on
# a loaded machine: scan stops then all landed after the scan had committed.
N_EMPTY_FOLDERS = 4000
# A scan stop that landed after the scan, while none of this signal's has landed in it,
# is tried again on the next run of the chain, sent as soon as its line is read.
SCAN_RETRIES = 3
NEEDED = N_MODIFIED + N_NEW  # images the re-index embeds
REUSED = N_MOVED + N_COPIED + N_TOUCHED  # images it gives a known vector, neither decoded nor embedded
# The phases of each chain, in order. A scan stop comes before anything is embedded, an
# export stop after the embedding finished (the run that reaches the export first has to
# finish it; the ones after it start straight with the export).
CHAINS = {
    "SIGKILL": [["scan"] * 3 + ["reuse"] * 2 + ["embed", "commit", "embed"] + ["export"] * 4] * 2,
    "SIGTERM": [["scan", "reuse", "commit", "embed", "export", "export"]],
    "SIGINT": [["scan", "reuse", "embed", "commit", "export", "export"]],
}
# Stops that must land (a stop is skipped when its phase is already over: the embedding
# finished in an earlier stop, or an earlier run completed the export).
MIN_HITS = {"SIGKILL": 20, "SIGTERM": 4, "SIGINT": 4}
EXIT = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
MARKERS = {"scan": "DEBUG: scanning ", "reuse": "DEBUG: scan committed", "embed": "INFO: loaded ",
           "commit": "INFO: loaded ", "export": "DEBUG: exporting "}
# Phases the calibration run measures: from its marker to the next phase's marker (the
# export: to the summary line, printed once the run is recorded as completed).
NEXT = {"scan": "DEBUG: scan committed", "reuse": "INFO: kept the vectors ", "embed": "INFO: embedded ",
        "export": "scanned "}


def _env() -> dict[str, str]:
    # faulthandler: a run that hangs is sent SIGABRT and prints every thread's stack.
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")


# -- the tree, the previous index, and the uninterrupted run ---------------------------
@dataclass
class World:
    tree: Path
    work: Path  # every run writes work/index.jsonl and work/index.sqlite
    pristine: Path  # the previous index and database, copied into work before each chain
    model: Path
    reference: list[dict] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    per_image: float = 0.0

    @property
    def out(self) -> Path:
        return self.work / "index.jsonl"

    @property
    def state(self) -> Path:
        return self.work / "index.sqlite"

    def args(self) -> list[str]:
        return ["-i", str(self.tree), "-o", str(self.out), "--model-name", str(self.model), "--batch-size",
                str(BATCH), "--reindex", "--log-level", "DEBUG", "--workers", "1"]

    def reset(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        # copy2 keeps the mtime, so the index is recognised as the database's own export.
        shutil.copytree(self.pristine, self.work, copy_function=shutil.copy2)


def _photo(path: Path, i: int, *, variant: int = 0) -> None:
    make_photo(path, size=(64 + 8 * variant, 48), color=(i * 7 % 256, 90 + variant * 40, 255 - i % 256),
               seed=i + 1000 * variant)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> World:
    root = tmp_path_factory.mktemp("killpoints")
    w = World(tree=root / "tree", work=root / "work", pristine=root / "pristine", model=tiny_model)
    names = [w.tree / f"d{i % 4}" / f"img{i:03d}.jpg" for i in range(N_BEFORE)]
    for i, path in enumerate(names):
        _photo(path, i)
    for i in range(N_EMPTY_FOLDERS):
        (w.tree / "empty" / f"{i // 50:02d}" / f"{i:04d}").mkdir(parents=True)
    w.work.mkdir()
    first = Run(w, "prepare").start()
    assert first.wait() == 0, first.stderr
    assert len(read_jsonl(w.out)) == N_BEFORE
    shutil.copytree(w.work, w.pristine, copy_function=shutil.copy2)
    assert not (w.pristine / "index.sqlite-wal").exists()

    # The change the re-index has to bring in.
    rng = random.Random(SEED)
    picked = rng.sample(range(N_BEFORE), N_MODIFIED + N_DELETED + N_MOVED + N_COPIED + N_TOUCHED)
    changed, picked = picked[:N_MODIFIED], picked[N_MODIFIED:]
    deleted, picked = picked[:N_DELETED], picked[N_DELETED:]
    moved, picked = picked[:N_MOVED], picked[N_MOVED:]
    copied, touched = picked[:N_COPIED], picked[N_COPIED:]
    for i in changed:
        _photo(names[i], i, variant=1)
    for i in deleted:
        names[i].unlink()
    (w.tree / "moved").mkdir()
    for i in moved:
        names[i].rename(w.tree / "moved" / names[i].name)
    (w.tree / "copies").mkdir()
    for i in copied:
        shutil.copyfile(names[i], w.tree / "copies" / names[i].name)
    for i in touched:
        st = names[i].stat()
        os.utime(names[i], ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
    for i in range(N_NEW):
        _photo(w.tree / "new" / f"n{i:03d}.jpg", N_BEFORE + i, variant=2)  # no copy of an old image
    for i in range(N_BROKEN):
        (w.tree / "new" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg " * (i + 1))

    # The uninterrupted run, timed phase by phase.
    w.reset()
    ref = Run(w, "reference").start()
    assert ref.wait() == 0, ref.stderr
    w.reference = read_jsonl(w.out)
    assert len(w.reference) == N_BEFORE - N_DELETED + N_NEW + N_COPIED
    for phase, nxt in NEXT.items():
        start = ref.seen(MARKERS[phase])
        end = ref.seen(nxt)
        assert start is not None and end is not None, (phase, ref.stderr)
        w.durations[phase] = max(end - start, 0.005)
    w.per_image = w.durations["embed"] / NEEDED
    print("\nphase durations of the uninterrupted run:", {k: round(v, 4) for k, v in w.durations.items()})
    run = _runs(w.state)[-1]
    assert (run["embedded"], run["failed"], run["modified"], run["deleted"], run["reused"], run["renamed"]) == \
        (NEEDED, N_BROKEN, N_MODIFIED + N_TOUCHED, N_DELETED + N_MOVED, REUSED, N_MOVED)
    return w


# -- one run of the indexer, watched -----------------------------------------------------
class Run:
    """`python -m sqlindexer` in its own session; its stderr lines are timestamped as they
    arrive so that a stop can be timed from them."""

    def __init__(self, world: World, label: str) -> None:
        self.world = world
        self.label = label
        self.lines: list[tuple[float, str]] = []
        self.proc: subprocess.Popen | None = None
        self.ended: float | None = None
        self._seen = threading.Condition()

    def start(self) -> Run:
        self.proc = subprocess.Popen([sys.executable, "-m", "sqlindexer", *self.world.args()],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=_env(), start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._seen:
                self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))
                self._seen.notify_all()
        self.proc.wait()
        with self._seen:
            self.ended = time.monotonic()
            self._seen.notify_all()

    def seen(self, prefix: str) -> float | None:
        with self._seen:
            return next((t for t, line in self.lines if line.startswith(prefix)), None)

    def wait_for(self, prefix: str, timeout: float = 120) -> float | None:
        """When the line starting with prefix arrived; None if the run ended without it."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                found = next((t for t, line in self.lines if line.startswith(prefix)), None)
                if found is not None or self.ended is not None:
                    return found
                left = deadline - time.monotonic()
                assert left > 0, f"{self.label}: no {prefix!r} within {timeout} s:\n{self.stderr}"
                self._seen.wait(left)

    def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGABRT)
            time.sleep(2)
            self.kill_group()
            time.sleep(0.5)
            pytest.fail(f"{self.label}: still running after {timeout} s:\n{self.stderr}")
        with self._seen:
            while self.ended is None:
                self._seen.wait(1)
        return code

    @property
    def stderr(self) -> str:
        with self._seen:
            return "\n".join(line for _, line in self.lines)

    def send(self, signame: str) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            if signame == "SIGINT":
                os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
            elif signame == "SIGKILL":
                # The run's processes (the indexer and its decode workers) all at once.
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(getattr(signal, signame))  # to the process you started

    def kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=30)


def _wal_grew(wal: Path, times: int, run: Run, timeout: float = 120) -> bool:
    """Poll the -wal file until it has changed `times` times; False if the run ended first."""
    def key():
        try:
            st = wal.stat()
            return st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            return None

    last, changes = key(), 0
    deadline = time.monotonic() + timeout
    while run.proc.poll() is None and time.monotonic() < deadline:
        now = key()
        if now != last:
            changes += 1
            last = now
            if changes >= times:
                return True
        time.sleep(0.0002)
    return False


# -- the reader -------------------------------------------------------------------------
READER = r"""
import json, sys, time
from pathlib import Path
out, previous, expected, stop, report = map(Path, sys.argv[1:6])
old = previous.read_bytes()
want = set(json.loads(expected.read_text()))
reads = bad = 0
problems = []
while not stop.exists():
    try:
        data = out.read_bytes()
    except FileNotFoundError:
        data = None
    reads += 1
    if data != old:
        try:
            assert data is not None, "the index file is missing"
            assert data.endswith(b"\n"), "no final newline"
            paths = [json.loads(line)["metadata"]["path"] for line in data.split(b"\n")[:-1]]
            assert set(paths) == want and len(paths) == len(want), f"{len(paths)} records, not the expected set"
        except Exception as e:
            bad += 1
            if len(problems) < 5:
                problems.append(f"{type(e).__name__}: {e}"[:300])
    time.sleep(0.002)
report.write_text(json.dumps({"reads": reads, "bad": bad, "problems": problems}))
"""


@contextlib.contextmanager
def reader(world: World, tmp: Path):
    """A process that reads the index file over and over while the chain runs."""
    tmp.mkdir(parents=True, exist_ok=True)
    previous = tmp / "previous.jsonl"
    shutil.copy2(world.out, previous)
    expected = tmp / "expected.json"
    expected.write_text(json.dumps([r["metadata"]["path"] for r in world.reference]))
    stop, report = tmp / "stop", tmp / "report.json"
    proc = subprocess.Popen([sys.executable, "-c", READER, str(world.out), str(previous), str(expected), str(stop),
                             str(report)], env=_env())
    result: dict = {}
    try:
        yield result
    finally:
        stop.touch()
        proc.wait(timeout=30)
        result.update(json.loads(report.read_text()))


# -- checks -----------------------------------------------------------------------------
def _runs(db: Path) -> list[sqlite3.Row]:
    with open_db(db) as conn:
        return conn.execute("SELECT * FROM runs ORDER BY id").fetchall()


def _committed(db: Path, after_run: int) -> dict[str, bytes]:
    """path -> embedding of the vectors committed by runs after after_run."""
    with open_db(db) as conn:
        return {r["path"]: r["embedding"] for r in conn.execute(
            "SELECT path, embedding FROM files WHERE status = 'ok' AND changed_run > ?", (after_run,))}


def _pending(db: Path) -> int:
    with open_db(db) as conn:
        return conn.execute("SELECT count(*) FROM files WHERE status = 'pending'").fetchone()[0]


def _integrity(db: Path) -> None:
    with open_db(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _nothing_left_behind(run: Run, grace: float = 10) -> None:
    if not Path("/proc/self/stat").exists():
        return
    deadline = time.monotonic() + grace
    while (left := live_in_group(run.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"{run.label}: processes of the stopped run are still alive:\n" + "\n".join(left)


def _same_index(got: list[dict], want: list[dict]) -> None:
    assert [r["metadata"]["path"] for r in got] == [r["metadata"]["path"] for r in want]
    for g, w in zip(got, want):
        assert g["metadata"] == w["metadata"], g["metadata"]["path"]
        np.testing.assert_allclose(np.asarray(g["vector"]), np.asarray(w["vector"]), rtol=0, atol=1e-5,
                                   err_msg=g["metadata"]["path"])


# -- stopping a run at a moment --------------------------------------------------------
@dataclass
class Moment:
    signame: str
    phase: str
    delay: float = 0.0  # seconds after the marker
    commits: int = 0  # for a "commit" stop: which -wal change


def _plan(world: World, rng: random.Random, signame: str, phase: str, pending: int) -> Moment:
    if phase in ("scan", "reuse"):
        return Moment(signame, phase, delay=rng.uniform(0, world.durations[phase]))
    if phase == "embed":
        # Within the first half of the embedding still to do.
        return Moment(signame, phase, delay=rng.uniform(0, 0.5 * world.per_image * pending))
    if phase == "commit":
        return Moment(signame, phase, commits=rng.randint(1, max(1, pending // BATCH // 2)))
    # From the moment the .tmp appears: the records are written in a few milliseconds.
    return Moment(signame, phase, delay=rng.uniform(0, 0.004))


def _stop(run: Run, moment: Moment) -> str:
    """Send moment's signal at its moment; 'hit', or why not."""
    marker = run.wait_for(MARKERS[moment.phase])
    if marker is None:
        return "ended before the phase"
    if moment.phase == "commit":
        if not _wal_grew(run.world.state.with_name("index.sqlite-wal"), moment.commits, run):
            return "ended before the commit"
    elif moment.phase == "export":
        tmp = run.world.out.with_name(run.world.out.name + ".tmp")
        while not tmp.exists() and run.proc.poll() is None and time.monotonic() < marker + 10:
            time.sleep(0.0002)
        time.sleep(moment.delay)
    else:
        time.sleep(max(0.0, marker + moment.delay - time.monotonic()))
    if run.proc.poll() is not None:
        return "ended before the signal"
    run.send(moment.signame)
    return "hit"


def _check_stopped(run: Run, moment: Moment, code: int) -> str:
    """The checks after one stop; returns the phase the stop landed in."""
    w = run.world
    last = _runs(w.state)[-1]
    if last["pid"] == run.proc.pid and last["status"] == "completed":
        # The signal came after the run had recorded its end: the interpreter was exiting
        # (SIGTERM and SIGINT then have their default effect; the work is all committed).
        landed = "exit"
    else:
        landed = moment.phase
        if landed == "scan" and last["pid"] == run.proc.pid and last["scanned"]:
            landed = "after scan"  # the scan had committed: stopped in the sweep or before the embedding
        assert code == EXIT[moment.signame], f"{run.label}: exit {code}\n{run.stderr}"
    if moment.signame != "SIGKILL" and landed != "exit":
        # Decode workers start with SIGINT blocked until they ignore it: not even a worker
        # that was starting when Ctrl-C came may print a traceback.
        err = run.stderr
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and f"interrupted by {moment.signame}" in errors[0], err
        assert err.rstrip().splitlines()[-1] == errors[0], "the interruption is not the last word on stderr"
        assert not w.out.with_name(w.out.name + ".tmp").exists(), "a .tmp was left behind"
        assert last["pid"] == run.proc.pid and last["status"] == "interrupted", (dict(last), err)
        assert moment.signame in last["error"]
    _nothing_left_behind(run)
    _integrity(w.state)
    RunLock(w.state).acquire().release()  # the lock went with the process
    return landed


# -- the test ---------------------------------------------------------------------------
@pytest.mark.parametrize("signame", list(CHAINS))
def test_stopped_at_random_moments_then_resumed(world, signame, tmp_path):
    rng = random.Random(f"{SEED}-{signame}")
    tally: dict[str, int] = {}
    notes: list[str] = []
    started = time.monotonic()
    retries = SCAN_RETRIES
    for c, phases in enumerate(CHAINS[signame]):
        world.reset()
        first_run = _runs(world.state)[-1]["id"]
        kept: dict[str, bytes] = {}
        exported = False  # once a run of the chain completed, the next ones find the index up to date
        planned = list(phases)
        with reader(world, tmp_path / f"chain{c}") as seen:
            k = -1
            while (k := k + 1) < len(planned):
                phase = planned[k]
                # No pending row: either no scan of the chain committed yet (all is to do)
                # or the embedding is over.
                todo = _pending(world.state) or \
                    (0 if len(_committed(world.state, first_run)) == NEEDED + REUSED else NEEDED + N_BROKEN)
                if (phase in ("embed", "commit") and not todo) or (phase == "export" and exported):
                    notes.append(f"chain {c} stop {k} ({phase}): no such phase left")
                    continue
                moment = _plan(world, rng, signame, phase, todo) if phase != "scan again" else \
                    Moment(signame, "scan")
                run = Run(world, f"{signame} chain {c} stop {k} ({phase})").start()
                try:
                    outcome = _stop(run, moment)
                    code = run.wait()
                finally:
                    run.kill_group()
                if outcome != "hit":
                    assert code == 0, f"{run.label}: exit {code}\n{run.stderr}"
                    notes.append(f"{run.label}: {outcome} (the run completed)")
                    exported = True
                    continue
                landed = _check_stopped(run, moment, code)
                exported = exported or landed == "exit"
                tally[landed] = tally.get(landed, 0) + 1
                if landed == "after scan" and "scan" not in tally and retries:
                    retries -= 1
                    planned.insert(k + 1, "scan again")
                    notes.append(f"{run.label}: landed after the scan, tried again")
                now = _committed(world.state, first_run)
                for path, vec in kept.items():
                    assert now.get(path) == vec, f"{run.label}: {path}, committed before, was embedded again"
                kept = now
            final = Run(world, f"{signame} chain {c} completion").start()
            assert final.wait() == 0, final.stderr
        assert seen["reads"] > 0 and seen["bad"] == 0, seen
        _integrity(world.state)
        _same_index(read_jsonl(world.out), world.reference)
        runs = [r for r in _runs(world.state) if r["id"] > first_run]
        assert runs[-1]["status"] == "completed"
        assert all(r["status"] in ("interrupted", "completed") for r in runs[:-1]), \
            [(r["id"], r["status"], r["error"]) for r in runs]
        # Each image embedded or reused once over the whole chain, and every committed
        # vector kept.
        assert sum(r["embedded"] for r in runs) == NEEDED, [tuple(r)[:24] for r in runs]
        assert sum(r["reused"] for r in runs) == REUSED, [tuple(r)[:24] for r in runs]
        assert sum(r["failed"] for r in runs) == N_BROKEN
        final_rows = _committed(world.state, first_run)
        assert len(final_rows) == NEEDED + REUSED
        for path, vec in kept.items():
            assert final_rows[path] == vec, f"{path} was embedded again by the completing run"
    hits = sum(tally.values())
    print(f"\n{signame}: {hits} stops in {time.monotonic() - started:.0f} s, by phase {tally}; "
          + "; ".join(notes))
    assert hits >= MIN_HITS[signame], f"only {hits} stops landed: {notes}"
    assert {"scan", "embed", "commit", "export"} <= set(tally), tally
