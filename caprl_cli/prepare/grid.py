"""The pixel grid a vision model sees, so images are resized once, in the worker pool.

Qwen2.5-VL (and so CapRL-3B) cuts an image into 14-pixel patches and merges 2x2 of them into one
visual token, so it only takes sizes that are multiples of 28; Qwen3-VL-based CapRL models use 16-pixel
patches and so a 32-pixel grid. `smart_resize` reproduces the rule of the models' own processors, so an
image resized here passes through the engine's processor unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from caprl_cli.errors import ErrorKind, SampleError

MAX_ASPECT_RATIO = 200
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 1280 * 28 * 28


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Return (height, width) on the model's grid, as the Qwen-VL processors compute it.

    Each side is rounded to a multiple of `factor`; an area over `max_pixels` is scaled down by
    sqrt(area / max_pixels) and floored to the grid, an area under `min_pixels` scaled up and ceiled.
    Aspect ratios above 200 are refused, as the models refuse them.
    """
    if height <= 0 or width <= 0:
        raise SampleError(ErrorKind.DECODE, f"image has no pixels ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise SampleError(
            ErrorKind.ASPECT_RATIO,
            f"aspect ratio {ratio:.0f} of {width}x{height} is over {MAX_ASPECT_RATIO}",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Grid:
    """How a model wants its images sized: grid step and pixel bounds.

    `factor` is None for models whose processor tiles images itself (InternVL): images are then only
    capped at `max_pixels`, keeping their aspect ratio, and the processor does the rest.
    """

    factor: int | None
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image must have when it reaches the engine."""
        if self.factor is None:
            return _cap_area(width, height, self.max_pixels)
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def max_visual_tokens(self) -> int | None:
        """Upper bound of visual tokens per image, used to size the engine's context.

        None when the model tiles images itself and the bound is the processor's business.
        """
        if self.factor is None:
            return None
        return self.max_pixels // (self.factor * self.factor)


def _cap_area(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    # A side clamped up to one pixel can push the area back over the cap: shorten the other side.
    if w * h > max_pixels:
        if w >= h:
            w = max(1, max_pixels // h)
        else:
            h = max(1, max_pixels // w)
    return w, h
