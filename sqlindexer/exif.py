"""Turn Pillow's EXIF into a plain, JSON-safe dict. Never raises on bad metadata."""

from __future__ import annotations

import logging
import math
from typing import Any

from PIL import ExifTags, Image, TiffImagePlugin

log = logging.getLogger(__name__)

_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
_INTEROP_IFD = 0xA005
# Binary blobs with no meaning outside the camera maker's software, or image data.
_DROPPED_TAGS = frozenset({
    0x927C,  # MakerNote
    0x0201, 0x0202,  # JPEGInterchangeFormat(Length): the thumbnail
    0x02BC,  # XMLPacket (XMP lives elsewhere)
    0x83BB,  # IPTC-NAA
    0x8773,  # InterColorProfile (ICC)
    0xC4A5,  # PrintImageMatching
    0x0111, 0x0117, 0x0144, 0x0145,  # strip/tile offsets and byte counts
})
# Pillow names no Interop tags; these are the ones cameras write (EXIF 2.3, section 4.6.7).
_INTEROP_TAGS = {0x0001: "InteropIndex", 0x0002: "InteropVersion", 0x1000: "RelatedImageFileFormat",
                 0x1001: "RelatedImageWidth", 0x1002: "RelatedImageLength"}
_SUB_IFDS = {_EXIF_IFD: ExifTags.TAGS, _GPS_IFD: ExifTags.GPSTAGS, _INTEROP_IFD: _INTEROP_TAGS}
# Deeper than any real EXIF; guards against self-referencing IFDs in hostile files.
_MAX_DEPTH = 4
_MAX_ITEMS = 4096
_MAX_TEXT = 4096


def read(image: Image.Image) -> dict[str, Any]:
    """EXIF of an opened image as {tag name: value}, with the Exif and GPS sub-IFDs nested."""
    try:
        exif = image.getexif()
        return _convert_ifd(exif, ExifTags.TAGS, exif, depth=0)
    except Exception as e:  # noqa: BLE001 - metadata must never fail a file
        log.debug("unreadable EXIF in %s: %s", getattr(image, "filename", "?"), e)
        return {}


def _convert_ifd(ifd: Any, names: dict[int, str], exif: Image.Exif, *, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, value in list(ifd.items())[:_MAX_ITEMS]:
        if not isinstance(tag, int) or tag in _DROPPED_TAGS:
            continue
        name = names.get(tag, str(tag))
        sub_names = _SUB_IFDS.get(tag)
        # Exif and GPS hang off the base IFD, Interop off the Exif IFD.
        if sub_names is not None and (depth == 0) == (tag != _INTEROP_IFD):
            try:
                sub = exif.get_ifd(tag)
            except Exception:  # noqa: BLE001 - a broken sub-IFD is left out
                sub = {}
            converted = _convert_ifd(sub, sub_names, exif, depth=depth + 1)
            if converted:
                out[name] = converted
            continue
        converted = _value(value, depth=depth)
        if converted is not _SKIP:
            out[name] = converted
    return out


_SKIP = object()


def _value(value: Any, *, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return _SKIP
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, TiffImagePlugin.IFDRational):
        # A zero denominator is how cameras write "unknown"; Pillow turns it into NaN.
        return _finite(float(value.numerator) / value.denominator if value.denominator else math.nan)
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, str):  # Pillow gives str for the ASCII type only
        return _text(_until_nul(value))
    if isinstance(value, bytes):
        return _bytes(value)
    if isinstance(value, (tuple, list)):
        items = [_value(v, depth=depth + 1) for v in value[:_MAX_ITEMS]]
        if any(v is _SKIP for v in items):
            return _SKIP
        return items
    if isinstance(value, dict):
        out = {}
        for k, v in list(value.items())[:_MAX_ITEMS]:
            converted = _value(v, depth=depth + 1)
            if converted is not _SKIP:
                out[str(k)] = converted
        return out
    try:
        return _finite(float(value))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return _SKIP


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _until_nul(s: str) -> str:
    """EXIF text ends at its first NUL; what follows is padding or stale bytes, not text.
    A Nokia file's Make is "Nokia\\x002": exiftool reads "Nokia", and so do we."""
    return s.split("\x00", 1)[0]


def _text(s: str) -> Any:
    s = s.replace("\x00", "").strip()
    if len(s) > _MAX_TEXT:
        return _SKIP
    # Lone surrogates cannot be written as UTF-8 JSON.
    return s.encode("utf-8", "replace").decode("utf-8")


_CHARSET_PREFIXES = (b"ASCII\x00\x00\x00", b"UNICODE\x00", b"JIS\x00\x00\x00\x00\x00", b"\x00" * 8)


def _bytes(b: bytes) -> Any:
    """Text stored as bytes (UserComment, XPTitle, version tags) decoded; binary left out."""
    if len(b) > _MAX_TEXT:
        return _SKIP
    # BYTE/UNDEFINED tags of a few bytes are numbers, not text: GPSAltitudeRef (0 above,
    # 1 below sea level), GPSVersionID, FileSource, SceneType, ComponentsConfiguration.
    if 0 < len(b) <= 4 and (not b.rstrip(b"\x00") or any(c < 32 for c in b.rstrip(b"\x00"))):
        return b[0] if len(b) == 1 else list(b)
    for prefix in _CHARSET_PREFIXES:
        if b.startswith(prefix):
            body = b[len(prefix):]
            if prefix.startswith(b"UNICODE"):
                # UCS-2 in the byte order of the EXIF block, which is not known here; text
                # in the ASCII range has its zero bytes second in little-endian order.
                le = body[1::2].count(0) > body[0::2].count(0)
                try:
                    return _text(_until_nul(body.decode("utf-16-le" if le else "utf-16-be")))
                except UnicodeDecodeError:
                    return _SKIP
            # Cut before decoding: the charset prefix says the body is text, ending at a NUL.
            # Unprefixed bytes (XPTitle's UCS-2) keep their NULs until _text drops them.
            b = body.split(b"\x00", 1)[0]
            break
    stripped = b.rstrip(b"\x00")
    if not stripped:
        return ""
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        return _SKIP
    # Control characters other than whitespace mean this is not text after all.
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text.replace("\x00", "")):
        return _SKIP
    return _text(text)
