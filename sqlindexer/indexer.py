"""One index run, end to end: scan -> state -> embed -> export.

Core code: no Click, no printing. Progress is reported through the `progress` callable
the caller passes; warnings go to logging.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

from . import db, overlap, state
from .config import Config
from .errors import DatabaseError, EmbedError, Interrupted
from .lock import RunLock
from .scan import Scanner

if TYPE_CHECKING:
    from .decode import DecodeOptions, Prepared

# Decoding, export and source-index reading (Pillow, numpy) are imported where they are
# used: a re-index with nothing to do needs none of them, and their imports were a fifth
# of its time.

log = logging.getLogger(__name__)

Tick = Callable[[int], None]
Progress = Callable[[str, "int | None"], ContextManager[Tick]]


@contextlib.contextmanager
def no_progress(desc: str, total: int | None) -> Iterator[Tick]:
    yield lambda n: None


@dataclass
class Summary:
    run_id: int
    mode: str
    resumed: bool
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    output: Path | None = None
    state_db: Path | None = None

    def line(self) -> str:
        c = self.counts
        return (
            f"scanned {c['scanned']}, new {c['new']}, modified {c['modified']}, unchanged {c['unchanged']}, "
            f"deleted {c['deleted']}, failed {c['failed']}, exported {c['exported']} in {self.seconds:.1f} s"
        )


def run_index(config: Config, *, progress: Progress = no_progress, embedder_factory=None,
              wait_for_lock: bool = False) -> Summary:
    """Bring the working database up to date with the inputs and export the index.

    wait_for_lock: when another run holds the database, wait for it to finish instead of
    raising LockedError."""
    started = time.monotonic()
    if config.engine == "ray":
        from .ray_engine import require_ray

        require_ray()
    db_path = config.state_db_path
    with RunLock(db_path, wait=wait_for_lock), _helper(config, embedder_factory) as helper:
        conn = db.connect(db_path)
        try:
            state.mark_unfinished_runs(conn)
            mode = "reindex" if config.reindex else "full"
            run = state.start_run(conn, mode=mode, model=config.model_name, config=config.to_json(), pid=os.getpid())
            if run.resumed:
                log.info("resuming the interrupted full build (run %d keeps what it committed)", run.build)
            try:
                _run(conn, config, run, progress, embedder_factory, helper)
            except (Interrupted, KeyboardInterrupt) as e:
                # A signal can land between a BEGIN and its try (or in a ROLLBACK): close
                # any transaction left open so that the run's status can still be written.
                _rollback_open(conn)
                stop = e if isinstance(e, Interrupted) else _as_interrupted(e)
                _record_end(conn, run.id, status="interrupted", error=str(stop))
                if stop is e:
                    raise
                raise stop from None
            except BaseException as e:
                _rollback_open(conn)
                _record_end(conn, run.id, status="failed", error=f"{type(e).__name__}: {e}"[:2000])
                raise
            state.finish_run(conn, run.id, status="completed")
            counts = state.run_counts(conn, run.id)
        except sqlite3.Error as e:
            # A full disk or an I/O error under the database: SQLite has rolled the
            # transaction back, what was committed before stays, the next run resumes.
            raise DatabaseError(f"cannot update working database {db_path}: {e}") from e
        finally:
            conn.close()
    return Summary(run.id, mode, run.resumed, counts, time.monotonic() - started, config.output_path, db_path)


def _as_interrupted(e: KeyboardInterrupt) -> Interrupted:
    # The CLI's signal handler raises a KeyboardInterrupt carrying .signum (a BaseException,
    # so that no `except Exception` on the way, e.g. a decoder's "this file is bad", can
    # swallow it); a plain KeyboardInterrupt is Python's own SIGINT.
    signum = getattr(e, "signum", signal.SIGINT)
    return Interrupted(signum, signal.Signals(signum).name)


def _rollback_open(conn) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # e.g. SQLite already rolled back a failed COMMIT
            conn.execute("ROLLBACK")


def _record_end(conn, run_id: int, *, status: str, error: str) -> None:
    """Record how the run ended, if the database can still be written: when it cannot
    (the disk is full), the row stays 'running' and the next run marks it interrupted."""
    try:
        state.finish_run(conn, run_id, status=status, error=error)
    except sqlite3.Error as e:
        log.debug("could not record the end of run %d: %s", run_id, e)


def _run(conn, config: Config, run: state.Run, progress: Progress, embedder_factory,
         helper: overlap.Helper | None) -> None:
    if config.reindex:
        _import_source_index(conn, config, run)
    elif config.source_index:
        log.warning("--source-index %s is ignored without --reindex (a full build embeds every image)",
                    config.source_index)
    _scan(conn, config, run, progress, on_work=helper.prepare if helper else None)
    if helper is not None and state.count_pending(conn):
        helper.run(run, progress)  # _embed_and_export, in the child, with the model it loaded
        return
    _embed_pending(conn, config, run, progress, embedder_factory)
    _export(conn, config, run, progress)


@contextlib.contextmanager
def _helper(config: Config, embedder_factory) -> Iterator[overlap.Helper | None]:
    """The child that loads the model during the scan, then embeds and exports (see
    overlap.py); forked before the database is opened. None with Ray (the model runs on
    the cluster) or where fork is not available: then this process does it all."""
    if config.engine != "local":
        yield None
        return

    def prepare():
        factory = embedder_factory
        if factory is None:
            from .embed import Embedder as factory  # noqa: N813 - deferred: imports torch
        embedder = factory(config.model_name, device=config.device, dtype=config.dtype).prepare()
        # The weights load while the scan goes on, and go on loading while the decode
        # workers start (_embed_locally's load() waits for this one). A failure here is
        # met again, and raised, by that load().
        threading.Thread(target=_quietly, args=(embedder.load,), daemon=True).start()
        return embedder

    def work(run: state.Run, prepared, progress: Progress) -> None:
        _embed_and_export(config, run, progress, lambda *args, **kwargs: prepared())

    helper = overlap.Helper.fork(prepare, work)
    try:
        yield helper
    finally:
        if helper is not None:
            helper.close()


def _quietly(load: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        load()


def _embed_and_export(config: Config, run: state.Run, progress: Progress, embedder_factory) -> None:
    """The child's part of a run, on its own connection."""
    db_path = config.state_db_path
    conn = db.connect(db_path)
    try:
        _embed_pending(conn, config, run, progress, embedder_factory)
        _export(conn, config, run, progress)
    except sqlite3.Error as e:
        raise DatabaseError(f"cannot update working database {db_path}: {e}") from e
    finally:
        conn.close()


# -- import ----------------------------------------------------------------------------
_LAST_EXPORT = "last_export"


def _import_source_index(conn, config: Config, run: state.Run) -> None:
    source = config.source_index_path
    if not source.is_file():
        log.debug("no source index at %s", source)
        return
    st = source.stat()
    last = state.get_meta(conn, _LAST_EXPORT)
    if last:
        mark = json.loads(last)
        if {k: mark.get(k) for k in ("path", "size", "mtime_ns")} == \
                {"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            # Our own export, unchanged since we wrote it: its vectors are all in the
            # database already, and if it was written with another model they are that
            # model's vectors, which must not be adopted under this model's name.
            if mark.get("model") == config.model_name:
                log.debug("source index %s is our last export; nothing to import", source)
            else:
                log.info("source index %s holds vectors of model %s; every file is embedded with %s",
                         source, mark.get("model"), config.model_name)
            return
    from .source_index import matching_records

    log.info("importing vectors from %s", source)
    records = matching_records(source, expected_dim=state.stored_dim(conn, config.model_name))
    n = state.import_vectors(conn, records, run)
    log.info("kept %d vectors from %s for files that did not change", n, source)


# -- scan ------------------------------------------------------------------------------
def _scan(conn, config: Config, run: state.Run, progress: Progress, *,
          on_work: Callable[[], None] | None = None) -> None:
    """on_work: called once, after the first batch that has a file to embed."""
    scanner = Scanner(
        [str(p) for p in config.input_paths],
        include_hidden=config.include_hidden,
        follow_symlinks=config.follow_symlinks,
    )
    # Phase lines at DEBUG mark where a run is (the kill-point tests time their signals by them).
    log.debug("scanning %s", ", ".join(map(str, config.input_paths)))
    scan = state.Scan(conn, run)
    with progress("scanning", None) as tick, _gc_paused():
        for batch in scanner.batches(state.SCAN_BATCH):
            scan.record(batch)
            tick(len(batch))
            if on_work is not None and scan.to_embed:
                on_work()
                on_work = None
    deleted = scan.sweep(keep_under=scanner.unreadable)
    if deleted:
        log.info("removed %d files that are gone from disk", deleted)
    log.debug("scan committed")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # The walk makes a few tuples per file and keeps none past its batch: the cyclic
    # collector would run every 700 of them and go through every object the process
    # holds, a tenth of a no-change re-index. Reference counting frees them all the same.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- embed -----------------------------------------------------------------------------
def _embed_pending(conn, config: Config, run: state.Run, progress: Progress, embedder_factory) -> None:
    total = state.count_pending(conn)
    if not total:
        return
    log.debug("embedding %d images", total)
    from .decode import DecodeOptions, usable_cpus

    if embedder_factory is None:
        from .embed import Embedder as embedder_factory  # noqa: N813 - deferred: imports torch
    # With Ray the model runs on the cluster's actors: here it only gives the input
    # geometry and the vector size, whatever GPU this machine lacks.
    device = "cpu" if config.engine == "ray" else config.device
    embedder = embedder_factory(config.model_name, device=device, dtype=config.dtype).prepare()
    stale = state.requeue_other_dims(conn, config.model_name, embedder.dim)
    if stale:
        log.warning("%d vectors stored for %s are not %d-d (imported from another model's index?); "
                    "embedding those files again", stale, config.model_name, embedder.dim)
        total = state.count_pending(conn)
    options = DecodeOptions(patch_size=embedder.patch_size, max_num_patches=embedder.max_num_patches,
                            max_image_pixels=config.max_image_pixels)
    clock = _Clock()
    if config.engine == "ray":
        from .ray_engine import embed_on_ray

        how = "on Ray, actor start-up included"
        batches = embed_on_ray(config, options, state.iter_pending(conn), dim=embedder.dim, started=clock.start)
    else:
        workers = config.workers if config.workers is not None else usable_cpus()
        how = f"{workers} decode workers"
        batches = _embed_locally(config, options, state.iter_pending(conn), embedder, workers, started=clock.start)
    failed = embedded = 0
    # Either source only computes: every result is checked and committed here, batch by batch.
    with contextlib.closing(batches), progress("embedding", total) as tick:
        for results in batches:
            for result in results:
                _recheck(result)
            state.store_results(conn, results, run, model=config.model_name, dim=embedder.dim)
            failed += sum(r.error is not None for r in results)
            embedded += sum(r.vector is not None for r in results)
            tick(len(results))
    if clock.started is not None:
        seconds = time.perf_counter() - clock.started
        log.info("embedded %d images in %.2f s (%.1f images/s, %s)",
                 embedded, seconds, embedded / seconds if seconds else 0.0, how)
    if failed:
        log.warning("%d files could not be read; see: sqlite3 %s \"SELECT path, error FROM files WHERE status = 'failed'\"",
                    failed, config.state_db_path)


class _Clock:
    """When the embedding started, for the images/s line: set once by the source, when its
    model is ready (local) or its job starts (Ray)."""

    started: float | None = None

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()


def _embed_locally(config: Config, options: DecodeOptions, pending: Iterator[state.Pending], embedder,
                   workers: int, *, started: Callable[[], None]) -> Iterator[list[state.Result]]:
    from .decode import Decoder

    # The weights load in a thread while the first images decode in the workers.
    with ThreadPoolExecutor(1) as loader, Decoder(options, workers=workers,
                                                  ahead=2 * config.batch_size + workers) as decoder:
        loading = loader.submit(embedder.load)
        stream = decoder.map(pending, lambda p: p.path)
        while batch := list(islice(stream, config.batch_size)):
            loading.result()
            started()
            yield _process_batch(batch, embedder)


def _recheck(result: state.Result) -> None:
    """The file must still be what was scanned, or its vector would be attached to content
    we never saw; a changed file stays pending and the next run picks it up."""
    from . import images

    if not images.stat_matches(result.file.path, result.file.size, result.file.mtime_ns):
        if os.path.exists(result.file.path):
            result.changed = True
            log.warning("%s changed while it was being read; it will be indexed on the next run", result.file.path)
        elif result.error is None:
            result.error = "file disappeared while it was being read"
    if result.error is not None:
        result.vector = None
        log.warning("skipping %s: %s", result.file.path, result.error)
    elif result.changed:
        result.vector = None


def _process_batch(batch: list[tuple[state.Pending, Prepared]], embedder) -> list[state.Result]:
    from . import images

    results: list[state.Result] = []
    ready: list[tuple[state.Result, object]] = []
    for item, p in batch:
        result = state.Result(item, width=p.width, height=p.height, exif=p.exif, error=p.error)
        # A file that changed since the scan is not worth embedding (_recheck drops it).
        if result.error is None and images.stat_matches(item.path, item.size, item.mtime_ns):
            ready.append((result, p.pixels))
        results.append(result)
    if ready:
        vectors = embedder.embed_resized([pixels for _, pixels in ready])
        if vectors.shape[1] != embedder.dim:
            raise EmbedError(f"model {embedder.model_name!r} gave {vectors.shape[1]}-d vectors, "
                             f"its config says {embedder.dim}")
        for (result, _), vec in zip(ready, vectors):
            result.vector = vec.astype("<f4").tobytes()
    return results


# -- export ----------------------------------------------------------------------------
def _export(conn, config: Config, run: state.Run, progress: Progress) -> None:
    out = config.output_path
    fmt = config.resolved_output_format
    model = config.model_name
    # One read transaction: the counter recorded with the file is that of the rows in it.
    with db.transaction(conn, immediate=False):
        total = state.count_export_rows(conn, model)
        # The counter that every change to a record moves, not this run's counts, tells
        # whether the rows moved since the file was written: a run killed between its last
        # commit and the end of its export leaves changes that the next run must export.
        # Records hold local times: another time zone writes other records.
        mark = {"model": model, "format": fmt, "stamp": state.record_stamp(conn), "tz": _time_zone()}
        last = _last_export(conn, out)
        # The file on disk is the one we wrote from these very rows: rewriting it would
        # produce the same bytes, at the cost of serialising every vector again.
        up_to_date = last is not None and all(last.get(k) == v for k, v in mark.items())
        if not up_to_date:
            n = _write_export(conn, config, total, last, mark, progress)
    if up_to_date:
        log.info("%s is up to date", out)
        with db.transaction(conn):
            state.add_counts(conn, run.id, exported=total)
        return
    from . import export

    st = out.stat()
    with db.transaction(conn):
        state.add_counts(conn, run.id, exported=n)
    state.set_meta(conn, _LAST_EXPORT, json.dumps({
        "path": str(out), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, **mark,
        **({"layout": export.JSONL_LAYOUT} if fmt == "jsonl" else {})}))


def _write_export(conn, config: Config, total: int, last: dict[str, Any] | None, mark: dict[str, Any],
                  progress: Progress) -> int:
    from . import export

    out, fmt, model = config.output_path, config.resolved_output_format, config.model_name
    since, how = None, ""
    if fmt == "jsonl" and last is not None and isinstance(last.get("stamp"), int) \
            and last.get("layout") == export.JSONL_LAYOUT \
            and all(last.get(k) == mark[k] for k in ("model", "format", "tz")):
        changed = state.count_changed_export_rows(conn, model, last["stamp"])
        # Copying lines pays when most records are unchanged; a rebuild is written afresh.
        if changed <= total // 2:
            since, how = last["stamp"], f", {changed} changed since it was written"
    log.debug("exporting %d records to %s%s", total, out, how)
    with progress("exporting", total) as tick:
        if since is not None:
            try:
                return export.write_index(state.iter_export_changes(conn, model, since), out, fmt, tick=tick,
                                          previous=out, load=lambda path: state.export_row(conn, path))
            except ValueError as e:  # not lines we wrote after all: write every record
                log.warning("cannot copy records from %s (%s); writing them all", out, e)
        return export.write_index(state.iter_export_rows(conn, model), out, fmt, tick=tick)


def _time_zone() -> list[Any]:
    return [time.timezone, time.altzone, *time.tzname]


def _last_export(conn, out: Path) -> dict[str, Any] | None:
    """The mark recorded with the last export, if the file at out is still that file."""
    last = state.get_meta(conn, _LAST_EXPORT)
    if not last:
        return None
    try:
        st = out.stat()
    except OSError:
        return None
    recorded = json.loads(last)
    if {k: recorded.get(k) for k in ("path", "size", "mtime_ns", "ino")} != \
            {"path": str(out), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}:
        return None
    return recorded
