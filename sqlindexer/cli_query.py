"""The query commands: search, similar, duplicates and status. They read the working
database only, opened read-only: never created, never migrated."""

from __future__ import annotations

from typing import Any

import click

from .cli_common import (db_option, echo_table, model_option, output_option, setup_logging, tqdm_progress,
                         wants_json, with_db)

_HELP = {"help_option_names": ["-h", "--help"]}


def _top_option(f: Any) -> Any:
    return click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
                        help="How many images to list.")(f)


def _exact_option(f: Any) -> Any:
    return click.option("--exact", "--exhaustive", "exact", is_flag=True,
                        help="Compare the query with every image, not only the approximate index's candidates "
                             "(which it uses from 50,000 images on).")(f)


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


_ORIGIN = {"cache": "from the cache", "built": "cached now", "memory": "read from the database (not cached)"}


def _echo_hits(results: Any, as_json: bool) -> None:
    import json

    if wants_json(as_json):
        for hit in results.hits:
            click.echo(json.dumps({"rank": hit.rank, "score": round(hit.score, 6), "path": hit.path},
                                  ensure_ascii=False))
    elif results.hits:
        echo_table(["rank", "score", "path"], [[str(h.rank), f"{h.score:.4f}", h.path] for h in results.hits],
                    right=(0, 1))
    click.echo(f"{len(results.hits)} of {results.considered} images, model {results.model}, "
               f"vectors {_ORIGIN[results.origin]}, ranked in {results.query_seconds:.3f} s", err=True)


@click.command(context_settings=_HELP)
@click.argument("query")
@_top_option
@db_option
@model_option
@_filter_options
@_exact_option
@output_option
def search(query: str, top: int, db_path: str, model_name: str | None, as_json: bool | None, exact: bool,
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

    setup_logging("WARNING")
    results = with_db(db_path, lambda conn: search_text(conn, db_path, query, top=top, model_name=model_name,
                                                          filters=Filters.build(**filters), progress=tqdm_progress,
                                                          exact=exact))
    _echo_hits(results, as_json)


@click.command(context_settings=_HELP)
@click.argument("image", metavar="IMAGE_OR_INDEXED_PATH")
@_top_option
@db_option
@model_option
@_filter_options
@_exact_option
@output_option
def similar(image: str, top: int, db_path: str, model_name: str | None, as_json: bool | None, exact: bool,
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

    setup_logging("WARNING")
    results = with_db(db_path, lambda conn: search_image(conn, db_path, image, top=top, model_name=model_name,
                                                           filters=Filters.build(**filters), progress=tqdm_progress,
                                                           exact=exact))
    _echo_hits(results, as_json)


@click.command(context_settings=_HELP)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Cosine at or above which two images count as the same.")
@click.option("--exhaustive", is_flag=True,
              help="Compare every pair of images, not only the candidate pairs of the approximate index "
                   "(which it uses from 10,000 images on).")
@db_option
@model_option
@output_option
def duplicates(threshold: float, exhaustive: bool, db_path: str, model_name: str | None,
               as_json: bool | None) -> None:
    """List groups of near-identical images (resized, re-encoded or lightly edited
    copies), largest group first.

    A group is a connected component of the pairs whose cosine is at least the
    threshold. Each image is listed with its cosine to the group's first image.
    From 10,000 images on, only the pairs that share a cell of the approximate index
    are compared (time about linear in the number of images; a near copy is almost
    always among them); --exhaustive compares every pair (quadratic).

    \b
    Examples:
      image-indexer duplicates --db image_index.sqlite
      image-indexer duplicates --threshold 0.9 --json
    """
    import json

    from .duplicates import find_duplicates

    setup_logging("WARNING")
    model, compared, groups = with_db(db_path, lambda conn: find_duplicates(
        conn, db_path, threshold=threshold, model_name=model_name, progress=tqdm_progress, exhaustive=exhaustive))
    if wants_json(as_json):
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


@click.command(context_settings=_HELP)
@db_option
@output_option
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

    from .status import database_status

    setup_logging("WARNING")
    info = with_db(db_path, lambda conn: database_status(conn, db_path))
    if wants_json(as_json):
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
    echo_table(header, rows, right=(0, 4, 5, 6, 7, 8, 9, 10, 11), indent="  ")


_FAILED_SHOWN = 10


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
