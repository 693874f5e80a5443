"""The index file: the original tool's record layout, jsonl and pkl, written atomically."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo, read_jsonl, read_pkl, run_cli

from sqlindexer.errors import ExportError
from sqlindexer.index_file import record, tmp_path as export_tmp_path, write_index
from sqlindexer.records import ExportRow

META_KEYS = ["path", "filename", "size_bytes", "creation_time", "modification_time", "width", "height", "exif"]

# mtimes (ns) whose ns / 1e9 and os.stat()'s st_mtime round to different microseconds.
AWKWARD_NS = [1_746_970_340_164_574_568, 1_770_494_028_831_940_521, 1_798_835_880_020_067_556]


def make_rows(n: int = 3, dim: int = 8) -> list[ExportRow]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        vec = rng.standard_normal(dim).astype("<f4")
        exif = {"Make": "Cam\u00e9ra", "ExifIFD": {"FNumber": 2.8, "ISOSpeedRatings": 100 + i}, "Note": "a\nb \"q\""}
        rows.append(ExportRow(
            path=f"/photos/dir {i}/\u00e9t\u00e9 {i}.jpg",
            size=1000 + i,
            mtime_ns=AWKWARD_NS[i % len(AWKWARD_NS)],
            ctime_ns=1_700_000_001_000_000_000 + i,
            width=64 if i != 1 else None,
            height=48 if i != 1 else None,
            exif=json.dumps(exif, separators=(",", ":"), ensure_ascii=False) if i != 2 else None,
            embedding=vec.tobytes(),
            dim=dim,
        ))
    return rows


def expected_record(row: ExportRow) -> dict:
    return {
        "vector": np.frombuffer(row.embedding, dtype="<f4").tolist(),
        "metadata": {
            "path": row.path,
            "filename": row.path.rsplit("/", 1)[1],
            "size_bytes": row.size,
            "creation_time": datetime.fromtimestamp(_st_float(row.ctime_ns)).isoformat(),
            "modification_time": datetime.fromtimestamp(_st_float(row.mtime_ns)).isoformat(),
            "width": row.width,
            "height": row.height,
            "exif": json.loads(row.exif) if row.exif else {},
        },
    }


def _st_float(ns: int) -> float:
    """The float os.stat() reports as st_mtime for a time of ns nanoseconds."""
    sec, nsec = divmod(ns, 10**9)
    return sec + nsec * 1e-9


class PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise AssertionError(f"the index refers to {module}.{name}")


def load_plain(path: Path) -> list:
    out = []
    with open(path, "rb") as f:
        while True:
            try:
                out.append(PlainUnpickler(f).load())
            except EOFError:
                return out


def test_jsonl_layout(tmp_path):
    rows = make_rows(3)
    out = tmp_path / "index.jsonl"
    assert write_index(iter(rows), out, "jsonl") == 3
    data = out.read_bytes()
    assert data.endswith(b"\n") and not data.endswith(b"\n\n")
    lines = data.decode("utf-8").split("\n")[:-1]
    assert len(lines) == 3 and all(line.strip() for line in lines)
    for line, row in zip(lines, rows):
        rec = json.loads(line)
        assert list(rec) == ["vector", "metadata"]
        assert list(rec["metadata"]) == META_KEYS
        expected = expected_record(row)
        # jsonl holds each float32 in its shortest form: it reads back to the same float32
        # (not to the same float64 as float(np.float32(x)), which pkl holds).
        stored = np.frombuffer(row.embedding, dtype="<f4")
        assert np.array_equal(np.array(rec.pop("vector"), dtype="<f4"), stored)
        assert np.array_equal(np.array(expected.pop("vector"), dtype="<f4"), stored)
        assert rec == expected
        assert rec["metadata"] == record(row)["metadata"]  # the jsonl splice and the structured record agree
    assert "\u00e9t\u00e9" in lines[0]  # UTF-8, not \u escapes
    assert read_jsonl(out)[1]["metadata"]["width"] is None
    assert read_jsonl(out)[2]["metadata"]["exif"] == {}


def test_pkl_layout_only_builtin_types(tmp_path):
    rows = make_rows(3)
    out = tmp_path / "index.pkl"
    assert write_index(rows, out, "pkl") == 3
    records = load_plain(out)
    assert records == [expected_record(r) for r in rows]
    assert records == read_pkl(out)
    for rec in records:
        assert list(rec) == ["vector", "metadata"] and list(rec["metadata"]) == META_KEYS
        assert all(type(x) is float for x in rec["vector"])
    globals_used = [arg for op, arg, _ in pickletools.genops(io.BytesIO(out.read_bytes()))
                    if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX")]
    assert globals_used == []


@pytest.mark.parametrize("fmt", ["jsonl", "pkl"])
def test_empty_index(tmp_path, fmt):
    out = tmp_path / f"index.{fmt}"
    assert write_index([], out, fmt) == 0
    assert out.read_bytes() == b""


def test_unknown_format(tmp_path):
    with pytest.raises(ExportError, match="csv"):
        write_index(make_rows(1), tmp_path / "index.csv", "csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["jsonl", "pkl"])
def test_stale_tmp_is_replaced(tmp_path, fmt):
    out = tmp_path / f"index.{fmt}"
    tmp = export_tmp_path(out)
    assert tmp == tmp_path / f"index.{fmt}.tmp"
    tmp.write_bytes(b"half a record from a crash" * 100)
    write_index(make_rows(2), out, fmt)
    assert not tmp.exists()
    records = read_jsonl(out) if fmt == "jsonl" else read_pkl(out)
    assert len(records) == 2


def _failing(rows, after: int):
    for i, row in enumerate(rows):
        if i == after:
            raise RuntimeError("the database went away")
        yield row


@pytest.mark.parametrize("fmt", ["jsonl", "pkl"])
def test_failure_midway_keeps_previous_index(tmp_path, fmt):
    out = tmp_path / f"index.{fmt}"
    write_index(make_rows(1), out, fmt)
    previous = out.read_bytes()
    ticks = []
    with pytest.raises(RuntimeError, match="went away"):
        write_index(_failing(make_rows(5), after=2), out, fmt, tick=ticks.append)
    assert ticks == [1, 1]  # it did get two rows in before failing
    assert out.read_bytes() == previous
    assert not export_tmp_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_failure_midway_without_previous_index(tmp_path):
    out = tmp_path / "index.jsonl"
    with pytest.raises(RuntimeError):
        write_index(_failing(make_rows(5), after=2), out, "jsonl")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["jsonl", "pkl"])
def test_planted_tmp_symlink_is_not_followed(tmp_path, fmt):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / f"index.{fmt}"
    tmp = export_tmp_path(out)
    tmp.symlink_to(victim)
    write_index(make_rows(2), out, fmt)
    assert victim.read_bytes() == b"precious"
    assert not tmp.exists() and not tmp.is_symlink()
    assert not out.is_symlink()
    assert len(read_jsonl(out) if fmt == "jsonl" else read_pkl(out)) == 2
    # A dangling link is not written through either.
    target = tmp_path / "would-be-created"
    tmp.symlink_to(target)
    write_index(make_rows(1), out, fmt)
    assert not target.exists() and not tmp.is_symlink()


def test_awkward_times_are_awkward():
    for ns in AWKWARD_NS:
        assert datetime.fromtimestamp(ns / 1e9) != datetime.fromtimestamp(_st_float(ns))


def test_times_are_written_as_the_original_tool_wrote_them(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    paths = [make_photo(photos / f"p{i}.jpg", seed=i) for i in range(len(AWKWARD_NS))]
    for path, ns in zip(paths, AWKWARD_NS):
        os.utime(path, ns=(ns, ns))
        if path.stat().st_mtime_ns != ns:
            pytest.skip("this file system does not keep nanosecond mtimes")
    out = tmp_path / "index.jsonl"
    stale = export_tmp_path(out)
    stale.write_bytes(b"garbage from an interrupted run")
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model])
    assert not stale.exists()
    records = read_jsonl(out)
    assert len(records) == len(paths)
    for rec, path in zip(records, paths):
        st = os.stat(path)
        meta = rec["metadata"]
        # Exactly the original's datetime.fromtimestamp(st.st_mtime).isoformat().
        assert meta["modification_time"] == datetime.fromtimestamp(st.st_mtime).isoformat()
        assert meta["creation_time"] == datetime.fromtimestamp(st.st_ctime).isoformat()
        assert meta["size_bytes"] == st.st_size and meta["filename"] == path.name
        assert (meta["width"], meta["height"]) == (64, 48)
        assert isinstance(meta["exif"], dict)


def test_cli_pkl_export_is_plain(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i in range(3):
        make_photo(photos / f"p{i}.jpg", seed=i)
    out = tmp_path / "index.pkl"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model])
    records = load_plain(out)
    assert [r["metadata"]["filename"] for r in records] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    for rec in records:
        assert list(rec) == ["vector", "metadata"] and list(rec["metadata"]) == META_KEYS
        assert len(rec["vector"]) == 32
        assert abs(np.linalg.norm(rec["vector"]) - 1) < 1e-4
