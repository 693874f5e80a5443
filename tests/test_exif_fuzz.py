"""Fuzz the EXIF reader: hypothesis-generated EXIF blocks, raw bytes and structured TIFF
IFDs (random tags, types, counts, offsets, sub-IFD pointers and loops), written as the APP1
segment of a real JPEG and read the way the indexer reads every file (images.decode: open,
draft, load, EXIF, orientation). It must never raise, never hang, and always give EXIF that
strict JSON (no NaN, no infinity) can hold; the image itself must still decode.

Derandomized, with a fixed number of examples, so CI runs the same cases every time.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sqlindexer import images  # noqa: E402

EXAMPLES = 250  # per strategy; three strategies
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=2000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HANG_SECONDS = 10


def _base_jpeg() -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 64), (30, 120, 200))
    ImageDraw.Draw(im).rectangle([10, 10, 40, 50], fill=(250, 20, 20))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=80)
    return out.getvalue()


BASE = _base_jpeg()


def with_app1(payload: bytes) -> bytes:
    """BASE with payload as its APP1 segment, right after SOI (where cameras put EXIF)."""
    payload = payload[:65533]
    return BASE[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + BASE[2:]


@contextmanager
def no_hang(seconds: int):
    def alarm(signum, frame):
        raise TimeoutError(f"reading the EXIF took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(path: Path, payload: bytes) -> None:
    path.write_bytes(with_app1(payload))
    with no_hang(HANG_SECONDS):
        d = images.decode(str(path))  # never raises: any failure would be d.error
    assert d.error is None, f"a bad EXIF block failed the image: {d.error}"
    assert d.image is not None and sorted((d.width, d.height)) == [64, 96]
    assert isinstance(d.exif, dict)
    hypothesis.event("EXIF read: some tags" if d.exif else "EXIF read: none")
    text = json.dumps(d.exif, allow_nan=False, ensure_ascii=False)  # strict JSON, as the database stores it
    assert json.loads(text) == d.exif
    text.encode("utf-8")  # no lone surrogates


# -- raw bytes ---------------------------------------------------------------------------
_headers = st.sampled_from([b"Exif\x00\x00II*\x00", b"Exif\x00\x00MM\x00*", b"Exif\x00\x00", b"II*\x00", b""])


@SETTINGS
@given(header=_headers, body=st.binary(max_size=1024))
def test_raw_exif_bytes(tmp_path_factory, header, body):
    check(tmp_path_factory.mktemp("fuzz", numbered=True) / "raw.jpg", header + body)


# -- structured TIFF IFDs ----------------------------------------------------------------
# Tags the reader treats specially (sub-IFD pointers, dropped blobs, orientation, text in
# bytes, rationals) and a few at random.
_TAGS = [0x8769, 0x8825, 0xA005, 0x0112, 0x927C, 0x9286, 0x9C9B, 0x0132, 0x010F, 0x0110, 0x829A, 0x829D,
         0x0002, 0x0004, 0x0006, 0x0000, 0x0001, 0x0201, 0x0202, 0x02BC, 0x0111, 0x9000, 0xA000, 0x0213]
_tag = st.one_of(st.sampled_from(_TAGS), st.integers(0, 0xFFFF))
# Mostly TIFF's own types (1-12) and small counts, so that most entries get as far as the
# conversion to JSON; now and then an invalid type or a huge count.
_type = st.one_of(*[st.integers(1, 12)] * 5, st.integers(0, 0xFFFF))
_count = st.one_of(*[st.integers(0, 8)] * 4, st.integers(0, 0xFFFFFFFF))
_entry = st.tuples(_tag, _type, _count, st.integers(0, 0xFFFFFFFF))


@st.composite
def tiff_blocks(draw) -> bytes:
    little = draw(st.booleans())
    e = "<" if little else ">"
    ifds = draw(st.lists(st.lists(_entry, max_size=12), min_size=1, max_size=4))
    data = draw(st.binary(max_size=256))
    # Lay out: header, then each IFD, then a data area. Offsets are either random or point
    # at one of the IFDs (so sub-IFD pointers can form chains and loops) or into the data.
    body = bytearray(b"II*\x00" if little else b"MM\x00*")
    body += struct.pack(e + "I", 8)
    starts, pos = [], 8
    for entries in ifds:
        starts.append(pos)
        pos += 2 + 12 * len(entries) + 4
    data_at = pos
    for i, entries in enumerate(ifds):
        body += struct.pack(e + "H", len(entries))
        for tag, typ, count, value in entries:
            how = draw(st.sampled_from(["value", "ifd", "data", "data"]))
            if how == "ifd":
                value = draw(st.sampled_from(starts))
            elif how == "data":
                value = data_at + draw(st.integers(0, max(0, len(data) - 1)))
            body += struct.pack(e + "HHII", tag, typ, count, value)
        nxt = draw(st.sampled_from([0, *starts, draw(st.integers(0, 0xFFFFFFFF))]))
        body += struct.pack(e + "I", nxt)
    body += data
    return b"Exif\x00\x00" + bytes(body)


@SETTINGS
@given(block=tiff_blocks())
def test_structured_exif_ifds(tmp_path_factory, block):
    check(tmp_path_factory.mktemp("fuzz", numbered=True) / "ifd.jpg", block)


# -- values written by Pillow's own EXIF writer -------------------------------------------
# Well-formed blocks with hostile values: every one reaches the conversion to JSON.
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_rational = st.builds(lambda n, d: __import__("PIL.TiffImagePlugin").TiffImagePlugin.IFDRational(n, d),
                      st.integers(-(2**31), 2**31 - 1), st.integers(0, 2**31 - 1))
_scalar = st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers(0, 2**32 - 1),
                    st.integers(-(2**31), -1), _floats, _rational)
_value = st.one_of(_scalar, st.lists(st.one_of(st.integers(0, 65535), _rational), min_size=1, max_size=6).map(tuple))


@st.composite
def pillow_blocks(draw) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    for tag, value in draw(st.dictionaries(st.one_of(st.sampled_from(_TAGS[3:]), st.integers(1, 0xFFFF)),
                                           _value, max_size=8)).items():
        if tag not in (0x8769, 0x8825, 0xA005):
            exif[tag] = value
    for ifd in draw(st.lists(st.sampled_from([0x8769, 0x8825]), max_size=2, unique=True)):
        sub = exif.get_ifd(ifd)
        for tag, value in draw(st.dictionaries(st.integers(1, 0xFFFF), _value, max_size=6)).items():
            sub[tag] = value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's writer warns about the odd values we gave it
            return exif.tobytes()
    except Exception:  # noqa: BLE001 - a value Pillow cannot write is no test case
        hypothesis.reject()


@SETTINGS
@given(block=pillow_blocks())
def test_hostile_values_in_wellformed_exif(tmp_path_factory, block):
    check(tmp_path_factory.mktemp("fuzz", numbered=True) / "values.jpg", block)


def test_the_fuzzer_reaches_the_reader(tmp_path):
    """The harness is not vacuous: a well-formed block written the same way is read back."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F] = "FuzzCam"
    exif[0x0112] = 6
    path = tmp_path / "ok.jpg"
    path.write_bytes(with_app1(exif.tobytes()))
    d = images.decode(str(path))
    assert d.exif["Make"] == "FuzzCam" and d.exif["Orientation"] == 6
    assert (d.width, d.height) == (64, 96)  # rotated upright
