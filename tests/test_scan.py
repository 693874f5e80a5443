"""The folder walk (sqlindexer.scan.Scanner) and what the indexer makes of what it could not see."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_photo, read_jsonl, run_cli

from sqlindexer.scan import IMAGE_EXTENSIONS, Scanner, is_image_name, is_under


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def names(root: Path, **options) -> list[str]:
    """Scanned paths relative to root, in scan order."""
    return [os.path.relpath(r.path, root) for r in Scanner([root], **options)]


# -- extensions -------------------------------------------------------------------------
def test_extensions_are_case_insensitive(tmp_path):
    scanned = ["a.JPG", "b.Jpeg", "c.heic", "d.AVIF", "e.hif", "f.mpo", "g.PNG", "h.jpe", "i.webp", "j.HEIF",
               "k.tif", "l.TIFF", "m.bmp", "n.gif"]
    ignored = ["notes.txt", "favicon.ico", "README", "photo.jpg.bak", "raw.CR2", "movie.mp4", "jpg", ".jpg.txt"]
    for name in scanned + ignored:
        touch(tmp_path / name)
    assert names(tmp_path) == sorted(scanned)
    for name in scanned:
        assert is_image_name(name) and is_image_name(name.upper())
    for ext in (".jpg", ".jpeg", ".png", ".heic", ".avif", ".hif", ".mpo"):
        assert ext in IMAGE_EXTENSIONS


def test_records_carry_the_stat(tmp_path):
    p = make_photo(tmp_path / "a.jpg")
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    (rec,) = list(Scanner([tmp_path]))
    st = p.stat()
    assert (rec.path, rec.size, rec.mtime_ns, rec.ctime_ns) == (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert rec.mtime_ns == 1_600_000_000_987_654_321


# -- hidden -----------------------------------------------------------------------------
def test_hidden_files_and_folders(tmp_path):
    root = tmp_path / "photos"
    touch(root / "a.jpg")
    touch(root / ".b.jpg")
    touch(root / ".thumbs" / "c.jpg")
    touch(root / "sub" / ".d.jpg")
    touch(root / "sub" / "e.jpg")
    assert names(root) == ["a.jpg", os.path.join("sub", "e.jpg")]
    assert sorted(names(root, include_hidden=True)) == sorted([
        ".b.jpg", "a.jpg", os.path.join(".thumbs", "c.jpg"), os.path.join("sub", ".d.jpg"),
        os.path.join("sub", "e.jpg"),
    ])


def test_hidden_root_given_explicitly_is_scanned(tmp_path):
    root = tmp_path / ".photos"
    touch(root / "a.jpg")
    assert names(root) == ["a.jpg"]


# -- symlinks ---------------------------------------------------------------------------
def test_directory_symlinks_followed_only_when_asked(tmp_path):
    root, outside = tmp_path / "photos", tmp_path / "outside"
    touch(root / "a.jpg")
    touch(outside / "z.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert names(root) == ["a.jpg"]
    assert names(root, follow_symlinks=True) == ["a.jpg", os.path.join("linked", "z.jpg")]


def test_symlink_loop_terminates(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.jpg")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # sub/up/sub/up/...
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)
    (root / "knot").symlink_to(root / "knot")  # ELOOP on every stat
    # Every folder is listed once; a walk that loops fails here instead of running for ever.
    listed = []
    real_scandir = os.scandir

    def counting_scandir(path):  # a path, or a folder's descriptor
        listed.append(os.stat(path).st_ino)
        assert len(listed) < 50, "the walk loops"
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    assert names(root, follow_symlinks=True) == ["a.jpg", os.path.join("sub", "b.jpg")]
    assert sorted(listed) == sorted([root.stat().st_ino, (root / "sub").stat().st_ino])
    listed.clear()
    assert names(root) == ["a.jpg", os.path.join("sub", "b.jpg")]
    assert sorted(listed) == sorted([root.stat().st_ino, (root / "sub").stat().st_ino])


def test_file_reached_twice_is_yielded_once(tmp_path):
    root = tmp_path / "photos"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.jpg")
    # Overlapping input folders, in either order, and the same folder twice.
    for roots in ([root, root / "sub"], [root / "sub", root], [root, root, tmp_path / "photos" / "." / "sub"]):
        paths = [r.path for r in Scanner(roots)]
        assert paths == [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]
    # A followed symlink to a folder that is walked anyway, and a link to a file.
    (root / "again").symlink_to(root / "sub", target_is_directory=True)
    (root / "b-link.jpg").symlink_to(root / "sub" / "b.jpg")
    paths = [os.path.relpath(r.path, root) for r in Scanner([root], follow_symlinks=True)]
    assert sorted(paths) in (["a.jpg", "b-link.jpg"], ["a.jpg", os.path.join("again", "b.jpg")])
    assert len(paths) == 2


def test_order_is_path_order(tmp_path):
    # The scan hands its files over in the order of the database's path index: the whole
    # walk is sorted as strings, which puts a folder among the files by its name + "/"
    # ("a-b/" before "a/", "a.jpg" before "a/" before "a0.jpg").
    root = tmp_path / "photos"
    # Created in an order unrelated to the names.
    for name in ["m.jpg", "z/9.jpg", "a.jpg", "B.jpg", "z/1.jpg", "c/x.jpg", "c/a/y.jpg", "b.jpg",
                 "a/1.jpg", "a-b/2.jpg", "a0.jpg", "a b/3.jpg", "c/a.jpg", "c/a-/4.jpg"]:
        touch(root / name)
    scanned = names(root)
    assert scanned == sorted(scanned)
    assert scanned == ["B.jpg", "a b/3.jpg", "a-b/2.jpg", "a.jpg", "a/1.jpg", "a0.jpg", "b.jpg",
                       "c/a-/4.jpg", "c/a.jpg", "c/a/y.jpg", "c/x.jpg", "m.jpg", "z/1.jpg", "z/9.jpg"]
    assert names(root) == scanned
    records = list(Scanner([root]))
    for size in (1, 3, 5, 500):
        batches = list(Scanner([root]).batches(size))
        assert [r for batch in batches for r in batch] == records
        assert all(len(batch) == size for batch in batches[:-1]) and 0 < len(batches[-1]) <= size
    # Several roots: in path order, whatever order they were given in.
    other = tmp_path / "a-first"
    touch(other / "o.jpg")
    assert [r.path for r in Scanner([root, other])] == [r.path for r in Scanner([other, root])]
    assert [r.path for r in Scanner([root, other])][0] == str(other / "o.jpg")


# -- unreadable folders -----------------------------------------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


@contextlib.contextmanager
def permissions_enforced() -> Iterator[None]:
    """Make file permissions apply to this thread even when running as root, by dropping
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the effective set (they stay permitted
    and are raised again afterwards). A no-op for ordinary users."""
    if os.geteuid() != 0:
        yield
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        saved = (_CapData * 2)()
        if libc.capget(ctypes.byref(header), saved) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        dropped = (_CapData * 2)(*[_CapData(d.effective, d.permitted, d.inheritable) for d in saved])
        dropped[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
        if libc.capset(ctypes.byref(header), dropped) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    except (OSError, AttributeError) as e:
        pytest.skip(f"running as root and cannot drop the capabilities that bypass permissions: {e}")
    try:
        yield
    finally:
        header = _CapHeader(0x20080522, 0)
        assert libc.capset(ctypes.byref(header), saved) == 0


@contextlib.contextmanager
def unreadable(folder: Path, mode: int = 0) -> Iterator[None]:
    """folder chmod'ed to mode (000: cannot be listed; 644: listed, but nothing in it can
    be stat'ed) for the duration, with permissions really enforced."""
    probe = next(p for p in sorted(folder.iterdir()) if p.is_file())
    folder.chmod(mode)
    try:
        with permissions_enforced():
            # os.access() asks for the real uid and says yes to root regardless; try it.
            try:
                os.stat(probe)
            except PermissionError:
                pass
            else:
                pytest.skip(f"chmod {mode:o} does not make a folder unreadable here")
            yield
    finally:
        folder.chmod(0o755)


def test_unreadable_folder_is_reported(tmp_path):
    root = tmp_path / "photos"
    touch(root / "a.jpg")
    touch(root / "locked" / "b.jpg")
    touch(root / "open" / "c.jpg")
    scanner = Scanner([root])
    with unreadable(root / "locked"):
        paths = [os.path.relpath(r.path, root) for r in scanner]
    assert paths == ["a.jpg", os.path.join("open", "c.jpg")]
    assert scanner.unreadable == [str(root / "locked")]


def test_folder_listable_but_not_searchable_is_reported(tmp_path):
    # chmod 644 on a folder (a common `chmod -R 644` slip): its names can be listed, but
    # no file in it can be stat'ed. Those files were not seen; that is not "deleted".
    root = tmp_path / "photos"
    touch(root / "a.jpg")
    touch(root / "noexec" / "b.jpg")
    touch(root / "noexec" / "c.jpg")
    scanner = Scanner([root])
    with unreadable(root / "noexec", 0o644):
        paths = [os.path.relpath(r.path, root) for r in scanner]
    assert paths == ["a.jpg"]
    assert scanner.unreadable, "files that could not be looked at were silently dropped"
    for name in ("b.jpg", "c.jpg"):
        assert any(is_under(str(root / "noexec" / name), kept) for kept in scanner.unreadable)
    assert not any(is_under(str(root / "a.jpg"), kept) for kept in scanner.unreadable)


def _files(db: Path) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {os.path.relpath(r["path"], db.parent / "photos"): dict(r) for r in conn.execute("SELECT * FROM files")}
    finally:
        conn.close()


@pytest.mark.parametrize("mode", [0o000, 0o644])
def test_reindex_keeps_rows_of_unreadable_folder(runner, tmp_path, tiny_model, mode):
    root = tmp_path / "photos"
    for i, name in enumerate(["a.jpg", "locked/b.jpg", "locked/deep/c.jpg", "open/d.jpg", "open/e.jpg"]):
        make_photo(root / name, seed=i)
    out, db = tmp_path / "index.jsonl", tmp_path / "index.sqlite"
    run_cli(runner, ["-i", root, "-o", out, "--model-name", tiny_model])
    before = _files(db)
    assert len(before) == 5

    (root / "open" / "e.jpg").unlink()  # really deleted: its row must go
    with unreadable(root / "locked", mode):
        result = run_cli(runner, ["-i", root, "-o", out, "--model-name", tiny_model, "--reindex"])
    assert "scanned 2, new 0, modified 0, unchanged 2, deleted 1, failed 0, exported 4" in result.stderr
    assert "locked" in result.stderr  # the warning names the folder that could not be listed
    after = _files(db)
    locked = [os.path.join("locked", "b.jpg"), os.path.join("locked", "deep", "c.jpg")]
    assert sorted(after) == sorted(["a.jpg", os.path.join("open", "d.jpg"), *locked])
    for name in locked:
        assert after[name]["embedding"] == before[name]["embedding"]
        assert after[name]["status"] == "ok"
    exported = sorted(os.path.relpath(r["metadata"]["path"], root) for r in read_jsonl(out))
    assert exported == sorted(after)

    # Readable again and really gone: now they are deleted.
    shutil.rmtree(root / "locked")
    result = run_cli(runner, ["-i", root, "-o", out, "--model-name", tiny_model, "--reindex"])
    assert "deleted 2" in result.stderr
    assert sorted(_files(db)) == ["a.jpg", os.path.join("open", "d.jpg")]


def test_cli_overlapping_inputs_index_each_file_once(runner, tmp_path, tiny_model):
    root = tmp_path / "photos"
    make_photo(root / "a.jpg", seed=1)
    make_photo(root / "sub" / "b.jpg", seed=2)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    out = tmp_path / "index.jsonl"
    result = run_cli(runner, ["-i", root / "sub", root, "-o", out, "--model-name", tiny_model, "--follow-symlinks"])
    assert "scanned 2, new 2" in result.stderr
    paths = [r["metadata"]["path"] for r in read_jsonl(out)]
    assert paths == [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]


@pytest.mark.parametrize("name", ["a.jpg", ".jpg", "..jpg", ".a.jpg", "a.JPG", "a", "a.", "a.b.png", "...", ".",
                                  "x.tar.gz", ".hidden.HEIC", "a..jpg", "photo.jpeg ", "IMG_1.hif", "x.Tiff"])
def test_is_image_name_follows_splitext(name):
    # The scan's own extension check (it runs once per file of every walk) must say what
    # os.path.splitext would: leading dots do not start an extension.
    assert is_image_name(name) == (os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
