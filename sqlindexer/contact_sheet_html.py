"""The markup of the results pages: plain HTML and inline CSS, no JavaScript.

Everything that comes from a file or the user (names, folders, paths, EXIF text, the
query) goes through _e(), which escapes &, <, >, " and ': a name cannot end an attribute
or open a tag. A name that is not valid UTF-8 (a query image outside the index) is shown
with U+FFFD for its undecodable bytes; its link keeps the exact bytes, percent-encoded.
"""

from __future__ import annotations

import base64
import html
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .contact_sheet import Tile

# Nothing but this page's own styles and data: URI images may load (no script at all):
# the page works offline, and a name that escaped escaping could still run nothing.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
:root { color-scheme: light dark; --side: %(side)dpx; --line: #8885; --soft: #8881; --keep: #1a7f37; }
* { box-sizing: border-box; }
body { margin: 0 auto; padding: 1rem; max-width: 120rem; font: 15px/1.35 system-ui, sans-serif; }
h1 { font-size: 1.35rem; margin: 0 0 .25rem; overflow-wrap: anywhere; }
h2 { font-size: 1.05rem; margin: 1.25rem 0 .5rem; }
header p { margin: 0; opacity: .8; overflow-wrap: anywhere; }
.grid { list-style: none; margin: 0; padding: 0; display: grid; gap: .75rem;
        grid-template-columns: repeat(auto-fill, minmax(min(var(--side), 100%%), 1fr)); }
.group { border-top: 1px solid var(--line); margin-top: 1rem; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: .4rem; min-width: 0; }
.tile.best { border: 2px solid var(--keep); }
.thumb { display: flex; align-items: center; justify-content: center; height: var(--side);
         background: var(--soft); border-radius: 4px; overflow: hidden; }
.thumb img { display: block; width: 100%%; height: 100%%; object-fit: contain; }
.thumb img.tiny { image-rendering: pixelated; }
.thumb:focus-visible { outline: 3px solid Highlight; outline-offset: 2px; }
.missing { flex-direction: column; gap: .35rem; padding: .5rem; text-align: center; color: #c62828;
           font-weight: 600; text-decoration: none; }
.missing small { font-weight: normal; overflow-wrap: anywhere; }
.caption p { margin: .2rem 0 0; font-size: .85rem; overflow-wrap: anywhere; }
.name { font-weight: 600; }
.facts, .folder { opacity: .8; }
.score { font-variant-numeric: tabular-nums; }
.keep { background: var(--keep); color: #fff; border-radius: 3px; padding: 0 .3rem; font-size: .75rem; }
.empty { font-style: italic; }
@media (max-width: 32rem) { :root { --side: 140px; } body { padding: .5rem; } }
"""


def _e(value: object) -> str:
    text = str(value)
    try:  # a path's undecodable bytes (surrogate escapes) -> U+FFFD, valid UTF-8 to write
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # another lone surrogate
        text = text.encode("utf-8", "replace").decode("utf-8")
    return html.escape(text, quote=True)


def document(title: str, summary: str, body: str, side: int) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS % {'side': side}}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{_e(title)}</h1>\n<p>{_e(summary)}</p>\n</header>\n<main>\n{body}</main>\n"
        "</body>\n</html>\n"
    )


def results_body(tiles: Sequence[Tile], query: Tile | None) -> str:
    parts = []
    if query is not None:
        parts.append("<section aria-labelledby=\"query\">\n<h2 id=\"query\">Query image</h2>\n"
                     f"<ul class=\"grid\">\n{tile(query)}</ul>\n</section>\n")
    parts.append("<section aria-labelledby=\"results\">\n<h2 id=\"results\">Results, best first</h2>\n")
    if tiles:
        parts.append("<ol class=\"grid\">\n" + "".join(tile(t) for t in tiles) + "</ol>\n")
    else:
        parts.append("<p class=\"empty\">No image matched.</p>\n")
    parts.append("</section>\n")
    return "".join(parts)


def duplicates_body(rows: Sequence[Sequence[Tile]], best: Sequence[int | None]) -> str:
    if not rows:
        return "<p class=\"empty\">No near-duplicates at this threshold.</p>\n"
    parts = []
    for number, (row, keep) in enumerate(zip(rows, best), start=1):
        parts.append(f"<section class=\"group\" aria-labelledby=\"g{number}\">\n"
                     f"<h2 id=\"g{number}\">Group {number}: {len(row)} copies</h2>\n<ol class=\"grid\">\n")
        parts.extend(tile(t, best=i == keep, folder=True, cosine=True) for i, t in enumerate(row))
        parts.append("</ol>\n</section>\n")
    return "".join(parts)


def tile(t: Tile, *, best: bool = False, folder: bool = False, cosine: bool = False) -> str:
    """One image: its thumbnail (or a placeholder with the reason), linked to the file,
    and what is known of it."""
    name = os.path.basename(t.path)
    top = []
    if t.rank is not None:
        top.append(f"<span class=\"rank\">#{t.rank}</span>")
    if t.score is not None:
        label = "cosine to the group's first image" if cosine else "cosine to the query"
        top.append(f"<span class=\"score\" title=\"{label}\">{'cosine' if cosine else 'score'} {t.score:.4f}</span>")
    if best:
        top.append("<strong class=\"keep\">highest resolution</strong>")
    lines = [" · ".join(top)] if top else []
    lines.append(f"<span class=\"name\">{_e(name)}</span>")
    lines += [f"<span class=\"facts\">{_e(text)}</span>" for text in _facts(t) if text]
    if folder:
        lines.append(f"<span class=\"folder\">in {_e(os.path.dirname(t.path))}</span>")
    caption = "".join(f"<p>{line}</p>" for line in lines)
    return (f"<li class=\"tile{' best' if best else ''}\">{_thumb(t, name)}"
            f"<div class=\"caption\">{caption}</div></li>\n")


def _thumb(t: Tile, name: str) -> str:
    href, full = _e(Path(t.path).as_uri()), _e(t.path)
    thumb = t.thumbnail
    if thumb.jpeg is None:
        return (f"<a class=\"thumb missing\" href=\"{href}\" title=\"{full}\" role=\"img\" "
                f"aria-label=\"No thumbnail of {_e(name)}: {_e(thumb.error)}\">"
                f"<span>Cannot show this image</span><small>{_e(thumb.error)}</small></a>")
    data = base64.b64encode(thumb.jpeg).decode("ascii")
    # An image of a few pixels is scaled up as blocks, not blurred into one colour.
    tiny = " class=\"tiny\"" if max(thumb.width, thumb.height) < _TINY else ""
    return (f"<a class=\"thumb\" href=\"{href}\" title=\"{full}\"><img{tiny} src=\"data:image/jpeg;base64,{data}\" "
            f"width=\"{thumb.width}\" height=\"{thumb.height}\" alt=\"{_e(name)}\" loading=\"lazy\" "
            "decoding=\"async\"></a>")


def _facts(t: Tile) -> list[str]:
    """Date taken and camera on one line, pixel size and file size on the next."""
    f = t.facts
    when = camera = None
    if f is not None:
        when = _taken(f.taken) or f"modified {time.strftime('%Y-%m-%d %H:%M', time.localtime(f.mtime_ns / 1e9))}"
        camera = _camera(f.make, f.model)
    pixels = f"{t.pixels[0]} × {t.pixels[1]} px" if t.pixels else None
    size = _size(t.size) if t.size is not None else None
    return [" · ".join(x for x in (when, camera) if x), " · ".join(x for x in (pixels, size) if x)]


_TINY = 64
_EXIF_DATE = re.compile(r"^(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2})")


def _taken(text: str | None) -> str | None:
    if not text:
        return None
    m = _EXIF_DATE.match(text)
    if not m or m.group(1) == "0000":
        return None
    return "{}-{}-{} {}:{}".format(*m.groups())


def _camera(make: str | None, model: str | None) -> str | None:
    """'Canon' + 'Canon EOS R5' -> 'Canon EOS R5'; 'NIKON CORPORATION' + 'NIKON D5300' ->
    'NIKON D5300'; 'Apple' + 'iPhone XR' -> 'Apple iPhone XR'."""
    if not model:
        return make
    if not make or model.casefold().startswith(make.split()[0].casefold()):
        return model
    return f"{make} {model}"


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
