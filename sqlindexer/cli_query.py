"""The query commands: search, similar, duplicates and status. They read the working
database only, opened read-only: never created, never migrated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import (db_option, echo_table, model_option, output_option, setup_logging, tqdm_progress,
                         wants_json, with_db)
from .errors import IndexerError

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


def _page_options(f: Any) -> Any:
    options = [
        click.option("--html", "html_path", metavar="FILE",
                     help="Also write the results as one self-contained HTML page of thumbnails to FILE "
                          "(written to FILE.tmp, then renamed). Thumbnails are cached beside the database."),
        click.option("--open", "open_page", is_flag=True, help="Open the --html page in the default web browser."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _page_target(html_path: str | None, open_page: bool, db_path: str) -> Path | None:
    """Where the page goes, checked before any query: a page that cannot be written fails
    at once, not after the model has loaded and the thumbnails are made."""
    if html_path is None:
        if open_page:
            raise click.UsageError("--open needs --html FILE, the page to open")
        return None
    from .contact_sheet import check_output

    try:
        return check_output(html_path, db_path)
    except IndexerError as e:
        raise click.ClickException(str(e)) from None


def _report_page(page: Any, open_page: bool) -> None:
    unreadable = f", {page.unreadable} unreadable" if page.unreadable else ""
    made = f"{page.made} made" + ("" if page.cached or not page.made else " (not cached)")
    click.echo(f"wrote {page.path} ({page.images} images{unreadable}, {page.bytes / 1024:.0f} KiB; thumbnails: "
               f"{page.from_cache} from the cache, {made})", err=True)
    if open_page:
        import webbrowser

        if not webbrowser.open(page.path.as_uri()):
            click.echo(f"could not start a web browser; open {page.path} yourself", err=True)


def _hits_page(conn: Any, db_path: str, target: Path, results: Any, title: str, query_image: str | None = None) -> Any:
    from .contact_sheet import results_page

    summary = (f"{len(results.hits)} of {results.considered} images, model {results.model}; "
               "scores are cosines, higher is closer")
    return results_page(conn, db_path, target, results.hits, title=title, summary=summary, query_image=query_image,
                        progress=tqdm_progress)


_ORIGIN = {"cache": "from the cache", "built": "cached now", "memory": "read from the database (not cached)"}


def _answer(db_path: str, as_json: bool | None, html_path: str | None, open_page: bool, title: str,
            query: Callable[[Any], Any], query_image: str | None = None) -> None:
    """What search and similar share: the page's target checked before the query, the
    query's hits echoed, then the page written and reported, then what the query left
    to do (Results.then)."""
    setup_logging("WARNING")
    target = _page_target(html_path, open_page, db_path)

    def work(conn: Any) -> tuple[Any, Any]:
        results = query(conn)
        _echo_hits(results, as_json)
        return results, target and _hits_page(conn, db_path, target, results, title, query_image=query_image)

    results, page = with_db(db_path, work)
    if page:
        _report_page(page, open_page)
    if results.then is not None:  # after the answer: it takes seconds
        try:
            if results.then():
                click.echo("kept the text tower for OpenVINO: later searches skip torch", err=True)
        except KeyboardInterrupt:
            click.echo("interrupted while keeping the text tower for OpenVINO (nothing kept); the hits above "
                       "are complete", err=True)
            raise SystemExit(130) from None


def _echo_hits(results: Any, as_json: bool | None) -> None:
    import json

    if wants_json(as_json):
        for hit in results.hits:
            click.echo(json.dumps({"rank": hit.rank, "score": round(hit.score, 6), "path": hit.path},
                                  ensure_ascii=False))
    elif results.hits:
        echo_table(["rank", "score", "path"], [[str(h.rank), f"{h.score:.4f}", h.path] for h in results.hits],
                    right=(0, 1))
    how = "by the approximate index" if results.approximate else "exhaustively"
    click.echo(f"{len(results.hits)} of {results.considered} images, model {results.model}, "
               f"vectors {_ORIGIN[results.origin]}, ranked {how} in {results.query_seconds:.3f} s", err=True)


@click.command(context_settings=_HELP)
@click.argument("query")
@_top_option
@db_option
@model_option
@_filter_options
@_exact_option
@output_option
@_page_options
def search(query: str, top: int, db_path: str, model_name: str | None, as_json: bool | None, exact: bool,
           html_path: str | None, open_page: bool, **filters: Any) -> None:
    """Find the indexed images that best match a text (SigLIP 2's text tower).

    Prints rank, cosine score and path, best first.

    \b
    Examples:
      image-indexer search "a red car at night" --db image_index.sqlite
      image-indexer search "birthday cake" --after 2023-06 --camera pixel --top 5
      SQLINDEXER_DB=image_index.sqlite image-indexer search "snow" --json
      image-indexer search "a dog on a beach" --html dogs.html --open
    """
    from .search import Filters, search_text

    _answer(db_path, as_json, html_path, open_page, f"Search: {query}",
            lambda conn: search_text(conn, db_path, query, top=top, model_name=model_name,
                                     filters=Filters.build(**filters), progress=tqdm_progress, exact=exact))


@click.command(context_settings=_HELP)
@click.argument("image", metavar="IMAGE_OR_INDEXED_PATH")
@_top_option
@db_option
@model_option
@_filter_options
@_exact_option
@output_option
@_page_options
def similar(image: str, top: int, db_path: str, model_name: str | None, as_json: bool | None, exact: bool,
            html_path: str | None, open_page: bool, **filters: Any) -> None:
    """Find the indexed images most like an image.

    An indexed image is looked up by its path and its stored vector used (it comes
    first, with a score of 1); any other image file is embedded now, as the index
    command would.

    \b
    Examples:
      image-indexer similar ~/Pictures/2023/IMG_0042.jpg --db image_index.sqlite
      image-indexer similar ~/Downloads/sunset.png --top 5 --path-prefix ~/Pictures/2023
      image-indexer similar IMG_0042.jpg --top 50 --html like-0042.html
    """
    import os

    from .search import Filters, search_image

    _answer(db_path, as_json, html_path, open_page, f"Similar to {os.path.basename(os.path.abspath(image))}",
            lambda conn: search_image(conn, db_path, image, top=top, model_name=model_name,
                                      filters=Filters.build(**filters), progress=tqdm_progress, exact=exact),
            query_image=image)


@click.command(context_settings=_HELP)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Cosine at or above which two images count as the same.")
@click.option("--exact", is_flag=True,
              help="Only byte-identical files, from their fingerprints (no vector is read; --threshold and "
                   "--model do not apply).")
@click.option("--exhaustive", is_flag=True,
              help="Compare every pair of images, not only the candidate pairs of the approximate index "
                   "(which it uses from 10,000 images on).")
@db_option
@model_option
@output_option
@_page_options
def duplicates(threshold: float, exact: bool, exhaustive: bool, db_path: str, model_name: str | None,
               as_json: bool | None, html_path: str | None, open_page: bool) -> None:
    """List groups of near-identical images (resized, re-encoded or lightly edited
    copies), largest group first.

    A group is a connected component of the pairs whose cosine is at least the
    threshold. Each image is listed with its cosine to the group's first image.
    From 10,000 images on, only the pairs that share a cell of the approximate index
    are compared (time about linear in the number of images; a near copy is almost
    always among them); --exhaustive compares every pair (quadratic).

    With --exact, groups of files with the same content (the cheap answer to "which
    copies can I delete"), the group whose extra copies take the most bytes first.

    \b
    Examples:
      image-indexer duplicates --db image_index.sqlite
      image-indexer duplicates --threshold 0.9 --json
      image-indexer duplicates --html duplicates.html --open
      image-indexer duplicates --exact --db image_index.sqlite
    """
    if exact:
        _exact_duplicates(db_path, as_json, html_path, open_page)
        return
    from .duplicates import find_duplicates

    setup_logging("WARNING")
    target = _page_target(html_path, open_page, db_path)

    def work(conn: Any) -> Any:
        found = find_duplicates(conn, db_path, threshold=threshold, model_name=model_name,
                                progress=tqdm_progress, exhaustive=exhaustive)
        _echo_groups(found, threshold, as_json)
        return target and _groups_page(conn, db_path, target, found.model, found.compared, found.groups, threshold)

    page = with_db(db_path, work)
    if page:
        _report_page(page, open_page)


def _echo_groups(found: Any, threshold: float, as_json: bool | None) -> None:
    import json

    groups = found.groups
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
    how = "the approximate index's candidate pairs" if found.approximate else "every pair"
    click.echo(f"{len(groups)} group{'' if len(groups) == 1 else 's'} of near-duplicates ({in_groups} images) "
               f"among {found.compared} images, model {found.model}, cosine >= {threshold}, compared {how}",
               err=True)


def _groups_page(conn: Any, db_path: str, target: Path, model: str, compared: int, groups: list[Any],
                 threshold: float) -> Any:
    in_groups = sum(len(g.members) for g in groups)
    summary = (f"{len(groups)} group{'' if len(groups) == 1 else 's'} ({in_groups} images) among {compared} images, "
               f"model {model}, cosine >= {threshold}; the copy of the most pixels is marked")
    return _groups_page_of(conn, db_path, target, groups, summary, title="Near-duplicate images")


def _groups_page_of(conn: Any, db_path: str, target: Path, groups: list[Any], summary: str, *, title: str) -> Any:
    from .contact_sheet import duplicates_page

    return duplicates_page(conn, db_path, target, groups, title=title, summary=summary, progress=tqdm_progress)


def _exact_duplicates(db_path: str, as_json: bool | None, html_path: str | None, open_page: bool) -> None:
    import json

    from .content import exact_duplicates

    setup_logging("WARNING")
    target = _page_target(html_path, open_page, db_path)
    found = with_db(db_path, exact_duplicates)
    for number, group in enumerate(found.groups, start=1):
        if wants_json(as_json):
            click.echo(json.dumps({"group": number, "size": len(group.paths), "bytes": group.size,
                                   "images": [{"path": path} for path in group.paths]}, ensure_ascii=False))
        else:
            click.echo(f"group {number}: {len(group.paths)} identical files of {group.size} bytes")
            for path in group.paths:
                click.echo(f"  {path}")
    files = sum(len(g.paths) for g in found.groups)
    unknown = f"; {found.without} indexed files have no fingerprint yet" if found.without else ""
    click.echo(f"{len(found.groups)} group{'' if len(found.groups) == 1 else 's'} of byte-identical files "
               f"({files} files) among {found.fingerprinted} fingerprinted files{unknown}", err=True)
    if target:
        from .duplicates import Group

        # Byte-identical: every copy has a cosine of 1 to the first.
        groups = [Group([(path, 1.0) for path in g.paths]) for g in found.groups]
        summary = f"{len(groups)} group{'' if len(groups) == 1 else 's'} of byte-identical files ({files} files)"
        page = with_db(db_path, lambda conn: _groups_page_of(conn, db_path, target, groups, summary,
                                                              title="Byte-identical files"))
        _report_page(page, open_page)


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

    from .run import byte_size
    from .status import database_status

    setup_logging("WARNING")
    info = with_db(db_path, lambda conn: database_status(conn, db_path))
    if wants_json(as_json):
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    images = info["images"]
    click.echo(f"database  {info['database']} ({byte_size(info['size_bytes'])}, schema {info['schema_version']})")
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
    # reused: files that took the vector of a row with the same content (moved, copied, touched);
    # hashed: the bytes of the files the run fingerprinted (on a first index, every file decoded).
    header = ["id", "mode", "status", "started (UTC)", "took", "scanned", "new", "modified", "deleted",
              "reused", "hashed", "embedded", "failed", "exported"]
    rows = []
    for run in info["runs"]:
        took = "-" if run["seconds"] is None else f"{run['seconds']:.0f} s"
        rows.append([str(run["id"]), run["mode"], run["status"], run["started_at"].replace("T", " ")[:19], took,
                     *(str(run[k]) for k in ("scanned", "new", "modified", "deleted", "reused")),
                     byte_size(run["hashed_bytes"]),
                     *(str(run[k]) for k in ("embedded", "failed", "exported"))])
    echo_table(header, rows, right=(0, *range(4, len(header))), indent="  ")


_FAILED_SHOWN = 10
