"""One index run, top to bottom: lock -> scan and commit -> embed what is pending, committing
per batch -> export.

Core code: no Click, no printing. Progress is reported through the `progress` callable the
caller passes; warnings go to logging. The model is loaded only when a file needs it, and
decoding, export and the source index (Pillow, numpy) are imported where they are used: a
re-index with nothing to do needs none of them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import db, runs, signals, state
from .config import Config
from .errors import DatabaseError, Interrupted
from .lock import RunLock
from .progress import Progress, no_progress
from .scan import Scanner

log = logging.getLogger(__name__)


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
        line = (
            f"scanned {c['scanned']}, new {c['new']}, modified {c['modified']}, unchanged {c['unchanged']}, "
            f"deleted {c['deleted']}, failed {c['failed']}, exported {c['exported']} in {self.seconds:.1f} s"
        )
        if c.get("reused"):
            line += (f"; reused the vectors of {c['reused']} moved, copied or touched files "
                     f"({c['renamed']} renamed, read {byte_size(c['hashed_bytes'])} to fingerprint)")
        return line


def byte_size(n: float) -> str:
    """n bytes in the largest unit that keeps it at or above 1 (up to GiB): 3.2 MiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class RunContext:
    """What every step of a run works with."""

    conn: sqlite3.Connection
    config: Config
    run: runs.Run
    progress: Progress


def run_index(config: Config, *, progress: Progress = no_progress, embedder_factory: Callable[..., Any] | None = None,
              wait_for_lock: bool = False) -> Summary:
    """Bring the working database up to date with the inputs and export the index.

    embedder_factory: builds the model (embed.Embedder by default). wait_for_lock: when
    another run holds the database, wait for it instead of raising LockedError."""
    started = time.monotonic()
    if config.engine == "ray":
        from .ray_engine import require_ray

        require_ray()  # before any work
    elif config.backend == "openvino":
        from .openvino_vision import check_choice

        check_choice(config.device)  # before any work
    with RunLock(config.state_db_path, wait=wait_for_lock), _database(config.state_db_path) as conn:
        ctx = _start(conn, config, progress)
        with _recorded(ctx):
            _import_source_index(ctx)
            _scan(ctx)
            _embed(ctx, embedder_factory)
            _export(ctx)
        counts = runs.run_counts(conn, ctx.run.id)
    return Summary(ctx.run.id, ctx.run.mode, ctx.run.resumed, counts, time.monotonic() - started,
                   config.output_path, config.state_db_path)


@contextlib.contextmanager
def _database(path: Path) -> Iterator[sqlite3.Connection]:
    conn = db.connect(path)
    try:
        yield conn
    except sqlite3.Error as e:
        # A full disk or an I/O error under the database: SQLite has rolled the
        # transaction back, what was committed before stays, the next run resumes.
        raise DatabaseError(f"cannot update working database {path}: {e}") from e
    finally:
        conn.close()


def _start(conn: sqlite3.Connection, config: Config, progress: Progress) -> RunContext:
    runs.mark_unfinished_runs(conn)
    mode = "reindex" if config.reindex else "full"
    run = runs.start_run(conn, mode=mode, model=config.model_name, config=config.to_json(), pid=os.getpid())
    if run.resumed:
        log.info("resuming the interrupted full build (run %d keeps what it committed)", run.build)
    return RunContext(conn, config, run, progress)


@contextlib.contextmanager
def _recorded(ctx: RunContext) -> Iterator[None]:
    """Record how the run ended: completed, interrupted (raised as Interrupted) or failed."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as e:
        stop = e if isinstance(e, Interrupted) else signals.interrupted(e)
        _record_end(ctx, status="interrupted", error=str(stop))
        if stop is e:
            raise
        raise stop from None
    except BaseException as e:
        _record_end(ctx, status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    runs.finish_run(ctx.conn, ctx.run.id, status="completed")


def _record_end(ctx: RunContext, *, status: str, error: str) -> None:
    """Record the end, if the database can still be written: when it cannot (the disk is
    full), the row stays 'running' and the next run marks it interrupted."""
    conn = ctx.conn
    # A signal can land between a BEGIN and its try (or in a ROLLBACK): close the
    # transaction left open so that the run's status can still be written.
    db.rollback_open(conn)
    try:
        runs.finish_run(conn, ctx.run.id, status=status, error=error)
    except sqlite3.Error as e:
        # Said, not hidden: a row left 'running' is what a user reading the runs table sees.
        log.warning("could not record the end of run %d (%s); the next run records it as interrupted",
                    ctx.run.id, e)


# -- the steps -------------------------------------------------------------------------
def _import_source_index(ctx: RunContext) -> None:
    config = ctx.config
    if not config.reindex:
        if config.source_index:
            log.warning("--source-index %s is ignored without --reindex (a full build embeds every image)",
                        config.source_index)
        return
    source = config.source_index_path
    if not source.is_file():
        log.debug("no source index at %s", source)
        return
    from . import export

    ours = export.last_export_of(ctx.conn, source)
    if ours is not None:
        # Our own export, unchanged since we wrote it: its vectors are all in the database
        # already, and if it was written with another model they are that model's vectors,
        # which must not be adopted under this model's name.
        if ours.model == config.model_name:
            log.debug("source index %s is our last export; nothing to import", source)
        else:
            log.info("source index %s holds vectors of model %s; every file is embedded with %s",
                     source, ours.model, config.model_name)
        return
    from .source_index import matching_records

    log.info("importing vectors from %s", source)
    records = matching_records(source, expected_dim=state.stored_dim(ctx.conn, config.model_name))
    n = state.import_vectors(ctx.conn, records, ctx.run)
    log.info("kept %d vectors from %s for files that did not change", n, source)


def _scan(ctx: RunContext) -> None:
    config = ctx.config
    scanner = Scanner([str(p) for p in config.input_paths], include_hidden=config.include_hidden,
                      follow_symlinks=config.follow_symlinks, exclude=config.exclude)
    # Phase lines at DEBUG mark where a run is (the kill-point tests time their signals by them).
    log.debug("scanning %s", ", ".join(map(str, config.input_paths)))
    scan = state.Scan(ctx.conn, ctx.run)
    with ctx.progress("scanning", None) as tick, _gc_paused():
        for batch in scanner.batches(state.SCAN_BATCH):
            scan.record(batch)
            tick(len(batch))
    scan.finish(keep_under=scanner.unreadable)
    log.debug("scan committed")
    if config.reindex:
        # Before the rows of files gone are deleted: a moved file finds its vector there.
        _reuse(ctx)
    deleted = scan.sweep()
    if deleted:
        log.info("removed %d files that are gone from disk", deleted)


def _reuse(ctx: RunContext) -> None:
    from .reuse import reuse_known

    done = reuse_known(ctx.conn, ctx.run, progress=ctx.progress)
    if done.total:
        log.info("kept the vectors of %d files whose content is indexed already (%d renamed, %d found by "
                 "fingerprint)", done.total, done.renamed, done.by_content)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # The walk makes a few tuples per file and keeps none past its batch: the cyclic
    # collector would run every 700 of them and go through every object the process holds.
    # Reference counting frees them all the same.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _embed(ctx: RunContext, embedder_factory: Callable[..., Any] | None) -> None:
    conn, config = ctx.conn, ctx.config
    total = state.count_pending(conn)
    if not total:
        return
    embedder = _prepared_embedder(config, embedder_factory)
    stale = state.requeue_other_dims(conn, config.model_name, embedder.dim)
    if stale:
        log.warning("%d vectors stored for %s are not %d-d (imported from another model's index?); "
                    "embedding those files again", stale, config.model_name, embedder.dim)
        total = state.count_pending(conn)
    log.debug("embedding %d images", total)
    from .decode import DecodeOptions

    options = DecodeOptions(patch_size=embedder.patch_size, max_num_patches=embedder.max_num_patches,
                            max_image_pixels=config.max_image_pixels)
    engine = _engine(config)
    clock = _Clock()
    batches = engine.embed(config, options, state.iter_pending(conn), embedder, started=clock.start)
    embedded = failed = 0
    # The engine only computes: every result is checked and committed here, batch by batch.
    with contextlib.closing(batches), ctx.progress("embedding", total) as tick:
        for results in batches:
            for result in results:
                _recheck(result)
            state.store_results(conn, results, ctx.run, model=config.model_name, dim=embedder.dim)
            embedded += sum(r.vector is not None for r in results)
            failed += sum(r.error is not None for r in results)
            tick(len(results))
    clock.report(embedded, engine.describe(config))
    if failed:
        log.warning("%d files could not be read; see: sqlite3 %s \"SELECT path, error FROM files WHERE status = 'failed'\"",
                    failed, config.state_db_path)


def _prepared_embedder(config: Config, embedder_factory: Callable[..., Any] | None) -> Any:
    if embedder_factory is None:
        from .embed import Embedder as embedder_factory  # noqa: N813 - deferred, as all model code is
    if config.engine == "ray":
        # The model runs on the cluster's actors (and the backend is checked there, on
        # their devices): here it only gives the input geometry and the vector size,
        # whatever GPU this machine lacks.
        embedder = embedder_factory(config.model_name, device="cpu", dtype=config.dtype, backend="torch")
        return getattr(embedder, "prepare_geometry", embedder.prepare)()
    return embedder_factory(config.model_name, device=config.device, dtype=config.dtype,
                            backend=config.backend).prepare()


def _engine(config: Config) -> Any:
    """The module that embeds: local_engine or ray_engine, each with embed() and describe()."""
    if config.engine == "ray":
        from . import ray_engine

        return ray_engine
    from . import local_engine

    return local_engine


class _Clock:
    """When the embedding started, for the images/s line: set once by the engine, when its
    model is ready (local) or its job starts (Ray)."""

    started: float | None = None

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def report(self, embedded: int, how: str) -> None:
        if self.started is not None:
            seconds = time.perf_counter() - self.started
            log.info("embedded %d images in %.2f s (%.1f images/s, %s)",
                     embedded, seconds, embedded / seconds if seconds else 0.0, how)


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


def _export(ctx: RunContext) -> None:
    from . import export

    config = ctx.config
    done = export.export_index(ctx.conn, model=config.model_name, out=config.output_path,
                               fmt=config.resolved_output_format, progress=ctx.progress,
                               last=runs.export_mark(ctx.conn), lines=export.line_map_path(config.state_db_path))
    with db.transaction(ctx.conn):
        runs.add_counts(ctx.conn, ctx.run.id, exported=done.count)
    if done.written:
        runs.set_export_mark(ctx.conn, done.mark)
