"""Decode one image into exactly the RGB pixels the model will see, or say why not.

Runs in the preprocessing worker pool, never on the engine's thread. Every failure is a `SampleError`
with a kind, so a broken file becomes an error row and the run goes on. The pixel cap is checked from
the header alone, before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.prepare.grid import Grid

# Pillow's own limit; `--max-image-pixels` defaults to it.
DEFAULT_MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
WHITE = (255, 255, 255)
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class PreparedPixels:
    """The model-ready image plus the size the original had (as displayed, after EXIF rotation)."""

    image: Image.Image
    width: int
    height: int


def prepare_image(data: bytes, grid: Grid, max_image_pixels: int) -> PreparedPixels:
    """Decode `data`, orient, convert to RGB and resize it onto `grid`."""
    if not data:
        raise SampleError(ErrorKind.DECODE, "empty file")
    with _pillow_limits(max_image_pixels):
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SampleError(ErrorKind.TOO_LARGE, _too_large_message(str(exc), max_image_pixels)) from None
        except Image.UnidentifiedImageError:
            raise SampleError(ErrorKind.DECODE, "not an image in any format Pillow reads") from None
        except Exception as exc:  # Pillow raises many types for garbage input
            raise SampleError(ErrorKind.DECODE, f"not a readable image ({_describe(exc)})") from None
        with img:
            return _prepare_opened(img, grid, max_image_pixels)


@contextmanager
def _pillow_limits(max_image_pixels: int) -> Iterator[None]:
    """Pillow's process-wide limits for one decode: its bomb check uses our cap (a bomb warning is an
    error), and truncated data is never guessed at. The previous values are restored afterwards."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_image_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _prepare_opened(img: Image.Image, grid: Grid, max_image_pixels: int) -> PreparedPixels:
    width, height = img.size
    if width * height > max_image_pixels:
        raise SampleError(
            ErrorKind.TOO_LARGE,
            f"{width}x{height} is {width * height} pixels, over the cap of {max_image_pixels}",
        )
    orientation = _orientation(img)
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    target_w, target_h = grid.target_size(width, height)
    # JPEG can decode straight at a reduced scale; ask for no less than the target.
    draft_size = (target_h, target_w) if orientation in _ROTATING_ORIENTATIONS else (target_w, target_h)
    try:
        if img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError(ErrorKind.DECODE, f"cannot decode image ({_describe(exc)})") from None
    if orientation != 1:
        img = _apply_orientation(img)
    rgb = to_rgb(img)
    if rgb.size != (target_w, target_h):
        rgb = rgb.resize((target_w, target_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return PreparedPixels(image=rgb, width=width, height=height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white.

    High bit-depth greyscale is scaled down rather than clipped, so a 16-bit scan does not turn white.
    """
    if img.mode in _HIGH_DEPTH_MODES:
        img = _to_8bit_grey(img)
    if "transparency" in img.info and img.mode in ("P", "L", "RGB", "1"):
        img = img.convert("RGBA")  # palette index or colour key (tRNS) marks transparent pixels
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except Exception as exc:
        raise SampleError(ErrorKind.DECODE, f"unsupported image mode {img.mode}: {_describe(exc)}") from None


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    wide = img.convert("F")
    low, high = wide.getextrema()
    if img.mode != "F" and low >= 0 and high <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0
    elif high > low:
        scale, offset = 255.0 / (high - low), -low * 255.0 / (high - low)
    else:
        scale, offset = 0.0, 0.0
    return wide.point(lambda v: v * scale + offset).convert("L")


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the pixels as stored rather than lose the image
        return img


def _too_large_message(pillow_message: str, max_image_pixels: int) -> str:
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    size = f"{found.group(1)} pixels" if found else "too many pixels"
    return f"{size}, over the cap of {max_image_pixels}; refused before decoding"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
