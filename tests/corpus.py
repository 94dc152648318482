"""Synthetic image corpus for the folder walker and decoder tests.

``build_corpus`` writes a small, deterministic tree of files that exercises
every image-handling edge case the captioner has to survive: every accepted
extension (in mixed case), unusual Pillow modes (CMYK, 16-bit, palette with
transparency, 1-bit, LA, RGBA), animated and multi-page files, EXIF
orientation, tiny images, awkward file names, nested and duplicate names,
files the walker must skip (``.DS_Store``, ``._*`` resource forks, hidden
files, non-image extensions) and broken inputs (empty, truncated, not an
image, extreme aspect ratio, decompression bomb).

It returns a mapping from each image's key (path relative to the root, POSIX
separators, extension included) to the error kind the captioner is expected
to report for it, or ``None`` when the image must caption fine.  Skipped
files are deliberately absent from the mapping.
"""

from __future__ import annotations

import functools
import io
import json
import pathlib
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image, ImageDraw

SEED = 20240611

EXIF_ROTATED_KEY = "exif_rotated.jpg"
EXIF_ROTATED_SIZE = (200, 400)  # (width, height) after ImageOps.exif_transpose

# Files the walker must ignore; they are never part of build_corpus' mapping.
SKIPPED_KEYS = (
    ".DS_Store",
    "a/.DS_Store",
    "._x.jpg",
    ".hidden.jpg",
    "notes.txt",
    "data.json",
)

BOMB_SIZE = (30000, 30000)

Expected = dict[str, str | None]


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _rng(salt: int) -> np.random.Generator:
    """A generator seeded from the corpus seed and a per-image salt."""
    return np.random.default_rng([SEED, salt])


def _target(root: pathlib.Path, key: str) -> pathlib.Path:
    """Path for ``key`` under ``root``, with parent folders created."""
    path = root.joinpath(*key.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(image: Image.Image, root: pathlib.Path, key: str, **params: object) -> None:
    """Save ``image`` at ``key``; the format comes from the extension."""
    image.save(_target(root, key), **params)


def _write_bytes(root: pathlib.Path, key: str, data: bytes) -> None:
    """Write raw bytes at ``key``."""
    _target(root, key).write_bytes(data)


def _photo(width: int, height: int, salt: int) -> Image.Image:
    """A photo-like RGB image: smooth gradient, mild noise and a few shapes."""
    rng = _rng(salt)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    top, bottom, side = rng.uniform(30, 225, size=(3, 3))
    pixels = (
        top * (1 - yy[..., None])
        + bottom * yy[..., None]
        + (side - 128) * 0.4 * xx[..., None]
        + rng.normal(0, 5, size=(height, width, 3))
    )
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    _draw_shapes(image, rng)
    return image


def _draw_shapes(image: Image.Image, rng: np.random.Generator) -> None:
    """Draw an ellipse, a rectangle and a triangle in random colours."""
    draw = ImageDraw.Draw(image)
    width, height = image.size

    def box() -> tuple[int, int, int, int]:
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        return x0, y0, x1, y1

    def colour() -> tuple[int, int, int]:
        r, g, b = (int(v) for v in rng.integers(0, 256, 3))
        return r, g, b

    draw.ellipse(box(), fill=colour())
    draw.rectangle(box(), outline=colour(), width=max(1, width // 100))
    points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
    draw.polygon(points, fill=colour())


def _jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    """Encode ``image`` as JPEG in memory."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, tag, data and CRC."""
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


@functools.lru_cache(maxsize=None)
def bomb_png_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of all-black rows, tiny once compressed."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    compressor = zlib.compressobj(9)
    block_rows = 1000
    block = row * block_rows
    chunks = [compressor.compress(block) for _ in range(height // block_rows)]
    chunks.append(compressor.compress(row * (height % block_rows)))
    chunks.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------
# Corpus sections; each writes its files and returns their expectations
# --------------------------------------------------------------------------


def _write_photos(root: pathlib.Path) -> Expected:
    """Photo-like images in every accepted format and a few sizes."""
    _save(_photo(640, 480, 1), root, "photo_640x480.jpg", quality=85)
    _save(_photo(300, 800, 2), root, "photo_300x800.png")
    _save(_photo(1024, 768, 3), root, "photo_1024x768.webp", quality=75)
    _save(_photo(200, 200, 4), root, "photo_200x200.bmp")
    _save(_photo(500, 333, 5), root, "photo_500x333.tif", compression="tiff_adobe_deflate")
    _save(_photo(120, 90, 6), root, "photo_120x90.gif")
    _save(_photo(320, 240, 7), root, "PHOTO_UPPER.JPG", format="JPEG", quality=85)
    _save(_photo(480, 360, 8), root, "photo_480x360.jpeg", quality=85)
    keys = [
        "photo_640x480.jpg",
        "photo_300x800.png",
        "photo_1024x768.webp",
        "photo_200x200.bmp",
        "photo_500x333.tif",
        "photo_120x90.gif",
        "PHOTO_UPPER.JPG",
        "photo_480x360.jpeg",
    ]
    return dict.fromkeys(keys)


def _bar_chart(width: int, height: int) -> Image.Image:
    """A labelled bar chart on a white background."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom = 50, height - 40
    draw.line([(left, 20), (left, bottom), (width - 20, bottom)], fill="black", width=2)
    values = [3, 7, 5, 9, 4]
    colours = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f"]
    slot = (width - left - 40) // len(values)
    for i, (value, colour) in enumerate(zip(values, colours)):
        x0 = left + 10 + i * slot
        top = bottom - value * (bottom - 40) // 10
        draw.rectangle([x0, top, x0 + slot - 20, bottom - 1], fill=colour)
        draw.text((x0, bottom + 8), f"Q{i + 1}", fill="black")
        draw.text((x0, top - 14), str(value), fill="black")
    draw.text((left, 4), "Sales per quarter", fill="black")
    return image


def _line_chart(width: int, height: int) -> Image.Image:
    """A line chart of two series with axes, ticks and a legend."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom = 50, height - 40
    draw.line([(left, 20), (left, bottom), (width - 20, bottom)], fill="black", width=2)
    xs = np.linspace(0, 4 * np.pi, 40)
    series = {"sin": (np.sin(xs), "#1f77b4"), "cos": (np.cos(xs) * 0.6, "#d62728")}
    span_x, span_y = width - left - 40, (bottom - 40) / 2
    for legend_row, (name, (ys, colour)) in enumerate(series.items()):
        points = [
            (left + int(i * span_x / (len(xs) - 1)), int(bottom - span_y - y * span_y * 0.9))
            for i, y in enumerate(ys)
        ]
        draw.line(points, fill=colour, width=3)
        draw.text((width - 80, 24 + legend_row * 14), name, fill=colour)
    for tick in range(5):
        x = left + tick * span_x // 4
        draw.line([(x, bottom), (x, bottom + 5)], fill="black")
        draw.text((x - 3, bottom + 8), str(tick), fill="black")
    draw.text((left, 4), "Signal over time", fill="black")
    return image


def _write_charts(root: pathlib.Path) -> Expected:
    """Two charts drawn with ImageDraw: a bar chart (PNG) and a line chart (JPEG)."""
    _save(_bar_chart(480, 360), root, "chart_bar.png")
    _save(_line_chart(560, 360), root, "chart_line.jpg", quality=90)
    return dict.fromkeys(["chart_bar.png", "chart_line.jpg"])


def _grey16(width: int, height: int) -> Image.Image:
    """A 16-bit greyscale ramp using the full 0..65535 range (mode I;16)."""
    ramp = np.linspace(0, 65535, width * height, dtype=np.float64)
    return Image.fromarray(ramp.reshape(height, width).astype(np.uint16))


def _rgba(width: int, height: int) -> Image.Image:
    """An RGBA photo whose alpha fades from opaque to fully transparent."""
    image = _photo(width, height, 11).convert("RGBA")
    alpha = np.tile(np.linspace(255, 0, width, dtype=np.float32), (height, 1))
    image.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    return image


def _la(width: int, height: int) -> Image.Image:
    """A greyscale-with-alpha image with a transparent top half."""
    grey = _photo(width, height, 12).convert("L")
    alpha = Image.new("L", (width, height), 255)
    ImageDraw.Draw(alpha).rectangle([0, 0, width, height // 2], fill=0)
    return Image.merge("LA", (grey, alpha))


def _animated_frames() -> list[Image.Image]:
    """Three distinctly coloured frames, each with a moving white square."""
    frames = []
    for i, colour in enumerate(["red", "green", "blue"]):
        frame = Image.new("RGB", (96, 64), colour)
        ImageDraw.Draw(frame).rectangle([10 + 25 * i, 20, 30 + 25 * i, 40], fill="white")
        frames.append(frame)
    return frames


def _exif_rotated_jpeg_params() -> dict[str, object]:
    """Save parameters tagging a JPEG with EXIF orientation 6 (rotate 90 CW)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return {"exif": exif.tobytes(), "quality": 85}


def _write_modes(root: pathlib.Path) -> Expected:
    """Unusual modes, multi-frame files, EXIF orientation and tiny images."""
    _save(_photo(320, 240, 10).convert("CMYK"), root, "mode_cmyk.jpg", quality=85)
    _save(_grey16(256, 128), root, "mode_i16.png")
    _save(_rgba(240, 160), root, "mode_rgba.png")
    palette = _photo(200, 150, 13).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    _save(palette, root, "mode_p_transparent.png", transparency=0)
    _save(_la(200, 150), root, "mode_la.png")
    _save(_photo(200, 150, 14).convert("L").convert("1"), root, "mode_1bit.png")
    frames = _animated_frames()
    _save(
        frames[0], root, "animated.gif",
        save_all=True, append_images=frames[1:], duration=200, loop=0,
    )
    pages = [_photo(300, 200, 15), _photo(300, 200, 16)]
    _save(
        pages[0], root, "multipage.tiff",
        save_all=True, append_images=pages[1:], compression="tiff_adobe_deflate",
    )
    rotated_stored = (EXIF_ROTATED_SIZE[1], EXIF_ROTATED_SIZE[0])  # stored as 400x200
    _save(_photo(*rotated_stored, 17), root, EXIF_ROTATED_KEY, **_exif_rotated_jpeg_params())
    _save(Image.new("RGB", (1, 1), (200, 30, 30)), root, "tiny_1x1.png")
    _save(_photo(28, 28, 18).convert("L"), root, "small_28x28.png")
    keys = [
        "mode_cmyk.jpg",
        "mode_i16.png",
        "mode_rgba.png",
        "mode_p_transparent.png",
        "mode_la.png",
        "mode_1bit.png",
        "animated.gif",
        "multipage.tiff",
        EXIF_ROTATED_KEY,
        "tiny_1x1.png",
        "small_28x28.png",
    ]
    return dict.fromkeys(keys)


def _write_names(root: pathlib.Path) -> Expected:
    """Awkward names: spaces, non-ASCII, duplicate names, deep nesting."""
    _save(_photo(320, 240, 20), root, "my photo 1.jpg", quality=85)
    _save(_photo(256, 256, 21), root, "café_ß_日本.png")
    _save(_photo(300, 200, 22), root, "a/same.jpg", quality=85)
    _save(_photo(300, 200, 23), root, "b/same.jpg", quality=85)
    _save(_photo(320, 240, 24), root, "deep/er/nest.webp", quality=75)
    keys = ["my photo 1.jpg", "café_ß_日本.png", "a/same.jpg", "b/same.jpg", "deep/er/nest.webp"]
    return dict.fromkeys(keys)


def _write_broken(root: pathlib.Path) -> Expected:
    """Inputs that must fail with a specific error kind."""
    _write_bytes(root, "empty.jpg", b"")
    full = _jpeg_bytes(_photo(640, 480, 30))
    _write_bytes(root, "truncated.jpg", full[: len(full) * 40 // 100])
    _write_bytes(root, "not_an_image.png", b"This is plain text, not a PNG.\n" * 4)
    _save(_photo(10000, 20, 31), root, "10000x20.png")
    _write_bytes(root, "bomb.png", bomb_png_bytes(*BOMB_SIZE))
    return {
        "empty.jpg": "decode",
        "truncated.jpg": "decode",
        "not_an_image.png": "decode",
        "10000x20.png": "aspect_ratio",
        "bomb.png": "too_large",
    }


def _write_skipped(root: pathlib.Path) -> None:
    """Files the walker must ignore; they are not part of the mapping."""
    ds_store = b"\x00\x00\x00\x01Bud1" + _rng(40).integers(0, 256, 24, dtype=np.uint8).tobytes()
    _write_bytes(root, ".DS_Store", ds_store)
    _write_bytes(root, "a/.DS_Store", ds_store[::-1])
    _write_bytes(root, "._x.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    _save(_photo(64, 48, 41), root, ".hidden.jpg", format="JPEG", quality=85)
    _write_bytes(root, "notes.txt", b"Not an image; the walker must skip this file.\n")
    _write_bytes(root, "data.json", json.dumps({"skip": True}).encode())


def build_corpus(root: pathlib.Path) -> dict[str, str | None]:
    """Write the corpus into the empty folder ``root``.

    Returns ``{key: expected error kind or None}`` for every image file, where
    ``key`` is the POSIX path relative to ``root``.  Files in ``SKIPPED_KEYS``
    are written too but are not in the mapping.
    """
    expected: Expected = {}
    for section in (_write_photos, _write_charts, _write_modes, _write_names, _write_broken):
        expected.update(section(root))
    _write_skipped(root)
    return expected
