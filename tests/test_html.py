"""--html results pages (contact sheets) for search, similar and duplicates: what a page
holds, the flags and their errors, the thumbnail cache beside the database, and the pages
opened in a real browser.

The databases are made by indexing real image files with the session's tiny random SigLIP 2
(`tiny_model`): generated noise photos here, and the shared corpus. The browser is Debian's
`chromium`, driven headless over --remote-debugging-pipe (the DevTools protocol as JSON
messages on file descriptors 3 and 4): each page is copied to another folder, opened from
there, scrolled image by image (the thumbnails load lazily) and its rendered thumbnails
counted (naturalWidth > 0), then screenshotted. Browser tests skip where chromium is absent.

To remake the README's screenshots: SQLINDEXER_SCREENSHOTS=docs pytest tests/test_html.py -k corpus
"""

from __future__ import annotations

import base64
import fcntl
import html.parser
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (REPO, bump_mtime, cli_subprocess, copy_resized, index, json_lines, mounted_tmpfs,
                      one_error_line, run_cli)
from PIL import Image

from sqlindexer import thumbnails as thumbs_mod
from sqlindexer.thumbnails import ThumbnailCache

HOSTILE = [
    "<img src=x onerror=alert(1)>.png",
    "a & b \"double\" 'single' <i>ital 😀 é.jpg",
    "50% off #1 ?x=1&y=2.jpg",  # what a URL would take for its own
]
CANON = "Canon PowerShot S40"


def noise_photo(path: Path, seed: int, size=(120, 90), *, exif=None, **save) -> Path:
    """An 8x8 grid of random colours, scaled up: photos the tiny model tells apart (a
    resized or re-encoded copy stays above cosine 0.99)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif is not None:
        save["exif"] = exif
    im.save(path, **save)
    return path


def camera_exif(model: str, taken: str):
    exif = Image.Exif()
    exif[0x010F] = model.split()[0]  # Make
    exif[0x0110] = model  # Model
    exif.get_ifd(0x8769)[0x9003] = taken  # ExifOffset -> DateTimeOriginal
    return exif


class Page(html.parser.HTMLParser):
    """A written page, parsed: its tiles (thumbnail or placeholder, link, caption lines) in
    document order, and every tag seen inside <main>."""

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.tiles: list[dict] = []
        self.sections: list[list[dict]] = []
        self.main_tags: list[str] = []
        self.text_of = {"title": "", "h1": ""}
        self._in: list[str] = []
        self.raw = path.read_text(encoding="utf-8")
        self.feed(self.raw)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "main" in self._in:
            self.main_tags.append(tag)
        cls = a.get("class", "") or ""
        if tag == "section":
            self.sections.append([])
        if tag == "li" and "tile" in cls:
            self.tiles.append({"best": "best" in cls, "lines": [], "img": None, "href": None, "missing": None})
            self.sections[-1].append(self.tiles[-1])
        if tag == "a" and "thumb" in cls:
            self.tiles[-1]["href"] = a["href"]
            self.tiles[-1]["title"] = a["title"]
            if "missing" in cls:
                self.tiles[-1]["missing"] = a["aria-label"]
        if tag == "img":
            self.tiles[-1]["img"] = a
        if tag == "p" and self.tiles:
            self.tiles[-1]["lines"].append("")
        self._in.append(tag)

    def handle_endtag(self, tag):
        while self._in and self._in.pop() != tag:
            pass

    def handle_data(self, data):
        if not self._in:
            return
        if self._in[-1] in self.text_of:
            self.text_of[self._in[-1]] += data
        elif "p" in self._in and self.tiles and self.tiles[-1]["lines"] and "li" in self._in:
            self.tiles[-1]["lines"][-1] += data

    def names(self) -> list[str]:
        return [t["lines"][1 if t["lines"][0].startswith(("#", "score", "cosine")) else 0] for t in self.tiles]


# -- a library of generated photos, indexed once for the module ------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model) -> dict:
    """photos/p0..p5.jpg (distinct), a smaller PNG and a quality-40 JPEG of p0 and a PNG of
    p1 (two groups of near-duplicates), camera.jpg with EXIF camera and date, and two files
    with hostile names."""
    root = tmp_path_factory.mktemp("html-library")
    photos = root / "photos"
    for seed in range(6):
        noise_photo(photos / f"p{seed}.jpg", seed, quality=95)
    (photos / "copies").mkdir()
    copy_resized(photos / "p0.jpg", photos / "copies" / "p0_small.png", (60, 45))
    copy_resized(photos / "p0.jpg", photos / "copies" / "p0_q40.jpg", (120, 90), quality=40)
    copy_resized(photos / "p1.jpg", photos / "copies" / "p1_copy.png", (120, 90))
    noise_photo(photos / "camera.jpg", 7, exif=camera_exif(CANON, "2003:12:14 12:01:44"))
    for seed, name in enumerate(HOSTILE, start=10):
        noise_photo(photos / name, seed)
    out = root / "index.jsonl"
    index(CliRunner(), photos, out, tiny_model)
    return {"root": root, "photos": photos, "db": root / "index.sqlite",
            "paths": sorted(str(p) for p in photos.rglob("*") if p.is_file())}


def indexed_photos(runner, tmp_path: Path, model: Path, count: int) -> Path:
    """tmp_path/photos holding count noise photos p0.jpg, p1.jpg, ..., indexed into
    tmp_path/index.jsonl (database tmp_path/index.sqlite)."""
    photos = tmp_path / "photos"
    for seed in range(count):
        noise_photo(photos / f"p{seed}.jpg", seed)
    index(runner, photos, tmp_path / "index.jsonl", model)
    return photos


def cache_entries(db: Path) -> list[Path]:
    folder = db.with_name(db.name + ".thumbnails")
    return sorted(folder.iterdir()) if folder.is_dir() else []


# -- what a page holds ---------------------------------------------------------------------
def test_search_page_holds_every_hit_in_rank_order_and_nothing_from_outside(runner, library, tmp_path):
    plain = run_cli(runner, ["search", "a red car", "--db", library["db"], "--top", 100, "--json"])
    page_path = tmp_path / "search.html"
    result = run_cli(runner, ["search", "a red car", "--db", library["db"], "--top", 100, "--json",
                              "--html", page_path])
    assert result.stdout == plain.stdout  # the JSON lines are the same, the page is an addition
    hits = json_lines(result.stdout)
    page = Page(page_path)
    assert len(page.tiles) == len(hits) == len(library["paths"])
    assert [t["title"] for t in page.tiles] == [h["path"] for h in hits]
    assert [t["href"] for t in page.tiles] == [Path(h["path"]).as_uri() for h in hits]
    assert [t["lines"][0] for t in page.tiles] == [f"#{h['rank']} · score {h['score']:.4f}" for h in hits]
    for tile in page.tiles:
        img = tile["img"]
        assert img["src"].startswith("data:image/jpeg;base64,") and img["loading"] == "lazy"
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            assert im.format == "JPEG" and max(im.size) <= thumbs_mod.NORMAL.side
            assert im.size == (int(img["width"]), int(img["height"]))
    assert page.text_of["title"] == "Search: a red car"
    # Self-contained: no script, no stylesheet or font to fetch, no http(s) URL at all.
    for needle in ("<script", "<link", "http:", "https:", "@import", "url("):
        assert needle not in page.raw
    assert "default-src 'none'; img-src data:" in page.raw
    assert f"wrote {page_path} ({len(hits)} images" in result.stderr


def test_tiles_show_date_camera_pixels_and_size(runner, library, tmp_path):
    page_path = tmp_path / "page.html"
    run_cli(runner, ["similar", library["photos"] / "camera.jpg", "--db", library["db"], "--top", 100,
                     "--html", page_path])
    page = Page(page_path)
    query = page.sections[0][0]
    assert query["lines"][0] == "camera.jpg"  # the query tile has no rank or score
    assert query["lines"][1] == f"2003-12-14 12:01 · {CANON}"
    size = (library["photos"] / "camera.jpg").stat().st_size
    assert query["lines"][2] == f"120 × 90 px · {size / 1024:.1f} KiB"
    # A photo without EXIF shows its modification time instead.
    png = next(t for t in page.tiles if t["title"].endswith("p1_copy.png"))
    assert png["lines"][2].startswith("modified ") and png["lines"][3].startswith("120 × 90 px · ")


def test_hostile_names_are_escaped_text(runner, library, tmp_path):
    page_path = tmp_path / "page.html"
    run_cli(runner, ["search", "a cat", "--db", library["db"], "--top", 100, "--html", page_path])
    page = Page(page_path)
    names = page.names()
    for name in HOSTILE:
        assert name in names
        tile = page.tiles[names.index(name)]
        assert tile["img"]["alt"] == name and tile["title"] == str(library["photos"] / name)
    assert "<img src=x" not in page.raw and "<i>ital" not in page.raw
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.raw and "&#x27;single&#x27;" in page.raw
    # Inside <main> only the page's own tags: no <i> from a name, one <img> per tile.
    assert set(page.main_tags) <= {"section", "h2", "ol", "ul", "li", "a", "img", "div", "p", "span", "small",
                                   "strong"}
    assert page.main_tags.count("img") == len(page.tiles)


def test_similar_shows_the_query_image_first(runner, library, tmp_path):
    query = library["photos"] / "p3.jpg"
    page_path = tmp_path / "similar.html"
    result = run_cli(runner, ["similar", query, "--db", library["db"], "--top", 4, "--html", page_path])
    hits = json_lines(result.stdout)
    assert hits[0]["path"] == str(query)
    page = Page(page_path)
    assert [t["title"] for t in page.sections[0]] == [str(query)]
    # The indexed query ranks first with score 1: shown once, as the query.
    assert [t["title"] for t in page.sections[1]] == [h["path"] for h in hits[1:]]
    assert page.text_of["title"] == "Similar to p3.jpg"

    outside = tmp_path / "elsewhere" / "query.jpg"
    outside.parent.mkdir()
    shutil.copy(query, outside)  # not indexed: embedded now, shown from the file
    run_cli(runner, ["similar", outside, "--db", library["db"], "--top", 3, "--html", page_path])
    page = Page(page_path)
    assert [t["title"] for t in page.sections[0]] == [str(outside)]
    assert page.sections[0][0]["img"] is not None
    assert page.sections[0][0]["lines"][1] == f"120 × 90 px · {outside.stat().st_size / 1024:.1f} KiB"
    assert page.sections[1][0]["title"] == str(query)


def test_duplicates_page_has_a_row_per_group_with_the_best_copy_marked(runner, library, tmp_path):
    page_path = tmp_path / "dups.html"
    result = run_cli(runner, ["duplicates", "--db", library["db"], "--json", "--html", page_path])
    groups = json_lines(result.stdout)
    page = Page(page_path)
    assert [[t["title"] for t in section] for section in page.sections] == \
        [[i["path"] for i in g["images"]] for g in groups]
    assert [len(s) for s in page.sections] == [3, 2]  # largest first
    first = {Path(t["title"]).name: t for t in page.sections[0]}
    assert set(first) == {"p0.jpg", "p0_q40.jpg", "p0_small.png"}
    # p0.jpg and p0_q40.jpg have the same pixels; the larger file (quality 95) is marked.
    assert [name for name, t in first.items() if t["best"]] == ["p0.jpg"]
    assert "highest resolution" in first["p0.jpg"]["lines"][0]
    assert first["p0_small.png"]["lines"][0].startswith("cosine 0.9")
    assert first["p0_small.png"]["lines"][3].startswith("60 × 45 px · ")
    assert first["p0_small.png"]["lines"][4] == f"in {library['photos'] / 'copies'}"
    assert sum(t["best"] for s in page.sections for t in s) == 2


def test_unreadable_images_get_a_placeholder_with_the_reason(runner, tmp_path, tiny_model):
    photos = indexed_photos(runner, tmp_path, tiny_model, 3)
    (photos / "p1.jpg").write_bytes(b"no longer a JPEG")
    (photos / "p2.jpg").unlink()
    page_path = tmp_path / "page.html"
    result = run_cli(runner, ["search", "a dog", "--db", tmp_path / "index.sqlite", "--html", page_path])
    assert len(json_lines(result.stdout)) == 3
    assert "(3 images, 2 unreadable" in result.stderr
    tiles = {Path(t["title"]).name: t for t in Page(page_path).tiles}
    assert tiles["p0.jpg"]["img"] is not None and tiles["p0.jpg"]["missing"] is None
    assert tiles["p1.jpg"]["img"] is None and "not an image Pillow can read" in tiles["p1.jpg"]["missing"]
    assert tiles["p2.jpg"]["img"] is None and "the file is gone" in tiles["p2.jpg"]["missing"]
    # What the database knows of a file that is gone is still shown.
    assert tiles["p2.jpg"]["lines"][-1].startswith("120 × 90 px · ")


# -- the thumbnail cache -----------------------------------------------------------------------
def test_thumbnails_are_cached_beside_the_database_and_reused(runner, tmp_path, tiny_model):
    photos = indexed_photos(runner, tmp_path, tiny_model, 3)
    dbp = tmp_path / "index.sqlite"
    args = ["duplicates", "--db", dbp, "--threshold", "0.01", "--html", tmp_path / "page.html"]
    first = run_cli(runner, args)
    assert "thumbnails: 0 from the cache, 3 made)" in first.stderr
    entries = cache_entries(dbp)
    assert len(entries) == 3 and all(e.suffix == ".jpg" for e in entries)
    page = (tmp_path / "page.html").read_bytes()
    second = run_cli(runner, args)
    assert "thumbnails: 3 from the cache, 0 made)" in second.stderr
    assert cache_entries(dbp) == entries
    strip = (lambda b: b.split(b" \xc2\xb7 written ")[0])  # the page's time stamp aside, the same page
    assert strip((tmp_path / "page.html").read_bytes()) == strip(page)

    # New content: a new thumbnail, and the old one's entry removed.
    noise_photo(photos / "p1.jpg", 99)
    bump_mtime(photos / "p1.jpg")
    third = run_cli(runner, args)
    assert "thumbnails: 2 from the cache, 1 made)" in third.stderr
    assert len(cache_entries(dbp)) == 3 and cache_entries(dbp) != entries
    # A broken entry is made again.
    cache_entries(dbp)[0].write_bytes(b"broken")
    assert "thumbnails: 2 from the cache, 1 made)" in run_cli(runner, args).stderr


def test_temporaries_left_by_a_crashed_write_are_removed_once_stale(runner, tmp_path, tiny_model):
    # What a process killed between writing a thumbnail's temporary file and renaming it
    # leaves in the cache: removed by the next page that writes there, unless it is young
    # enough to be a concurrent writer's file in use.
    indexed_photos(runner, tmp_path, tiny_model, 2)
    dbp = tmp_path / "index.sqlite"
    folder = ThumbnailCache.beside(dbp).folder
    folder.mkdir()
    stale = folder / "0123456789abcdef01234567-240q72-0123456789ab.jpg.tmp-4242-deadbeef"
    live = folder / "76543210fedcba9876543210-240q72-ba9876543210.jpg.tmp-4243-cafef00d"
    other = folder / "notes.txt"  # not the cache's own: left alone, however old
    old = time.time() - thumbs_mod.STALE_TEMPORARY - 60
    for path in (stale, live, other):
        path.write_bytes(b"\xff\xd8 half a thumbnail")
    for path in (stale, other):
        os.utime(path, (old, old))
    args = ["duplicates", "--db", dbp, "--threshold", "0.01", "--html", tmp_path / "page.html"]
    assert "thumbnails: 0 from the cache, 2 made)" in run_cli(runner, args).stderr
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert len([p for p in cache_entries(dbp) if p.suffix == ".jpg"]) == 2


def test_thumbnail_is_upright_and_drafted(tmp_path):
    """Made as the indexer decodes: EXIF orientation 6 turns a 120x90 JPEG to 90x120; a
    large JPEG is draft-decoded, yet keeps at least the thumbnail's size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = noise_photo(tmp_path / "turned.jpg", 1, exif=exif)
    thumb = thumbs_mod.make(str(turned))
    assert (thumb.width, thumb.height) == (90, 120) and (thumb.source_width, thumb.source_height) == (90, 120)
    big = noise_photo(tmp_path / "big.jpg", 2, size=(4000, 3000))
    thumb = thumbs_mod.make(str(big), thumbs_mod.Size(200, 70))
    assert (thumb.width, thumb.height) == (200, 150) and (thumb.source_width, thumb.source_height) == (4000, 3000)


def test_cache_that_cannot_be_written_makes_thumbnails_in_memory(runner, library, tmp_path, caplog):
    photos = tmp_path / "photos"
    noise_photo(photos / "p0.jpg", 0)
    blocked = ThumbnailCache(tmp_path / "not-a-folder")
    (tmp_path / "not-a-folder").write_bytes(b"")  # a file where the folder would go
    got = thumbs_mod.thumbnails([str(photos / "p0.jpg")] * 2, blocked)
    assert [t.origin for t in got.values()] == ["memory"]
    assert got[str(photos / "p0.jpg")].jpeg is not None
    assert "making thumbnails in memory" in caplog.text


def _page_from_read_only_mount(tmp_path: Path, db: Path, *, journal: str) -> None:
    with mounted_tmpfs(tmp_path / "ro", "size=16m") as mnt:
        shutil.copy2(db, mnt / "index.sqlite")
        conn = sqlite3.connect(mnt / "index.sqlite")
        conn.execute(f"PRAGMA journal_mode = {journal}")
        conn.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        page_path = tmp_path / "page.html"
        result = cli_subprocess("duplicates", "--db", mnt / "index.sqlite", "--html", page_path)
        assert result.returncode == 0, result.stderr
        assert "making thumbnails in memory" in result.stderr
        assert "5 made (not cached)" in result.stderr
        assert sorted(p.name for p in mnt.iterdir()) == ["index.sqlite"]
        assert len(Page(page_path).tiles) == 5


def test_read_only_database_folder(tmp_path, library):
    """The database on a file system mounted read-only: the query reads it, the page is
    written elsewhere, and nothing is written beside the database."""
    _page_from_read_only_mount(tmp_path, library["db"], journal="DELETE")


def test_read_only_database_folder_wal(tmp_path, library):
    _page_from_read_only_mount(tmp_path, library["db"], journal="WAL")


# -- the flags and their errors ----------------------------------------------------------------
@pytest.mark.parametrize("command", [["search", "a cat"], ["similar", "photos/p0.jpg"], ["duplicates"]])
def test_unwritable_html_path_is_one_line_before_any_query(runner, tmp_path, command):
    # The database does not exist: an error about it would mean the query ran first.
    missing_db = tmp_path / "missing.sqlite"
    (tmp_path / "a-folder").mkdir()
    cases = [
        (tmp_path / "no" / "such" / "page.html", "does not exist"),
        (tmp_path / "a-folder", "is a directory"),
        (missing_db, "is the working database"),
    ]
    for target, expected in cases:
        result = run_cli(runner, [*command, "--db", missing_db, "--html", target], ok=False)
        assert result.exit_code == 1
        line = one_error_line(result)
        assert expected in line and "--html" in line, line
        assert not missing_db.exists()
    result = run_cli(runner, [*command, "--db", missing_db, "--open"], ok=False)
    assert result.exit_code == 2 and "--open needs --html" in result.stderr


def test_html_into_a_read_only_folder_is_refused_before_the_query(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "size=1m") as mnt:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        result = cli_subprocess("duplicates", "--db", tmp_path / "missing.sqlite", "--html", mnt / "page.html")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "not writable" in line and str(mnt / "page.html") in line, line


def test_page_is_written_atomically(runner, library, tmp_path):
    page_path = tmp_path / "page.html"
    page_path.write_text("an old page")
    page_path.chmod(0o600)
    # A symlink planted at the .tmp is replaced, not followed.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "page.html.tmp").symlink_to(victim)
    run_cli(runner, ["duplicates", "--db", library["db"], "--html", page_path])
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "page.html.tmp").exists() and not (tmp_path / "page.html.tmp").is_symlink()
    assert page_path.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert page_path.stat().st_mode & 0o777 == 0o600


def test_open_starts_the_browser_on_the_page(tmp_path, library):
    record = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {record}\n")
    browser.chmod(0o755)
    page_path = tmp_path / "page.html"
    result = subprocess.run([sys.executable, "-m", "sqlindexer", "duplicates", "--db", str(library["db"]),
                             "--html", str(page_path), "--open"], capture_output=True, text=True, timeout=120,
                            check=False, env=dict(os.environ, BROWSER=str(browser), PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert record.read_text() == page_path.as_uri()


# -- in a real browser -------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe: the DevTools protocol, one JSON
    message per NUL-terminated chunk, commands on fd 3 and replies on fd 4."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # The child's ends are copied above fd 9 (so neither is 3 or 4), then bash moves them
        # onto 3 and 4 and runs chromium.
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w)]
        for fd in (to_r, from_w):
            os.close(fd)
        to_r, from_w = child
        moved = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", moved, "chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
             "--hide-scrollbars", "about:blank"],
            pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._out, self._in = to_w, from_r
        self._id, self._buffer = 0, b""
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        # The viewport itself (the window's size includes what headless draws around it).
        self.viewport(width, height)

    def call(self, method: str, *, session: bool = False, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed its pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, path: Path) -> None:
        self.call("Page.navigate", session=True, url=path.as_uri())
        while self._next().get("method") != "Page.loadEventFired":
            pass

    def evaluate(self, script: str):
        result = self.call("Runtime.evaluate", session=True, expression=script, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"]["value"]

    def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, EOFError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


# Scroll each thumbnail into view (they load lazily) and wait for it, then count.
_RENDERED = """(async () => {
  const images = [...document.images];
  for (const img of images) {
    img.scrollIntoView({block: "center"});
    if (!img.complete) {
      await new Promise(done => {
        img.addEventListener("load", done, {once: true});
        img.addEventListener("error", done, {once: true});
        setTimeout(done, 5000);
      });
    }
  }
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  window.scrollTo(0, 0);
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  return {
    images: images.length,
    rendered: images.filter(img => img.complete && img.naturalWidth > 0).length,
    placeholders: document.querySelectorAll(".thumb.missing").length,
    tiles: document.querySelectorAll("li.tile").length,
    names: [...document.querySelectorAll(".name")].map(e => e.textContent),
    tags: [...new Set([...document.querySelectorAll("main *")].map(e => e.localName))].sort(),
    sources: images.filter(img => !img.src.startsWith("data:image/jpeg;base64,")).length,
  };
})()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian package chromium: apt-get install -y chromium)")
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def not_blank(png: bytes) -> None:
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (1280, 900)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour"


def look_at(browser: Chromium, page: Path, elsewhere: Path) -> tuple[dict, bytes]:
    """Open a copy of the page from another folder; (what rendered, a screenshot)."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    copy = elsewhere / page.name
    shutil.copy(page, copy)
    browser.open(copy)
    seen = browser.evaluate(_RENDERED)
    return seen, browser.screenshot()


def test_pages_render_in_a_browser(runner, library, browser, tmp_path):
    pages = {
        "search": ["search", "a red car", "--top", 100],
        "similar": ["similar", library["photos"] / "p2.jpg", "--top", 100],
        "duplicates": ["duplicates"],
    }
    expected = {"search": len(library["paths"]), "similar": len(library["paths"]), "duplicates": 5}
    for kind, args in pages.items():
        page = tmp_path / f"{kind}.html"
        run_cli(runner, [*args, "--db", library["db"], "--html", page])
        seen, png = look_at(browser, page, tmp_path / "moved" / kind)
        assert seen["images"] == seen["rendered"] == seen["tiles"] == expected[kind], seen
        assert seen["placeholders"] == 0 and seen["sources"] == 0
        not_blank(png)
        if kind != "duplicates":
            for name in HOSTILE:  # rendered as text, not as markup
                assert name in seen["names"]
            assert "i" not in seen["tags"] and "script" not in seen["tags"]
            # Each link leads to its own file, whatever the name holds.
            hrefs = browser.evaluate("[...document.querySelectorAll('a.thumb')].map(a => a.href)")
            assert sorted(hrefs) == sorted(Path(p).as_uri() for p in library["paths"])
    # On a phone: two columns, nothing wider than the screen.
    browser.viewport(390, 844, mobile=True)
    try:
        browser.open(tmp_path / "moved" / "search" / "search.html")
        wide, screen, columns = browser.evaluate(
            "[document.documentElement.scrollWidth, innerWidth, "
            "getComputedStyle(document.querySelector('ol.grid')).gridTemplateColumns.split(' ').length]")
    finally:
        browser.viewport(1280, 900)
    assert wide <= screen == 390 and columns == 2


def test_placeholder_renders_as_text_in_a_browser(runner, browser, tmp_path, tiny_model):
    photos = indexed_photos(runner, tmp_path, tiny_model, 2)
    (photos / "p1.jpg").write_bytes(b"broken")
    page = tmp_path / "page.html"
    run_cli(runner, ["search", "x", "--db", tmp_path / "index.sqlite", "--html", page])
    seen, png = look_at(browser, page, tmp_path / "moved")
    assert (seen["images"], seen["rendered"], seen["placeholders"], seen["tiles"]) == (1, 1, 1, 2)
    not_blank(png)


# -- the corpus --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_db(real_corpus_index) -> Path:
    return real_corpus_index[0].with_suffix(".sqlite")


def test_corpus_pages_render_in_a_browser(runner, corpus, corpus_db, browser, tmp_path):
    """Every format of the corpus (HEIC, AVIF, 16-bit PNG and TIFF, CMYK JPEG, animated GIF,
    rotated JPEGs...) as a thumbnail that renders, on each kind of page."""
    shots = os.environ.get("SQLINDEXER_SCREENSHOTS")
    pages = {
        "search": ["search", "a red car at night", "--top", 60],
        "similar": ["similar", corpus / "real" / "sample_datasets" / "skimage" / "astronaut.png", "--top", 30],
        # 0.995: the tiny random model's closest pairs, which are mostly real copies
        # (Pillow's test image 'hopper' in 24 formats and orientations comes first).
        "duplicates": ["duplicates", "--threshold", "0.995"],
    }
    for kind, args in pages.items():
        page = tmp_path / f"{kind}.html"
        result = run_cli(runner, [*args, "--db", corpus_db, "--json", "--html", page])
        listed = len(json_lines(result.stdout)) if kind != "duplicates" else \
            sum(g["size"] for g in json_lines(result.stdout))
        seen, png = look_at(browser, page, tmp_path / "moved" / kind)
        expected = listed  # (similar: the indexed query ranks first, and is shown first, once)
        assert seen["tiles"] == expected and seen["placeholders"] == 0, seen
        assert seen["images"] == seen["rendered"] == expected, seen
        not_blank(png)
        if shots and kind in ("search", "duplicates"):
            Path(shots, f"{kind}-page.png").write_bytes(png)
