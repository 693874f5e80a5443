"""The image-indexer command line: parse options, call the core, report.

The only module that prints or draws progress bars. Core errors (IndexerError) become
one-line messages with a non-zero exit status here.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from . import __version__
from . import config as cfg
from .cli_options import index_options
from .errors import IndexerError, Interrupted

T = TypeVar("T")

_INPUT_FLAGS = ("-i", "--input-dirs")


class DefaultGroup(click.Group):
    """A group whose default command is `index`, so that the original tool's
    `image-indexer -i DIR -o FILE` and `image-indexer -c config.yaml` work unchanged."""

    default_command = "index"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # `image-indexer --help` shows the options of the default command, as the
        # original tool did, followed by the other commands.
        index = self.commands[self.default_command]
        with click.Context(index, info_name=ctx.info_name, parent=None) as sub:
            index.format_help(sub, formatter)
        self.format_commands(ctx, formatter)


class IndexCommand(click.Command):
    """Accepts `-i A B C` as well as `-i A -i B` for the input directories."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A value directly after -i belongs to it; bare words after that are more dirs.
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in _INPUT_FLAGS and i + 1 < len(args):
                out += [arg, args[i + 1]]
                i += 2
                while i < len(args) and not args[i].startswith("-"):
                    out += ["-i", args[i]]
                    i += 1
                continue
            out.append(arg)
            i += 1
        return super().parse_args(ctx, out)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="image-indexer")
def cli() -> None:
    """Index folders of photos as SigLIP 2 vectors, with a SQLite working database."""


def _choice(values: tuple[str, ...]) -> click.Choice:
    return click.Choice(values, case_sensitive=False)


@cli.command(cls=IndexCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config-file", type=click.Path(dir_okay=False), help="YAML configuration file.")
@index_options
@click.option("--wait", is_flag=True, help="If another run holds the working database, wait for it to finish "
              "instead of stopping at once.")
def index(config_file: str | None, wait: bool, **options: Any) -> None:
    """Embed every image under the input directories and write the index.

    Without --reindex every image is embedded anew, except that a run that was
    interrupted resumes from what it had committed. With --reindex only new and
    modified files are embedded.

    \b
    Examples:
      image-indexer -i ~/Pictures -o index.jsonl
      image-indexer -i photos more_photos -o index.pkl --reindex
      image-indexer -c config.yaml --reindex
    """
    # Only what was typed on the command line overrides the YAML file; the defaults
    # above are for --help and are applied by config.build() like any other default.
    ctx = click.get_current_context()
    options = {
        k: v for k, v in options.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
    }
    _setup_logging(options.get("log_level"))
    try:
        yaml_values = cfg.read_yaml(config_file) if config_file else None
        config = cfg.build(yaml_values, options, source=f"config file {config_file}")
    except IndexerError as e:
        raise click.ClickException(str(e)) from None
    _setup_logging(config.log_level)

    from .indexer import run_index

    try:
        with _signals_as_interrupts():
            summary = run_index(config, progress=_tqdm_progress, wait_for_lock=wait)
    except Interrupted as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        # A signal outside the part of the run that records it (taking the lock, opening
        # the database, or a second signal while the first was being recorded).
        signum = getattr(e, "signum", signal.SIGINT)
        click.echo(f"Error: {Interrupted(signum, signal.Signals(signum).name)}", err=True)
        sys.exit(128 + signum)
    except IndexerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary.line(), err=True)


# -- reporting helpers -----------------------------------------------------------------
class _TqdmHandler(logging.Handler):
    """Log lines that do not tear through an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm = sys.modules.get("tqdm")
            if tqdm is None:  # no bar was ever shown: nothing to write around
                sys.stderr.write(self.format(record) + "\n")
            else:
                tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _setup_logging(level: str | None) -> None:
    root = logging.getLogger("sqlindexer")
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel((level or "INFO").upper())
    for noisy in ("transformers", "huggingface_hub", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextlib.contextmanager
def _tqdm_progress(desc: str, total: int | None) -> Iterator[Any]:
    # No bar when stderr is not a terminal (logs, CI, pipes): then tqdm is not even
    # imported, which is a tenth of a no-change re-index's own time.
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    unit = "img" if desc != "scanning" else "file"
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


class SignalInterrupt(KeyboardInterrupt):
    """What the handler raises: a BaseException like KeyboardInterrupt, so that code which
    catches Exception (a decoder turning any error into "this file failed", a model loader
    mapping errors to ModelLoadError) lets it through instead of swallowing the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM become SignalInterrupt, which run_index records as an
    interrupted run and turns into Interrupted; the process exits with 128 + signal number
    after a one-line message."""

    def handler(signum: int, frame: Any) -> None:
        raise SignalInterrupt(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some test runners)
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- query commands: search, similar, duplicates, status, export ----------------------
# They read the working database only, opened read-only: never created, never migrated.
def _db_option(f: Any) -> Any:
    return click.option("--db", "db_path", envvar="SQLINDEXER_DB", show_envvar=True, required=True, metavar="FILE",
                        help="Working SQLite database (the index command's --state-db).")(f)


def _model_option(f: Any) -> Any:
    return click.option("--model-name", metavar="NAME", show_default="the model of the database's vectors",
                        help="Use the vectors of this model (required when the database holds several).")(f)


def _output_option(f: Any) -> Any:
    return click.option("--json/--table", "as_json", default=None,
                        help="JSON lines or a table  [default: a table on a terminal, else JSON lines]")(f)


def _top_option(f: Any) -> Any:
    return click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
                        help="How many images to list.")(f)


class _DateParam(click.ParamType):
    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .search import parse_date

        try:
            parse_date(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return value


def _filter_options(f: Any) -> Any:
    options = [
        click.option("--path-prefix", "path_prefixes", multiple=True, metavar="PATH",
                     help="Only images whose path starts with PATH (an existing folder: only images inside it). "
                          "Repeat for several."),
        click.option("--after", type=_DateParam(), metavar="DATE",
                     help="Only images taken at or after DATE: YYYY, YYYY-MM, YYYY-MM-DD or 'YYYY-MM-DD HH:MM', "
                          "local time. Taken is EXIF DateTimeOriginal, else the file's modification time."),
        click.option("--before", type=_DateParam(), metavar="DATE", help="Only images taken before DATE."),
        click.option("--camera", "cameras", multiple=True, metavar="TEXT",
                     help="Only images whose EXIF camera model contains TEXT (any case). Repeat for several."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _wants_json(as_json: bool | None) -> bool:
    return as_json if as_json is not None else not sys.stdout.isatty()


def _with_db(db_path: str, work: Callable[[Any], T]) -> T:
    """Open the working database and run work(conn) on it; core errors become one line."""
    try:
        return work(_open_db(db_path))
    except IndexerError as e:
        raise click.ClickException(str(e)) from None


def _open_db(db_path: str):
    from .search import open_database

    conn = open_database(db_path)
    click.get_current_context().call_on_close(conn.close)
    return conn


def _echo_table(header: list[str], rows: list[list[str]], *, right: tuple[int, ...] = (), indent: str = "") -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        out = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(out)).rstrip()

    click.echo(line(header))
    for row in rows:
        click.echo(line(row))


_ORIGIN = {"cache": "from the cache", "built": "cached now", "memory": "read from the database (not cached)"}


def _echo_hits(results: Any, as_json: bool) -> None:
    import json

    if _wants_json(as_json):
        for hit in results.hits:
            click.echo(json.dumps({"rank": hit.rank, "score": round(hit.score, 6), "path": hit.path},
                                  ensure_ascii=False))
    elif results.hits:
        _echo_table(["rank", "score", "path"], [[str(h.rank), f"{h.score:.4f}", h.path] for h in results.hits],
                    right=(0, 1))
    click.echo(f"{len(results.hits)} of {results.considered} images, model {results.model}, "
               f"vectors {_ORIGIN[results.origin]}, ranked in {results.query_seconds:.3f} s", err=True)


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("query")
@_top_option
@_db_option
@_model_option
@_filter_options
@_output_option
def search(query: str, top: int, db_path: str, model_name: str | None, as_json: bool | None,
           **filters: Any) -> None:
    """Find the indexed images that best match a text (SigLIP 2's text tower).

    Prints rank, cosine score and path, best first.

    \b
    Examples:
      image-indexer search "a red car at night" --db image_index.sqlite
      image-indexer search "birthday cake" --after 2023-06 --camera pixel --top 5
      SQLINDEXER_DB=image_index.sqlite image-indexer search "snow" --json
    """
    from .search import Filters, search_text

    _setup_logging("WARNING")
    results = _with_db(db_path, lambda conn: search_text(conn, db_path, query, top=top, model_name=model_name,
                                                          filters=Filters.build(**filters), progress=_tqdm_progress))
    _echo_hits(results, as_json)


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image", metavar="IMAGE_OR_INDEXED_PATH")
@_top_option
@_db_option
@_model_option
@_filter_options
@_output_option
def similar(image: str, top: int, db_path: str, model_name: str | None, as_json: bool | None,
            **filters: Any) -> None:
    """Find the indexed images most like an image.

    An indexed image is looked up by its path and its stored vector used (it comes
    first, with a score of 1); any other image file is embedded now, as the index
    command would.

    \b
    Examples:
      image-indexer similar ~/Pictures/2023/IMG_0042.jpg --db image_index.sqlite
      image-indexer similar ~/Downloads/sunset.png --top 5 --path-prefix ~/Pictures/2023
    """
    from .search import Filters, search_image

    _setup_logging("WARNING")
    results = _with_db(db_path, lambda conn: search_image(conn, db_path, image, top=top, model_name=model_name,
                                                           filters=Filters.build(**filters), progress=_tqdm_progress))
    _echo_hits(results, as_json)


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Cosine at or above which two images count as the same.")
@_db_option
@_model_option
@_output_option
def duplicates(threshold: float, db_path: str, model_name: str | None, as_json: bool | None) -> None:
    """List groups of near-identical images (resized, re-encoded or lightly edited
    copies), largest group first.

    A group is a connected component of the pairs whose cosine is at least the
    threshold. Each image is listed with its cosine to the group's first image.
    Comparing every pair takes time quadratic in the number of images.

    \b
    Examples:
      image-indexer duplicates --db image_index.sqlite
      image-indexer duplicates --threshold 0.9 --json
    """
    import json

    from .search import find_duplicates

    _setup_logging("WARNING")
    model, compared, groups = _with_db(db_path, lambda conn: find_duplicates(
        conn, db_path, threshold=threshold, model_name=model_name, progress=_tqdm_progress))
    if _wants_json(as_json):
        for number, group in enumerate(groups, start=1):
            images = [{"path": path, "score": round(score, 6)} for path, score in group.members]
            click.echo(json.dumps({"group": number, "size": len(images), "images": images}, ensure_ascii=False))
    else:
        for number, group in enumerate(groups, start=1):
            click.echo(f"group {number}: {len(group.members)} images")
            for path, score in group.members:
                click.echo(f"  {score:.4f}  {path}")
    in_groups = sum(len(g.members) for g in groups)
    click.echo(f"{len(groups)} group{'' if len(groups) == 1 else 's'} of near-duplicates ({in_groups} images) "
               f"among {compared} images, model {model}, cosine >= {threshold}", err=True)


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@_db_option
@_output_option
def status(db_path: str, as_json: bool | None) -> None:
    """Show what the working database holds: images per state, why files failed, the
    models of the vectors, the last runs. It counts on indexes and reads no vector
    (under half a second for a million images).

    \b
    Examples:
      image-indexer status --db image_index.sqlite
      image-indexer status --db image_index.sqlite --json | jq .images
    """
    import json

    from .search import database_status

    _setup_logging("WARNING")
    info = _with_db(db_path, lambda conn: database_status(conn, db_path))
    if _wants_json(as_json):
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    images = info["images"]
    click.echo(f"database  {info['database']} ({_size(info['size_bytes'])}, schema {info['schema_version']})")
    click.echo(f"images    {images['total']}: {images['ok']} ok, {images['failed']} failed, "
               f"{images['pending']} pending")
    shown = info["failed"][:_FAILED_SHOWN]
    for i, reason in enumerate(shown):
        click.echo(f"{'failed' if i == 0 else '':8}  {reason['files']:>6}  {reason['error']}")
    if len(info["failed"]) > len(shown):
        rest = info["failed"][len(shown):]
        click.echo(f"{'':8}  {sum(r['files'] for r in rest):>6}  ({len(rest)} other reasons)")
    if not info["models"]:
        click.echo("vectors   none")
    for i, m in enumerate(info["models"]):
        click.echo(f"{'vectors' if i == 0 else '':8}  {m['vectors']} x {m['dim']}-d  {m['model']}")
    if not info["runs"]:
        click.echo("runs      none")
        return
    click.echo("runs")
    header = ["id", "mode", "status", "started (UTC)", "took", "scanned", "new", "modified", "deleted",
              "embedded", "failed", "exported"]
    rows = []
    for run in info["runs"]:
        took = "-" if run["seconds"] is None else f"{run['seconds']:.0f} s"
        rows.append([str(run["id"]), run["mode"], run["status"], run["started_at"].replace("T", " ")[:19], took,
                     *(str(run[k]) for k in ("scanned", "new", "modified", "deleted", "embedded", "failed",
                                             "exported"))])
    _echo_table(header, rows, right=(0, 4, 5, 6, 7, 8, 9, 10, 11), indent="  ")


_FAILED_SHOWN = 10


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@cli.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@_db_option
@click.option("-o", "--output-file", required=True, metavar="FILE", help="Index file to write (jsonl or pkl).")
@click.option("--output-format", type=_choice(cfg.OUTPUT_FORMATS),
              show_default="from the output suffix: .pkl -> pkl, else jsonl", help="Index file format.")
@_model_option
def export_command(db_path: str, output_file: str, output_format: str | None, model_name: str | None) -> None:
    """Write the index file from the working database alone: no scan, no model.

    The file is written as the index command writes it (to FILE.tmp, then renamed
    over FILE), with the vectors of one model in path order.

    \b
    Examples:
      image-indexer export --db image_index.sqlite -o image_index.pkl
    """
    import time

    from . import db, export, state
    from .search import choose_model

    _setup_logging("WARNING")
    out = cfg.absolute(output_file)
    if out.is_dir():
        raise click.ClickException(f"output file {output_file} is a directory")
    if not out.parent.is_dir():
        raise click.ClickException(f"folder of output file {output_file} does not exist")
    database = cfg.absolute(db_path)
    if out in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        raise click.ClickException(f"the output file {output_file} is the working database")
    fmt = cfg.Config(output_file=output_file, output_format=output_format).resolved_output_format
    started = time.monotonic()
    try:
        conn = _open_db(db_path)
        model = choose_model(conn, model_name, where=str(database))
        # One read transaction: the file is one snapshot, whatever a running index commits.
        with db.transaction(conn, immediate=False):
            with _tqdm_progress("exporting", state.count_export_rows(conn, model.model)) as tick:
                n = export.write_index(state.iter_export_rows(conn, model.model), out, fmt, tick=tick)
    except IndexerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {n} images ({model.model}) to {out} in {time.monotonic() - started:.1f} s", err=True)
