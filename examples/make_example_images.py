#!/usr/bin/env python3
"""Draw the demo input images used by ``make demo``.

Writes eight varied synthetic pictures (landscape, bar chart, pie chart,
geometric shapes, text poster, checkerboard, colour wheel, portrait-format
abstract) into ``examples/images/`` as a mix of JPEG, PNG and WebP, each
under 150 KB.  Needs only the standard library, Pillow and numpy, and is
deterministic, so re-running it reproduces the same files.

Usage: python examples/make_example_images.py [output_dir]
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SEED = 7
OUT_DIR = pathlib.Path(__file__).resolve().parent / "images"
MAX_BYTES = 150 * 1024

Colour = tuple[int, int, int]


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in default font, scaled where this Pillow supports it."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def vertical_gradient(width: int, height: int, top: Colour, bottom: Colour) -> Image.Image:
    """An RGB image fading from ``top`` to ``bottom``."""
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, width, axis=1).astype(np.uint8), "RGB")


def landscape() -> Image.Image:
    """Sunset sky, a glowing sun and three layers of rolling hills."""
    width, height = 1024, 640
    image = vertical_gradient(width, height, (255, 140, 90), (255, 225, 170))
    draw = ImageDraw.Draw(image)
    sun_x, sun_y = 700, 300
    glow = ((150, (255, 200, 120)), (110, (255, 220, 140)), (70, (255, 245, 200)))
    for r, colour in glow:
        draw.ellipse([sun_x - r, sun_y - r, sun_x + r, sun_y + r], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(6))
    draw = ImageDraw.Draw(image)
    hills = [
        (380, 60, 0.006, (120, 90, 130)),
        (450, 50, 0.009, (70, 110, 90)),
        (530, 40, 0.013, (40, 80, 55)),
    ]
    for base, amplitude, frequency, colour in hills:
        points = [
            (x, base - amplitude * math.sin(x * frequency + base)) for x in range(0, width + 8, 8)
        ]
        draw.polygon([(0, height), *points, (width, height)], fill=colour)
    return image


def bar_chart() -> Image.Image:
    """A labelled bar chart of monthly rainfall."""
    width, height = 800, 600
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom, top = 80, height - 80, 90
    draw.text((left, 30), "Monthly rainfall (mm)", fill="black", font=font(28))
    for value in range(0, 101, 20):
        y = bottom - value * (bottom - top) / 100
        draw.line([(left, y), (width - 40, y)], fill=(225, 225, 225))
        draw.text((left - 40, y - 8), str(value), fill="black", font=font(16))
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug"]
    values = [78, 64, 55, 42, 35, 28, 22, 30]
    slot = (width - left - 60) / len(months)
    for i, (month, value) in enumerate(zip(months, values)):
        x0 = left + 15 + i * slot
        y0 = bottom - value * (bottom - top) / 100
        draw.rectangle([x0, y0, x0 + slot - 25, bottom], fill=(70, 130, 180))
        draw.text((x0 + 4, bottom + 10), month, fill="black", font=font(18))
    draw.line([(left, top - 10), (left, bottom), (width - 40, bottom)], fill="black", width=3)
    return image


def pie_chart() -> Image.Image:
    """A pie chart of energy sources with a legend."""
    size = 640
    image = Image.new("RGB", (size, size), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    draw.text((30, 24), "Energy mix", fill="black", font=font(30))
    shares = [("Solar", 35, (250, 190, 40)), ("Wind", 25, (90, 170, 220)),
              ("Hydro", 20, (60, 120, 200)), ("Gas", 12, (200, 110, 80)), ("Other", 8, (150, 150, 150))]
    start = -90.0
    box = [60, 110, 440, 490]
    for label, share, colour in shares:
        end = start + share * 3.6
        draw.pieslice(box, start, end, fill=colour, outline="white", width=3)
        start = end
    for i, (label, share, colour) in enumerate(shares):
        y = 200 + i * 44
        draw.rectangle([470, y, 496, y + 26], fill=colour)
        draw.text((506, y + 2), f"{label} {share}%", fill="black", font=font(18))
    return image


def geometric_shapes() -> Image.Image:
    """Overlapping translucent circles, squares and triangles on navy."""
    rng = np.random.default_rng(SEED)
    width, height = 800, 600
    image = Image.new("RGBA", (width, height), (20, 30, 60, 255))
    for _ in range(18):
        layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        x, y = (int(v) for v in rng.integers(0, [width, height]))
        r = int(rng.integers(30, 130))
        fill = (*(int(v) for v in rng.integers(60, 256, 3)), 150)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif kind == 1:
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        image = Image.alpha_composite(image, layer)
    return image.convert("RGB")


def text_poster() -> Image.Image:
    """A concert-style poster with headline, subtitle and details."""
    width, height = 600, 800
    image = vertical_gradient(width, height, (40, 20, 80), (200, 60, 120))
    draw = ImageDraw.Draw(image)
    draw.ellipse([150, 120, 450, 420], outline=(255, 230, 120), width=8)
    lines = [("SUMMER", 84, 200), ("NIGHTS", 84, 300), ("Open-air jazz festival", 30, 480),
             ("12 - 14 August", 36, 560), ("Riverside Park", 30, 620), ("Free entry", 26, 700)]
    for text, size, y in lines:
        face = font(size)
        text_width = draw.textlength(text, font=face)
        draw.text(((width - text_width) / 2, y), text, fill=(255, 245, 230), font=face)
    return image


def checkerboard() -> Image.Image:
    """An 8x8 checkerboard in two soft colours."""
    size, cells = 512, 8
    index = (np.indices((size, size)) // (size // cells)).sum(axis=0) % 2
    palette = np.array([[238, 238, 210], [118, 150, 86]], dtype=np.uint8)
    return Image.fromarray(palette[index], "RGB")


def colour_wheel() -> Image.Image:
    """An HSV colour wheel: hue by angle, saturation by radius, white outside."""
    size = 512
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    radius = np.hypot(xx, yy) / (size / 2 - 8)
    hue = ((np.arctan2(yy, xx) / (2 * np.pi)) % 1.0 * 255).astype(np.uint8)
    sat = (np.clip(radius, 0, 1) * 255).astype(np.uint8)
    val = np.full_like(hue, 255)
    hsv = Image.merge("HSV", [Image.fromarray(channel, "L") for channel in (hue, sat, val)])
    wheel = hsv.convert("RGB")
    mask = Image.fromarray(((radius <= 1) * 255).astype(np.uint8), "L")
    background = Image.new("RGB", (size, size), "white")
    background.paste(wheel, mask=mask)
    return background


def portrait_abstract() -> Image.Image:
    """A tall abstract of soft overlapping waves and blurred colour blobs."""
    width, height = 480, 720
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin(xx / 53 + yy / 97)
    green = 128 + 90 * np.sin(yy / 61 - xx / 140 + 1.3)
    blue = 150 + 90 * np.cos((xx + yy) / 83)
    pixels = np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    blobs = (
        (140, 180, 90, (255, 240, 200)),
        (330, 430, 120, (40, 40, 90)),
        (200, 600, 70, (250, 120, 90)),
    )
    for cx, cy, r, colour in blobs:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(3))


IMAGES = {
    "landscape.jpg": landscape,
    "bar_chart.png": bar_chart,
    "pie_chart.png": pie_chart,
    "shapes.webp": geometric_shapes,
    "poster.png": text_poster,
    "checkerboard.png": checkerboard,
    "colour_wheel.webp": colour_wheel,
    "portrait_abstract.jpg": portrait_abstract,
}


def save(image: Image.Image, path: pathlib.Path) -> int:
    """Save ``image`` at ``path`` (format from the extension); return its size."""
    params = {".jpg": {"quality": 85}, ".webp": {"quality": 85}, ".png": {"optimize": True}}
    image.save(path, **params[path.suffix])
    return path.stat().st_size


def main(out_dir: pathlib.Path = OUT_DIR) -> None:
    """Draw every demo image into ``out_dir``, checking each stays small."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in IMAGES.items():
        image = draw()
        size = save(image, out_dir / name)
        if size > MAX_BYTES:
            raise SystemExit(f"{name} is {size} bytes, over the {MAX_BYTES} byte limit")
        print(f"{out_dir / name}  {image.width}x{image.height}  {size // 1024} KB")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
