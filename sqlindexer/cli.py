"""The image-indexer command line: the group, `index` (its default command) and `export`.

The CLI modules (this one, cli_query.py, cli_common.py) are the only ones that print or
draw progress bars. Core errors (IndexerError) become one-line messages with a non-zero exit
status here.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__, cli_query, signals
from . import config as cfg
from .cli_common import db_option, model_option, open_readonly, setup_logging, tqdm_progress
from .cli_options import field_option, index_options
from .errors import IndexerError, Interrupted

_INPUT_FLAGS = (cfg.FIELDS_BY_NAME["input_dirs"].short, cfg.FIELDS_BY_NAME["input_dirs"].flag)


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
    setup_logging(options.get("log_level"))
    try:
        yaml_values = cfg.read_yaml(config_file) if config_file else None
        config = cfg.build(yaml_values, options, source=f"config file {config_file}")
    except IndexerError as e:
        raise click.ClickException(str(e)) from None
    setup_logging(config.log_level)

    from .run import run_index

    try:
        with signals.as_interrupts():
            try:
                summary = run_index(config, progress=tqdm_progress, wait_for_lock=wait)
            except KeyboardInterrupt as e:
                # A signal outside the part of the run that records it (taking the lock,
                # opening the database, or a second signal while the first was recorded).
                raise signals.interrupted(e) from None
    except Interrupted as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(128 + e.signum)
    except IndexerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary.line(), err=True)


@cli.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@db_option
@click.option("-o", "--output-file", required=True, metavar="FILE", help="Index file to write (jsonl or pkl).")
@field_option("output_format")
@model_option
def export_command(db_path: str, output_file: str, output_format: str | None, model_name: str | None) -> None:
    """Write the index file from the working database alone: no scan, no model.

    The file is written as the index command writes it (to FILE.tmp, then renamed
    over FILE), with the vectors of one model in path order.

    \b
    Examples:
      image-indexer export --db image_index.sqlite -o image_index.pkl
    """
    import time

    from . import export, runs
    from .vectors import choose_model

    setup_logging("WARNING")
    started = time.monotonic()
    try:
        out = export.check_target(output_file, db_path)
        fmt = cfg.Config(output_file=output_file, output_format=output_format).resolved_output_format
        conn = open_readonly(db_path)
        model = choose_model(conn, model_name, where=str(cfg.absolute(db_path)))
        done = export.export_index(conn, model=model.model, out=out, fmt=fmt, progress=tqdm_progress,
                                   last=runs.export_mark(conn))
    except IndexerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {done.count} images ({model.model}) to {out} in {time.monotonic() - started:.1f} s",
               err=True)


for _command in (cli_query.search, cli_query.similar, cli_query.duplicates, cli_query.status):
    cli.add_command(_command)
