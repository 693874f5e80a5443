"""The image-indexer command line: parse options, call the core, report.

The only module that prints or draws progress bars. Core errors (IndexerError) become
one-line messages with a non-zero exit status here.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click

from . import __version__
from . import config as cfg
from .errors import IndexerError, Interrupted

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
@click.option("-i", "--input-dirs", multiple=True, metavar="DIR...",
              help="Directories to scan recursively; repeat -i or list several after it.")
@click.option("-o", "--output-file", metavar="FILE", help="Index file to write (jsonl or pkl).")
@click.option("--model-name", metavar="NAME", default=cfg.DEFAULT_MODEL, show_default=True,
              help="Hugging Face model id or local folder of a SigLIP 2 checkpoint.")
@click.option("--batch-size", type=int, metavar="N", default=32, show_default=True, help="Images per model batch.")
@click.option("--device", type=_choice(cfg.DEVICES), default="auto", show_default=True,
              help="Where to run the model; auto picks CUDA, then MPS, then CPU.")
@click.option("--output-format", type=_choice(cfg.OUTPUT_FORMATS),
              show_default="from the output suffix: .pkl -> pkl, else jsonl", help="Index file format.")
@click.option("--log-level", type=_choice(cfg.LOG_LEVELS), default="INFO", show_default=True, help="Logging level (to stderr).")
@click.option("--reindex/--no-reindex", default=False, show_default=True,
              help="Only process new or modified files and drop deleted ones; unchanged files keep their vectors.")
@click.option("--source-index", metavar="FILE", show_default="the output file",
              help="Existing index (ours or the original tool's, jsonl or pkl) whose vectors --reindex keeps.")
@click.option("--state-db", metavar="FILE", show_default="output file with suffix .sqlite",
              help="Working SQLite database of file state and vectors.")
@click.option("--include-hidden/--no-include-hidden", default=False, show_default=True,
              help="Also index hidden files and folders (names starting with '.').")
@click.option("--follow-symlinks/--no-follow-symlinks", default=False, show_default=True,
              help="Follow symlinks to directories (loops are detected).")
@click.option("--workers", type=click.IntRange(0, 256), metavar="N", show_default="number of usable CPU cores",
              help="Processes that decode and resize images ahead of the model; 0 decodes in-process.")
@click.option("--dtype", type=_choice(cfg.DTYPES), default="auto", show_default=True,
              help="Model precision; auto is bfloat16 (or float16) on CUDA and float32 elsewhere.")
def index(config_file: str | None, **options: Any) -> None:
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
            summary = run_index(config, progress=_tqdm_progress)
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
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
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
    from tqdm import tqdm

    unit = "img" if desc != "scanning" else "file"
    # disable=None: no bar when stderr is not a terminal (logs, CI, pipes).
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
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
