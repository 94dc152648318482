"""Decoding: every corpus file becomes exactly the RGB pixels the model sees, or a sample error of the
right kind; odd Pillow modes are flattened the way a viewer would show them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from corpus import BOMB_SIZE, EXIF_ROTATED_KEY, EXIF_ROTATED_SIZE
from PIL import ExifTags, Image

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.prepare.grid import Grid
from caprl_cli.prepare.images import DEFAULT_MAX_IMAGE_PIXELS, prepare_image, to_rgb

GRID = Grid(28)



def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _original_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed: stored size, swapped for rotating EXIF orientations."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def test_every_corpus_file(corpus) -> None:
    """Good files give RGB on the 28-grid at `grid.target_size` of their displayed size; broken files raise
    a SampleError of exactly the expected kind."""
    root, expected = corpus
    for key, kind in sorted(expected.items()):
        data = (root / key).read_bytes()
        if kind is not None:
            with pytest.raises(SampleError) as failed:
                prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS)
            assert failed.value.kind is ErrorKind(kind), key
            continue
        prepared = prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS)
        assert prepared.image.mode == "RGB", key
        assert (prepared.width, prepared.height) == _original_size(root / key), key
        assert prepared.image.size == GRID.target_size(prepared.width, prepared.height), key
        assert prepared.image.size[0] % 28 == 0 and prepared.image.size[1] % 28 == 0, key


def test_exif_rotated_reports_displayed_size(corpus) -> None:
    """The EXIF-rotated file reports its displayed (rotated) size and is resized upright."""
    root, _ = corpus
    prepared = prepare_image((root / EXIF_ROTATED_KEY).read_bytes(), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert (prepared.width, prepared.height) == EXIF_ROTATED_SIZE
    assert prepared.image.size == GRID.target_size(*EXIF_ROTATED_SIZE)
    assert prepared.image.size[1] > prepared.image.size[0]


def test_exif_rotation_turns_the_pixels() -> None:
    """Orientation 6 (rotate 90 clockwise): the stored left half ends on top, as a viewer shows it."""
    stored = Image.new("RGB", (400, 200), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 200, 200))  # left half red
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    prepared = prepare_image(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert (prepared.width, prepared.height) == (200, 400)
    width, height = prepared.image.size
    top = prepared.image.getpixel((width // 2, height // 4))
    bottom = prepared.image.getpixel((width // 2, 3 * height // 4))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_large_rotated_jpeg_is_not_drafted_below_target() -> None:
    """JPEG draft decoding of a big rotated file still delivers exactly the target size."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = Image.linear_gradient("L").resize((3000, 1000)).convert("RGB")
    prepared = prepare_image(_encode(stored, "JPEG", exif=exif.tobytes()), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert (prepared.width, prepared.height) == (1000, 3000)
    assert prepared.image.size == GRID.target_size(1000, 3000)


def test_large_jpeg_resized_to_target() -> None:
    """A big plain JPEG (drafted while decoding) lands exactly on the grid target."""
    data = _encode(Image.linear_gradient("L").resize((4000, 3000)).convert("RGB"), "JPEG")
    prepared = prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert (prepared.width, prepared.height) == (4000, 3000)
    assert prepared.image.size == GRID.target_size(4000, 3000)
    assert prepared.image.mode == "RGB"


def test_untiled_grid_keeps_small_images(corpus) -> None:
    """With `Grid(None)` an image under the cap keeps its displayed size."""
    root, _ = corpus
    prepared = prepare_image((root / "photo_500x333.tif").read_bytes(), Grid(None), DEFAULT_MAX_IMAGE_PIXELS)
    assert prepared.image.size == (500, 333)
    assert prepared.image.mode == "RGB"


def test_factor_32_grid(corpus) -> None:
    """A Qwen3-VL grid gives multiples of 32."""
    root, _ = corpus
    grid = Grid(32, min_pixels=32 * 32 * 4, max_pixels=1280 * 32 * 32)
    prepared = prepare_image((root / "photo_640x480.jpg").read_bytes(), grid, DEFAULT_MAX_IMAGE_PIXELS)
    assert prepared.image.size == (640, 480)
    prepared = prepare_image((root / "photo_500x333.tif").read_bytes(), grid, DEFAULT_MAX_IMAGE_PIXELS)
    assert prepared.image.size[0] % 32 == 0 and prepared.image.size[1] % 32 == 0


def test_bomb_refused_from_header_alone(corpus) -> None:
    """The 900M-pixel bomb is refused before decoding: even when only its header is present."""
    root, _ = corpus
    data = (root / "bomb.png").read_bytes()
    with pytest.raises(SampleError) as refused:
        prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert refused.value.kind is ErrorKind.TOO_LARGE
    # Signature + IHDR + the first IDAT bytes: decoding would fail (DECODE); refusing by size does not.
    with pytest.raises(SampleError) as refused:
        prepare_image(data[:200], GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert refused.value.kind is ErrorKind.TOO_LARGE


def test_raised_cap_still_refuses_the_bomb(corpus) -> None:
    """A cap above Pillow's default (but under the bomb's 900M pixels) still refuses it."""
    root, _ = corpus
    cap = 4 * DEFAULT_MAX_IMAGE_PIXELS
    assert DEFAULT_MAX_IMAGE_PIXELS < cap < BOMB_SIZE[0] * BOMB_SIZE[1]
    with pytest.raises(SampleError) as refused:
        prepare_image((root / "bomb.png").read_bytes(), GRID, cap)
    assert refused.value.kind is ErrorKind.TOO_LARGE


def test_raised_cap_accepts_image_over_pillow_default() -> None:
    """A raised cap really lets through an image Pillow's default limit would refuse (header-only check)."""
    width, height = 10000, 10000  # 100M pixels > Pillow's 89.5M default
    data = _encode(Image.new("1", (width, height)), "PNG")
    prepared = prepare_image(data, GRID, 2 * width * height)
    assert (prepared.width, prepared.height) == (width, height)
    assert prepared.image.size == GRID.target_size(width, height)


def test_lowered_cap_refuses_normal_photo(corpus) -> None:
    """`--max-image-pixels` under a photo's area refuses it as TOO_LARGE; exactly its area accepts it."""
    root, _ = corpus
    data = (root / "photo_640x480.jpg").read_bytes()
    with pytest.raises(SampleError) as refused:
        prepare_image(data, GRID, 640 * 480 - 1)
    assert refused.value.kind is ErrorKind.TOO_LARGE
    with pytest.raises(SampleError) as refused:
        prepare_image(data, GRID, 1000)
    assert refused.value.kind is ErrorKind.TOO_LARGE
    assert prepare_image(data, GRID, 640 * 480).image.size == GRID.target_size(640, 480)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0" + b"\x00" * 20, b"not an image" * 10],
    ids=["empty", "nul", "gif-magic", "png-magic", "jpeg-soi", "text"],
)
def test_garbage_is_decode_error(data: bytes) -> None:
    """Anything that is not a readable image is a DECODE sample error, never another exception."""
    with pytest.raises(SampleError) as failed:
        prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert failed.value.kind is ErrorKind.DECODE


def test_truncated_png_is_decode_error() -> None:
    """Truncated pixel data is never guessed at."""
    data = _encode(Image.effect_noise((300, 300), 80).convert("RGB"), "PNG")
    with pytest.raises(SampleError) as failed:
        prepare_image(data[: len(data) // 2], GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert failed.value.kind is ErrorKind.DECODE


def test_extreme_aspect_ratio_is_refused() -> None:
    """A 201:1 image is an ASPECT_RATIO error; 200:1 is fine."""
    with pytest.raises(SampleError) as failed:
        prepare_image(_encode(Image.new("RGB", (2010, 10)), "PNG"), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert failed.value.kind is ErrorKind.ASPECT_RATIO
    prepared = prepare_image(_encode(Image.new("RGB", (2000, 10)), "PNG"), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert (prepared.width, prepared.height) == (2000, 10)


def test_animated_gif_takes_first_frame(corpus) -> None:
    """An animated GIF is captioned from frame 0 (red), not a later frame."""
    root, _ = corpus
    prepared = prepare_image((root / "animated.gif").read_bytes(), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert (prepared.width, prepared.height) == (96, 64)
    r, g, b = prepared.image.getpixel((prepared.image.size[0] - 3, 3))
    assert r > 200 and g < 60 and b < 60


def test_multipage_tiff_takes_first_page(corpus) -> None:
    """A multi-page TIFF gives the pixels of its first page."""
    root, _ = corpus
    path = root / "multipage.tiff"
    prepared = prepare_image(path.read_bytes(), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    with Image.open(path) as img:
        img.seek(0)
        first = img.convert("RGB").resize(prepared.image.size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        img.seek(1)
        second = img.convert("RGB").resize(prepared.image.size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    got = np.asarray(prepared.image, dtype=np.int16)
    assert np.abs(got - np.asarray(first, dtype=np.int16)).mean() < 1.0
    assert np.abs(got - np.asarray(second, dtype=np.int16)).mean() > 5.0


# --- to_rgb -----------------------------------------------------------------------------------------


def test_rgba_transparent_region_becomes_white() -> None:
    """Fully transparent pixels are flattened onto white, opaque ones keep their colour."""
    img = Image.new("RGBA", (20, 10), (10, 200, 30, 255))
    img.paste((0, 0, 0, 0), (0, 0, 10, 10))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (20, 10)
    assert rgb.getpixel((2, 5)) == (255, 255, 255)
    assert rgb.getpixel((15, 5)) == (10, 200, 30)


def test_rgba_half_transparent_blends_with_white() -> None:
    """Partial alpha blends towards white."""
    rgb = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert all(120 <= channel <= 135 for channel in rgb.getpixel((1, 1)))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16bit_grey_is_scaled_not_clipped(mode: str) -> None:
    """16-bit mid-grey (32768) becomes ~128, not white; black and full scale stay at the ends."""
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    if mode != img.mode:
        img = img.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    low, mid, high = (rgb.getpixel((x, 0)) for x in range(3))
    assert low == (0, 0, 0)
    assert all(126 <= c <= 129 for c in mid)
    assert all(c >= 254 for c in high)


def test_16bit_png_mid_grey_through_prepare_image() -> None:
    """A real 16-bit PNG file keeps its mid-grey through the whole decode path."""
    data = _encode(Image.fromarray(np.full((56, 56), 32768, dtype=np.uint16)), "PNG")
    prepared = prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS)
    assert all(126 <= c <= 129 for c in prepared.image.getpixel((28, 28)))


def test_corpus_16bit_ramp_is_not_washed_out(corpus) -> None:
    """The corpus 16-bit ramp keeps its full range: dark start, bright end, mid-grey mean."""
    root, _ = corpus
    prepared = prepare_image((root / "mode_i16.png").read_bytes(), GRID, DEFAULT_MAX_IMAGE_PIXELS)
    pixels = np.asarray(prepared.image.convert("L"), dtype=np.float64)
    assert pixels[0, 0] < 20
    assert pixels[-1, -1] > 235
    assert 100 < pixels.mean() < 155


def test_palette_transparency_index_becomes_white() -> None:
    """A palette image's transparent index shows white; other indices keep their palette colour."""
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    reopened = Image.open(io.BytesIO(_encode(img, "PNG", transparency=0)))
    rgb = to_rgb(reopened)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (255, 0, 0)


def test_la_transparent_half_becomes_white() -> None:
    """LA: the transparent part is white, the opaque grey keeps its value."""
    grey = Image.new("L", (10, 10), 60)
    alpha = Image.new("L", (10, 10), 255)
    alpha.paste(0, (0, 0, 10, 5))
    rgb = to_rgb(Image.merge("LA", (grey, alpha)))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((5, 2)) == (255, 255, 255)
    assert rgb.getpixel((5, 8)) == (60, 60, 60)


def test_cmyk_converts_to_rgb() -> None:
    """CMYK pure cyan becomes RGB cyan."""
    rgb = to_rgb(Image.new("CMYK", (4, 4), (255, 0, 0, 0)))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 255, 255)


def test_one_bit_converts_to_rgb() -> None:
    """Mode "1": set pixels white, unset black."""
    img = Image.new("1", (4, 4), 0)
    img.putpixel((2, 2), 1)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((2, 2)) == (255, 255, 255)


def test_rgb_is_returned_as_is() -> None:
    """RGB needs no conversion."""
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(img) is img


@pytest.mark.parametrize("mode", ["L", "P", "PA", "RGBa", "YCbCr", "LAB", "HSV", "F", "I;16B"])
def test_every_mode_gives_rgb(mode: str) -> None:
    """Whatever the mode, the result is 8-bit RGB of the same size."""
    rgb = to_rgb(Image.new(mode, (5, 3)))
    assert rgb.mode == "RGB"
    assert rgb.size == (5, 3)


@pytest.mark.parametrize(("mode", "key"), [("RGB", (0, 0, 0)), ("L", 0)])
def test_colour_key_transparency_becomes_white(mode: str, key) -> None:
    """PNG colour-key transparency (tRNS on RGB or L) is transparency too: it must show white."""
    img = Image.new(mode, (8, 8), key)
    img.paste((200, 0, 0) if mode == "RGB" else 100, (4, 0, 8, 8))
    data = _encode(img, "PNG", transparency=key)
    reopened = Image.open(io.BytesIO(data))
    assert "transparency" in reopened.info
    assert reopened.convert("RGBA").getpixel((0, 0))[3] == 0  # Pillow itself reads it as transparent
    assert to_rgb(reopened).getpixel((0, 0)) == (255, 255, 255)
    assert prepare_image(data, GRID, DEFAULT_MAX_IMAGE_PIXELS).image.getpixel((5, 5)) == (255, 255, 255)


def test_pillow_limits_are_restored(corpus) -> None:
    """Decoding applies the cap only for its own duration: Pillow's globals are left as found."""
    from PIL import ImageFile

    root, _ = corpus
    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    prepare_image((root / "photo_640x480.jpg").read_bytes(), GRID, 1_000_000_000)
    with pytest.raises(SampleError):
        prepare_image((root / "bomb.png").read_bytes(), GRID, 1000)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
