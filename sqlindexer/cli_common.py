"""What the commands share: log lines and progress bars on stderr, tables and JSON lines
on stdout, the --db and --model-name options, and opening the database read-only.

The CLI modules are the only ones that print; core errors (IndexerError) become one-line
messages here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from .errors import IndexerError

T = TypeVar("T")


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


def setup_logging(level: str | None) -> None:
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
def tqdm_progress(desc: str, total: int | None) -> Iterator[Any]:
    # No bar when stderr is not a terminal (logs, CI, pipes): then tqdm is not even
    # imported, which is a tenth of a no-change re-index's own time.
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    unit = "img" if desc != "scanning" else "file"
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


# -- the query commands' options and output ------------------------------------------
def db_option(f: Any) -> Any:
    return click.option("--db", "db_path", envvar="SQLINDEXER_DB", show_envvar=True, required=True, metavar="FILE",
                        help="Working SQLite database (the index command's --state-db).")(f)


def model_option(f: Any) -> Any:
    return click.option("--model-name", metavar="NAME", show_default="the model of the database's vectors",
                        help="Use the vectors of this model (required when the database holds several).")(f)


def output_option(f: Any) -> Any:
    return click.option("--json/--table", "as_json", default=None,
                        help="JSON lines or a table  [default: a table on a terminal, else JSON lines]")(f)


def wants_json(as_json: bool | None) -> bool:
    return as_json if as_json is not None else not sys.stdout.isatty()


def with_db(db_path: str, work: Callable[[Any], T]) -> T:
    """Open the working database and run work(conn) on it; core errors become one line."""
    try:
        return work(open_readonly(db_path))
    except IndexerError as e:
        raise click.ClickException(str(e)) from None


def open_readonly(db_path: str):
    from . import db

    conn = db.open_readonly(db_path)
    click.get_current_context().call_on_close(conn.close)
    return conn


def echo_table(header: list[str], rows: list[list[str]], *, right: tuple[int, ...] = (), indent: str = "") -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        out = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(out)).rstrip()

    click.echo(line(header))
    for row in rows:
        click.echo(line(row))
