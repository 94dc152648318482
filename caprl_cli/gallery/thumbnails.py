"""Small JPEG thumbnails of the sampled images, found wherever each row's image is.

An image comes from the output itself (WebDataset shards with images), else from the row's source:
a local file, a URL, or a member of the WebDataset input shard the source names (each shard read once,
front to back, with the input reader, for all its sampled keys). Reading reuses the caption run's
readers and caps, so a huge, hostile or vanished image costs nothing. Whatever cannot be read or
decoded gets a placeholder with the reason, never a failure: the page is for reviewing captions.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from caprl_cli.errors import SampleError
from caprl_cli.gallery.reading import PublishedRow
from caprl_cli.inputs.sample import DEFAULT_MAX_IMAGE_BYTES, Sample, name_from_text
from caprl_cli.inputs.shards import is_shard_name, read_shard
from caprl_cli.prepare.images import DEFAULT_MAX_IMAGE_PIXELS, to_rgb
from caprl_cli.prepare.reading import read_sample_bytes
from caprl_cli.storage import StorageOptions, is_url, open_input, redact

THUMBNAIL_SIDE = 256  # the longer side, in pixels
FETCH_THREADS = 8


@dataclass(frozen=True)
class Thumbnail:
    """Where a sampled row's thumbnail went (a file name under thumbs/), or why there is none."""

    name: str | None = None
    missing: str | None = None


def make_thumbnail(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """`data` (any image Pillow reads) as an RGB JPEG at most `side` pixels on its longer side,
    upright by its EXIF orientation. Raises on anything that is not a sane image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > DEFAULT_MAX_IMAGE_PIXELS:
                raise ValueError(f"{img.width}x{img.height} pixels, too many to show")
            img.draft("RGB", (side * 2, side * 2))  # JPEG: decode at a reduced scale, much faster
            upright = to_rgb(ImageOps.exif_transpose(img))
            upright.thumbnail((side, side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            upright.save(buffer, "JPEG", quality=82)
            return buffer.getvalue()


def write_thumbnails(
    sample: list[PublishedRow], folder: Path, storage_options: StorageOptions | None = None
) -> list[Thumbnail]:
    """One thumbnail per sampled row, as `folder/<n>.jpg` (n: its place in the sample)."""
    folder.mkdir(parents=True, exist_ok=True)
    images: list[bytes | str | None] = [item.image for item in sample]  # bytes, or why there are none
    from_shards: dict[str, dict[str, int]] = {}  # input shard -> key -> position in the sample
    elsewhere: list[int] = []
    for position, item in enumerate(sample):
        if images[position] is not None:
            continue
        source, key = item.row.get("source"), str(item.row.get("key"))
        if not source:
            images[position] = "the row names no source"
        elif is_shard_name(source):
            from_shards.setdefault(source, {})[key] = position
        else:
            elsewhere.append(position)
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        for position, found in zip(
            elsewhere, pool.map(lambda p: _read_source(sample[p].row, storage_options), elsewhere), strict=True
        ):
            images[position] = found
        for shard, positions in zip(
            from_shards, pool.map(lambda s: _read_shard_members(s, from_shards[s], storage_options), from_shards),
            strict=True,
        ):
            for position, found in positions.items():
                images[position] = found
    return [_save(position, image, folder) for position, image in enumerate(images)]


def _save(position: int, image: bytes | str | None, folder: Path) -> Thumbnail:
    if not isinstance(image, bytes):
        return Thumbnail(missing=image or "no image")
    try:
        data = make_thumbnail(image)
    except Exception as exc:  # Pillow raises many types for bad bytes
        return Thumbnail(missing=f"not a readable image ({type(exc).__name__})")
    name = f"{position:06d}.jpg"
    (folder / name).write_bytes(data)
    return Thumbnail(name=name)


def _read_source(row: dict, storage_options: StorageOptions | None) -> bytes | str:
    """The image bytes of a row whose source is a file or URL, or why they cannot be read."""
    source = str(row["source"])
    candidates = [source] if is_url(source) else [source, name_from_text(source)]
    reason = "not found"
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return read_sample_bytes(
                Sample(key=str(row.get("key")), source=source, path=candidate), storage_options, retries=0,
                max_bytes=DEFAULT_MAX_IMAGE_BYTES,
            )
        except SampleError as exc:
            reason = str(exc)
        except Exception as exc:  # a backend's own error types
            reason = f"{type(exc).__name__}"
    return redact(reason)


def _read_shard_members(
    shard: str, wanted: dict[str, int], storage_options: StorageOptions | None
) -> dict[int, bytes | str]:
    """The sampled keys' images from input shard `shard` (read once, stopping when all are found)."""
    found: dict[int, bytes | str] = {}
    try:
        with open_input(shard, storage_options, stream=True) as stream:
            for sample in read_shard(shard, stream):
                position = wanted.get(sample.key)
                if position is None:
                    continue
                found[position] = sample.data if sample.data is not None else (sample.error_message or "no image")
                if len(found) == len(wanted):
                    break
    except Exception as exc:  # the shard is gone or unreadable: every sampled key gets a placeholder
        reason = redact(f"cannot read shard {shard}: {type(exc).__name__}")
        return {position: reason for position in wanted.values()}
    return {position: found.get(position, "not in its shard any more") for position in wanted.values()}
