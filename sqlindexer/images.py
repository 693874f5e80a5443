"""Open one image file: decode it upright as RGB, and read its size and EXIF.

Runs wherever decoding happens (in-process or in a worker); imports no torch.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import exif as exif_reader

_heif_registered = False


def register_plugins() -> None:
    """Teach Pillow HEIC/HEIF (and AVIF, where Pillow has no reader of its own)."""
    global _heif_registered
    if not _heif_registered:
        import pillow_heif

        pillow_heif.register_heif_opener()
        _heif_registered = True


@dataclass
class Decoded:
    """An image ready for the model, or the reason it is not."""

    path: str
    image: Image.Image | None = None  # RGB, upright
    width: int | None = None  # as displayed, after EXIF orientation
    height: int | None = None
    exif: dict[str, Any] | None = None
    error: str | None = None


def naflex_size(height: int, width: int, *, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The (height, width) SigLIP 2's naflex processor resizes an image to.

    Same binary search as transformers' get_image_size_for_max_num_patches, kept here so
    that worker processes can plan the decode without importing transformers.
    """
    eps = 1e-5

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, int(math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


# Draft-decode JPEGs to at least this multiple of the size the model will see. 1 (the
# smallest scale that still covers it) keeps the embedding close to a full decode
# (tests/test_embed.py holds it to a cosine bound), and a 12-megapixel photo decodes at 1/8
# scale instead of 1/4 (docs/performance.md).
DRAFT_MARGIN = 1


def decode(
    path: str,
    *,
    patch_size: int = 16,
    max_num_patches: int = 256,
    draft: bool = True,
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    data: bytes | None = None,
) -> Decoded:
    """Decode path; never raises for a bad file, returns Decoded(error=...) instead.

    An image of more than max_image_pixels pixels fails as a decompression bomb (Pillow
    warns above the limit and refuses above twice it; the warning is a failure here). A
    JPEG is checked against its full size, before draft() shrinks it. data: the file's
    bytes, already read (they are decoded instead of reading path again).
    """
    register_plugins()
    # The limit is Pillow's global: set for this call only, so that a run's limit never
    # leaks into other code of the same process (--workers 0, tests).
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_image_pixels
    try:
        return _decode(path, patch_size=patch_size, max_num_patches=max_num_patches, draft=draft, data=data)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode(path: str, *, patch_size: int, max_num_patches: int, draft: bool, data: bytes | None) -> Decoded:
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning (between 1x and 2x the limit) is a failure for us:
            # such files exhaust memory in batches.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                # The file's own size: draft() below shrinks im.size to the reduced scale.
                full_size = im.size
                if draft and im.format in ("JPEG", "MPO"):
                    _draft(im, patch_size=patch_size, max_num_patches=max_num_patches)
                # Load before reading EXIF: for some formats (PNG) getexif() loads the image
                # itself, and a decode error there must fail the file, not vanish.
                im.load()
                metadata = exif_reader.read(im)
                drafted = im.size != full_size and im.format in ("JPEG", "MPO")
                swaps = _swaps_axes(im)
                upright = ImageOps.exif_transpose(im)
                rgb = to_rgb(upright)
        width, height = rgb.size
        if drafted:
            # Report the size as displayed at full scale, not the draft's reduced size.
            width, height = full_size[::-1] if swaps else full_size
        return Decoded(path, rgb, width, height, metadata)
    except FileNotFoundError:
        return Decoded(path, error="file disappeared before it was read")
    except UnidentifiedImageError:
        return Decoded(path, error="not an image Pillow can read (unknown format or corrupt header)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's message names twice the limit when it raises, the limit when it warns.
        size = re.search(r"\((\d+) pixels\)", str(e))
        if size is None:
            return Decoded(path, error=f"refused as a decompression bomb: {e}")
        return Decoded(path, error=f"refused as a decompression bomb: {size.group(1)} pixels, more than "
                                   f"max_image_pixels ({Image.MAX_IMAGE_PIXELS})")
    except MemoryError:
        return Decoded(path, error="out of memory while decoding")
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's, not the run's
        return Decoded(path, error=f"{type(e).__name__}: {e}")


def _swaps_axes(im: Image.Image) -> bool:
    """Whether ImageOps.exif_transpose swaps width and height (EXIF orientation 5-8)."""
    try:
        return im.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - exif_transpose will meet the same error
        return False


def _draft(im: ImageFile.ImageFile, *, patch_size: int, max_num_patches: int) -> None:
    # Orientation does not matter here: draft scales both sides by the same factor.
    th, tw = naflex_size(im.height, im.width, patch_size=patch_size, max_num_patches=max_num_patches)
    im.draft("RGB", (tw * DRAFT_MARGIN, th * DRAFT_MARGIN))


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB, the way the model expects it.

    16-bit and float greyscale are scaled down, not clipped (Pillow's convert() clips
    I;16 to 255, which turns most 16-bit photos white).
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = _as_array(im)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(_scaled_to_uint8(arr, 255.0 / top), "L")
    elif im.mode == "F":
        arr = _as_array(im)
        im = Image.fromarray((arr.clip(0.0, 1.0) * 255.0).astype("uint8"), "L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _as_array(im: Image.Image) -> Any:
    import numpy as np

    return np.asarray(im)


# Rows scaled at a time: the float64 copies of a whole 16-bit image would take 16 more
# bytes per pixel (1.4 GB at Pillow's default pixel limit).
_SCALE_ROWS = 256


def _scaled_to_uint8(arr: Any, factor: float) -> Any:
    """(arr * factor).clip(0, 255) as uint8, computed in float64 a block of rows at a time."""
    import numpy as np

    out = np.empty(arr.shape, dtype=np.uint8)
    for i in range(0, arr.shape[0], _SCALE_ROWS):
        out[i : i + _SCALE_ROWS] = (arr[i : i + _SCALE_ROWS].astype("float64") * factor).clip(0, 255)
    return out


def stat_matches(path: str, size: int, mtime_ns: int) -> bool:
    """Whether the file still has the size and mtime it was scanned with."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns
