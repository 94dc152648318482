"""The model's pixel grid: `smart_resize` must match the Qwen-VL processors exactly, `Grid` must size
images the way the engine expects them."""

from __future__ import annotations

import inspect
import math
import random

import pytest

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.prepare.grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, MAX_ASPECT_RATIO, Grid, smart_resize

# (factor, min_pixels, max_pixels): Qwen2.5-VL defaults, a raised floor, Qwen3-VL-like grids.
SETTINGS = [
    (28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
    (28, 256 * 28 * 28, 1280 * 28 * 28),
    (28, 4 * 28 * 28, 16384 * 28 * 28),
    (32, 32 * 32, 1280 * 32 * 32),
    (32, 64 * 32 * 32, 16384 * 32 * 32),
]
SETTING_IDS = [f"f{f}-min{lo}-max{hi}" for f, lo, hi in SETTINGS]
EDGE_SIDES = [1, 2, 3, 13, 14, 15, 16, 27, 28, 29, 31, 32, 33, 42, 55, 56, 57, 100, 199, 200, 201, 1000, 4999, 5000]


def _sizes() -> list[tuple[int, int]]:
    """A deterministic spread of (height, width): random sides in 1..5000, edge values, extreme ratios."""
    rng = random.Random(20240611)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(1500)]
    sizes += [(h, w) for h in EDGE_SIDES for w in EDGE_SIDES]
    for short in (1, 2, 7, 14, 28, 30, 100, 250):
        for ratio in (150, 199, 200, 201, 250):
            sizes += [(short, short * ratio), (short * ratio, short)]
    big = [(rng.randint(5000, 40000), rng.randint(5000, 40000)) for _ in range(200)]
    return sizes + big


SIZES = _sizes()


@pytest.fixture(scope="module")
def hf_smart_resize():
    """transformers' own Qwen2-VL rule, the reference the engine's processor applies."""
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    params = list(inspect.signature(module.smart_resize).parameters)
    assert params[:5] == ["height", "width", "factor", "min_pixels", "max_pixels"], params
    return module.smart_resize


@pytest.mark.parametrize(("factor", "min_pixels", "max_pixels"), SETTINGS, ids=SETTING_IDS)
def test_matches_transformers_smart_resize(hf_smart_resize, factor: int, min_pixels: int, max_pixels: int) -> None:
    """Resized here means unchanged by the engine's processor: results equal transformers' for every size,
    and both refuse exactly the same sizes."""
    mismatches = []
    for height, width in SIZES:
        try:
            expected = hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError:
            with pytest.raises(SampleError) as refused:
                smart_resize(height, width, factor, min_pixels, max_pixels)
            assert refused.value.kind is ErrorKind.ASPECT_RATIO, (height, width)
            continue
        got = smart_resize(height, width, factor, min_pixels, max_pixels)
        if tuple(got) != tuple(expected):
            mismatches.append(((height, width), got, expected))
    assert mismatches == []


@pytest.mark.parametrize(("factor", "min_pixels", "max_pixels"), SETTINGS, ids=SETTING_IDS)
def test_result_on_grid_and_within_pixel_bounds(factor: int, min_pixels: int, max_pixels: int) -> None:
    """Both sides are positive multiples of the factor and the area lies within [min_pixels, max_pixels]."""
    for height, width in SIZES:
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            continue
        h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
        assert h > 0 and w > 0, (height, width)
        assert h % factor == 0 and w % factor == 0, (height, width, h, w)
        assert min_pixels <= h * w <= max_pixels, (height, width, h, w)


def test_already_on_grid_is_unchanged() -> None:
    """A size that is on the grid and within bounds is returned as is."""
    assert smart_resize(280, 560, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == (280, 560)
    assert smart_resize(320, 640, 32, 32 * 32, 1280 * 32 * 32) == (320, 640)


def test_rounds_each_side_to_nearest_multiple() -> None:
    """Within bounds, each side goes to its nearest multiple of the factor (height first in the result)."""
    assert smart_resize(300, 800, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == (308, 812)
    assert smart_resize(480, 640, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == (476, 644)


def test_over_max_pixels_scales_down_with_floor() -> None:
    """An area over max_pixels is scaled by sqrt(area / max) and floored to the grid."""
    height, width = 3000, 4000
    beta = math.sqrt(height * width / DEFAULT_MAX_PIXELS)
    expected = (math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28)
    got = smart_resize(height, width, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert got == expected
    assert got[0] * got[1] <= DEFAULT_MAX_PIXELS
    # Flooring: one more grid step on either side would break the cap or not be the floor any more.
    assert got[0] <= height / beta < got[0] + 28 + 1e-9
    assert got[1] <= width / beta < got[1] + 28 + 1e-9


def test_under_min_pixels_scales_up_with_ceil() -> None:
    """An area under min_pixels is scaled by sqrt(min / area) and ceiled to the grid."""
    height, width = 10, 30
    min_pixels = 256 * 28 * 28
    beta = math.sqrt(min_pixels / (height * width))
    expected = (math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28)
    got = smart_resize(height, width, 28, min_pixels, DEFAULT_MAX_PIXELS)
    assert got == expected
    assert got[0] * got[1] >= min_pixels


def test_one_pixel_image_becomes_56x56() -> None:
    """The smallest image is blown up to the minimum area: 56x56 with Qwen2.5-VL's defaults."""
    assert smart_resize(1, 1, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == (56, 56)
    assert Grid(28).target_size(1, 1) == (56, 56)


@pytest.mark.parametrize(("height", "width"), [(1, 201), (201, 1), (2, 401), (10, 2001), (100, 20001)])
def test_aspect_ratio_over_200_is_refused(height: int, width: int) -> None:
    """Ratios the model refuses become ASPECT_RATIO sample errors."""
    with pytest.raises(SampleError) as refused:
        smart_resize(height, width, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert refused.value.kind is ErrorKind.ASPECT_RATIO


@pytest.mark.parametrize(("height", "width"), [(1, 200), (200, 1), (28, 5600), (5600, 28), (50, 10000)])
def test_aspect_ratio_of_exactly_200_is_accepted(height: int, width: int) -> None:
    """The limit is inclusive: 200:1 is still captioned."""
    h, w = smart_resize(height, width, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert h % 28 == 0 and w % 28 == 0
    assert DEFAULT_MIN_PIXELS <= h * w <= DEFAULT_MAX_PIXELS
    assert (h > w) == (height > width)


@pytest.mark.parametrize(("height", "width"), [(0, 10), (10, 0), (0, 0), (-5, 10)])
def test_no_pixels_is_a_decode_error(height: int, width: int) -> None:
    """An empty size is a sample error, not a crash."""
    with pytest.raises(SampleError) as refused:
        smart_resize(height, width, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert refused.value.kind is ErrorKind.DECODE


def test_factor_32_for_qwen3_vl() -> None:
    """Qwen3-VL's 32-pixel grid: both sides multiples of 32, bounds respected."""
    grid = Grid(32, min_pixels=64 * 32 * 32, max_pixels=1280 * 32 * 32)
    for width, height in [(1, 1), (640, 480), (4000, 3000), (333, 500), (32, 32)]:
        w, h = grid.target_size(width, height)
        assert w % 32 == 0 and h % 32 == 0
        assert grid.min_pixels <= w * h <= grid.max_pixels
    assert grid.target_size(640, 480) == (640, 480)


def test_grid_target_size_is_width_then_height() -> None:
    """`Grid.target_size` takes and returns (width, height), unlike smart_resize's (height, width)."""
    grid = Grid(28)
    assert grid.target_size(300, 800) == (308, 812)
    assert grid.target_size(800, 300) == (812, 308)


def test_grid_refuses_extreme_aspect_ratio() -> None:
    """A grid with a factor refuses what the model refuses."""
    with pytest.raises(SampleError) as refused:
        Grid(28).target_size(10000, 20)
    assert refused.value.kind is ErrorKind.ASPECT_RATIO


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (640, 480), (1000, 1000), (1001, 1000), (4000, 3000), (30000, 200), (7, 900000)]
)
def test_untiled_grid_only_caps_area(width: int, height: int) -> None:
    """`Grid(None)` (processors that tile themselves): small images untouched, large ones capped at
    max_pixels keeping their aspect ratio, never refused for their ratio."""
    max_pixels = 1000 * 1000
    w, h = Grid(None, max_pixels=max_pixels).target_size(width, height)
    if width * height <= max_pixels:
        assert (w, h) == (width, height)
        return
    assert w * h <= max_pixels
    assert w >= 1 and h >= 1
    assert w <= width and h <= height
    # Aspect kept up to the flooring of each side by less than one pixel.
    scale = math.sqrt(max_pixels / (width * height))
    assert max(1, width * scale - 1) <= w <= max(1, width * scale)
    assert max(1, height * scale - 1) <= h <= max(1, height * scale)


def test_untiled_grid_cap_holds_for_one_pixel_wide_images() -> None:
    """`Grid(None)` promises images capped at max_pixels, even a 1-pixel-wide strip."""
    max_pixels = 1000 * 1000
    w, h = Grid(None, max_pixels=max_pixels).target_size(1, 5_000_000)
    assert w >= 1 and h >= 1
    assert w * h <= max_pixels


def test_untiled_grid_keeps_default_sized_images() -> None:
    """With the default cap an ordinary photo reaches the processor at its own size."""
    assert Grid(None).target_size(640, 480) == (640, 480)


def test_max_visual_tokens() -> None:
    """Tokens per image: max_pixels over the merged patch area; None when the model tiles itself."""
    assert Grid(28).max_visual_tokens() == 1280
    assert Grid(28, max_pixels=16384 * 28 * 28).max_visual_tokens() == 16384
    assert Grid(32, max_pixels=1280 * 32 * 32).max_visual_tokens() == 1280
    assert Grid(28, max_pixels=1000).max_visual_tokens() == 1000 // 784
    assert Grid(None).max_visual_tokens() is None


def test_max_visual_tokens_bounds_every_target() -> None:
    """No image resized onto the grid carries more visual tokens than the bound the engine is sized for."""
    for factor, min_pixels, max_pixels in SETTINGS:
        grid = Grid(factor, min_pixels, max_pixels)
        bound = grid.max_visual_tokens()
        for height, width in SIZES[:400]:
            if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
                continue
            w, h = grid.target_size(width, height)
            assert (w // factor) * (h // factor) <= bound
