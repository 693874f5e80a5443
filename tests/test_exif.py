"""sqlindexer.exif.read on images written here with Pillow / pillow-heif: tag names, the
Exif and GPS sub-IFDs nested, rationals as floats, text decoded, blobs left out, and every
value plain JSON."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from conftest import make_photo, read_jsonl, run_cli
from sqlindexer import exif as exif_reader
from sqlindexer import images

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKERNOTE = b"\x01\x02Nikon\x00\x02\x11\x00\x00MM\x00*\xff\xfe" * 8


def sample_exif() -> Image.Exif:
    """Camera-like EXIF: base IFD strings, Exif sub-IFD with rationals and text blobs,
    GPS sub-IFD with degree/minute/second rationals."""
    e = Image.Exif()
    e[0x010F] = "Canon\x00\x00"  # Make, with the trailing NULs some cameras write
    e[0x0110] = "Canon EOS 5D Mark IV"  # Model
    e[0x0131] = "Firmware 1.0.2\x00"  # Software
    e[0x011A] = IFDRational(300, 1)  # XResolution
    e[0x0128] = 2  # ResolutionUnit
    sub = e.get_ifd(EXIF_IFD)
    sub[0x9003] = "2021:05:06 07:08:09"  # DateTimeOriginal
    sub[0x829A] = IFDRational(1, 250)  # ExposureTime
    sub[0x829D] = IFDRational(28, 10)  # FNumber
    sub[0x9202] = IFDRational(5, 0)  # ApertureValue: zero denominator = unknown
    sub[0x8827] = 400  # ISOSpeedRatings
    sub[0x927C] = MAKERNOTE  # MakerNote
    sub[0x9286] = b"ASCII\x00\x00\x00Hello from the camera\x00\x00"  # UserComment
    gps = e.get_ifd(GPS_IFD)
    gps[0x0000] = b"\x02\x02\x00\x00"  # GPSVersionID
    gps[0x0001] = "N"
    gps[0x0002] = (IFDRational(51, 1), IFDRational(10, 1), IFDRational(4181, 100))
    gps[0x0003] = "W"
    gps[0x0004] = (IFDRational(1, 1), IFDRational(49, 1), IFDRational(359, 10))
    gps[0x0005] = b"\x01"  # GPSAltitudeRef: below sea level
    gps[0x0006] = IFDRational(12, 1)
    return e


EXPECTED_BASE = {"Make": "Canon", "Model": "Canon EOS 5D Mark IV", "Software": "Firmware 1.0.2",
                 "XResolution": 300.0, "ResolutionUnit": 2}
EXPECTED_EXIF_IFD = {"DateTimeOriginal": "2021:05:06 07:08:09", "ExposureTime": 0.004, "FNumber": 2.8,
                     "ApertureValue": None, "ISOSpeedRatings": 400, "UserComment": "Hello from the camera"}
EXPECTED_GPS = {"GPSVersionID": [2, 2, 0, 0], "GPSLatitudeRef": "N", "GPSLatitude": [51.0, 10.0, 41.81],
                "GPSLongitudeRef": "W", "GPSLongitude": [1.0, 49.0, 35.9], "GPSAltitudeRef": 1,
                "GPSAltitude": 12.0}


def assert_plain_json(value) -> None:
    """Only JSON types all the way down, and no NaN or infinity."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            assert_plain_json(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain_json(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), repr(value)
        if isinstance(value, float):
            assert math.isfinite(value)


def read_file(path) -> dict:
    images.register_plugins()
    with Image.open(path) as im:
        im.load()
        return exif_reader.read(im)


def check_sample(got: dict, *, extra_base_ok: bool = False) -> None:
    base = {k: v for k, v in got.items() if k not in ("ExifOffset", "GPSInfo")}
    if extra_base_ok:  # TIFF adds its own structural tags (ImageWidth, Compression, ...)
        base = {k: v for k, v in base.items() if k in EXPECTED_BASE}
    assert base == EXPECTED_BASE
    assert got["ExifOffset"] == EXPECTED_EXIF_IFD
    assert got["GPSInfo"] == EXPECTED_GPS
    assert_plain_json(got)
    json.dumps(got, allow_nan=False)


def test_jpeg_exif_names_nesting_types(tmp_path):
    p = tmp_path / "cam.jpg"
    Image.new("RGB", (40, 30), (10, 120, 200)).save(p, exif=sample_exif().tobytes())
    got = read_file(p)
    check_sample(got)
    # The blob is gone, not turned into a string of bytes.
    assert "MakerNote" not in got["ExifOffset"]
    assert "Nikon" not in json.dumps(got)
    # Rationals are real floats, nested lists are lists of floats.
    assert type(got["ExifOffset"]["ExposureTime"]) is float
    assert all(type(x) is float for x in got["GPSInfo"]["GPSLatitude"])
    assert not any(isinstance(v, str) and "\x00" in v for v in got.values())


def test_zero_denominator_rationals_become_null(tmp_path):
    e = Image.Exif()
    sub = e.get_ifd(EXIF_IFD)
    sub[0x9204] = IFDRational(0, 0)  # ExposureBiasValue
    sub[0x9202] = IFDRational(7, 0)  # ApertureValue
    gps = e.get_ifd(GPS_IFD)
    gps[0x0002] = (IFDRational(51, 1), IFDRational(0, 0), IFDRational(1, 0))
    p = tmp_path / "zero.jpg"
    Image.new("RGB", (16, 16)).save(p, exif=e.tobytes())
    got = read_file(p)
    assert got["ExifOffset"] == {"ExposureBiasValue": None, "ApertureValue": None}
    assert got["GPSInfo"] == {"GPSLatitude": [51.0, None, None]}
    assert "NaN" not in json.dumps(got, allow_nan=False)


def test_unicode_user_comment_in_either_byte_order(tmp_path):
    # Pillow writes little-endian EXIF; UCS-2 text then comes in that byte order.
    for order in ("utf-16-le", "utf-16-be"):
        e = Image.Exif()
        e.get_ifd(EXIF_IFD)[0x9286] = b"UNICODE\x00" + "Grüße aus Köln".encode(order)
        p = tmp_path / f"uc-{order}.jpg"
        Image.new("RGB", (16, 16)).save(p, exif=e.tobytes())
        assert read_file(p)["ExifOffset"] == {"UserComment": "Grüße aus Köln"}, order


def nul_exif() -> Image.Exif:
    """ASCII values with bytes after their terminating NUL, in each IFD: a real Nokia file
    has Make = b"Nokia\\x002" (exiftool 12.57 reads every one of these up to the NUL)."""
    e = Image.Exif()
    e[0x010F] = "Nokia\x002"  # Make
    e[0x0110] = "N70-1\x00\x00stale"  # Model
    e[0x9C9B] = "Title".encode("utf-16-le") + b"\x00\x00"  # XPTitle: BYTE, UCS-2 without a prefix
    sub = e.get_ifd(EXIF_IFD)
    sub[0xA434] = "EF50mm f/1.8\x00old lens"  # LensModel
    sub[0x9286] = b"ASCII\x00\x00\x00Hi\x00there\x00"  # UserComment: UNDEFINED, charset prefix
    gps = e.get_ifd(GPS_IFD)
    gps[0x0012] = "WGS-84\x00\x00xx"  # GPSMapDatum
    return e


NUL_EXPECTED = {"Make": "Nokia", "Model": "N70-1", "XPTitle": "Title",
                "ExifOffset": {"LensModel": "EF50mm f/1.8", "UserComment": "Hi"},
                "GPSInfo": {"GPSMapDatum": "WGS-84"}}


def test_ascii_text_ends_at_its_first_nul(tmp_path):
    p = tmp_path / "nokia.jpg"
    Image.new("RGB", (16, 16)).save(p, exif=nul_exif().tobytes())
    # The file really holds the bytes after the NUL; the reader is what must drop them.
    raw = p.read_bytes()
    assert b"Nokia\x002\x00" in raw and b"EF50mm f/1.8\x00old lens\x00" in raw and b"WGS-84\x00\x00xx\x00" in raw
    got = read_file(p)
    assert got == NUL_EXPECTED
    assert images.decode(str(p)).exif == got


def test_charset_prefixed_text_ends_at_its_first_nul(tmp_path):
    unicode = [b"UNICODE\x00" + "Hi\x00there".encode(order) for order in ("utf-16-le", "utf-16-be")]
    for body in (b"ASCII\x00\x00\x00Hi\x00there", b"\x00" * 8 + b"Hi\x00there", *unicode):
        e = Image.Exif()
        e.get_ifd(EXIF_IFD)[0x9286] = body
        p = tmp_path / "comment.jpg"
        Image.new("RGB", (16, 16)).save(p, exif=e.tobytes())
        assert read_file(p)["ExifOffset"] == {"UserComment": "Hi"}, body


def test_nul_terminated_text_through_the_index(runner, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_photo(photos / "nokia.jpg", exif=nul_exif().tobytes())
    out = tmp_path / "index.jsonl"
    run_cli(runner, ["-i", photos, "-o", out, "--model-name", tiny_model, "--workers", "0"])
    [record] = read_jsonl(out)
    exif = record["metadata"]["exif"]
    assert {k: exif[k] for k in NUL_EXPECTED} == NUL_EXPECTED


def test_values_converted_directly():
    v = exif_reader._value
    assert v(IFDRational(1, 3), depth=0) == pytest.approx(1 / 3)
    assert v(IFDRational(1, 0), depth=0) is None
    assert v(float("inf"), depth=0) is None
    assert v("abc\x00\x00", depth=0) == "abc"
    assert v("Nokia\x002", depth=0) == "Nokia"
    assert v(b"ASCII\x00\x00\x00text\x00", depth=0) == "text"
    assert v(b"ASCII\x00\x00\x00text\x00more", depth=0) == "text"
    assert v(b"\x00", depth=0) == 0  # GPSAltitudeRef above sea level
    assert v((1, IFDRational(1, 2)), depth=0) == [1, 0.5]
    # Binary that is not text is left out, never a Python repr.
    assert v(b"\xff\xd8\xff\xe0binary\x01\x02\x03", depth=0) is exif_reader._SKIP


def test_heic_written_by_pillow_heif_has_same_exif(tmp_path):
    images.register_plugins()
    p = tmp_path / "cam.heic"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(p, format="HEIF", exif=sample_exif().tobytes())
    with Image.open(p) as im:
        assert im.format == "HEIF"
    jpeg = tmp_path / "cam.jpg"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(jpeg, exif=sample_exif().tobytes())
    got = read_file(p)
    check_sample(got)
    assert got == read_file(jpeg)
    # Through the decoder too, as the indexer reads it.
    assert images.decode(str(p)).exif == got


def test_tiff_exif(tmp_path):
    p = tmp_path / "cam.tif"
    Image.new("RGB", (40, 30), (10, 120, 200)).save(p, format="TIFF", exif=sample_exif().tobytes())
    got = read_file(p)
    check_sample(got, extra_base_ok=True)
    assert got["ImageWidth"] == 40 and got["ImageLength"] == 30
    # Strip offsets and byte counts are file structure, not metadata.
    assert "StripOffsets" not in got and "StripByteCounts" not in got


def test_no_exif_is_empty_dict(tmp_path):
    p = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(p)
    assert read_file(p) == {}


GARBAGE = [
    b"garbage" * 10,
    b"Exif\x00\x00" + b"\xff" * 64,
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x01" * 40,  # 65535 entries announced
    # Big-endian IFD whose Make points far beyond the data, and a self-referencing Exif IFD.
    b"MM\x00*\x00\x00\x00\x08\x00\x02\x01\x0f\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00"
    b"\x87\x69\x00\x04\x00\x00\x00\x01\x00\x00\x00\x08\x00\x00\x00\x00",
]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Tag data larger than file:UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF"])
@pytest.mark.parametrize("blob", range(len(GARBAGE)))
def test_garbage_exif_never_raises(tmp_path, fmt, blob):
    images.register_plugins()
    p = tmp_path / f"garbage.{fmt.lower()}"
    Image.new("RGB", (32, 24), (1, 2, 3)).save(p, format=fmt, exif=GARBAGE[blob])
    got = read_file(p)
    assert isinstance(got, dict)
    json.dumps(got, allow_nan=False)
    # The image itself still decodes: bad metadata does not fail the file.
    d = images.decode(str(p))
    assert d.error is None and (d.width, d.height) == (32, 24)
    assert isinstance(d.exif, dict)
