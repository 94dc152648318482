"""What preparing one sample gives: an image ready for the engine, or the reason it will be an error row.

`prepare_sample` is the whole job of a decode worker for one image (read, decode, resize) and never
raises: every failure is a `Failed` value, so one bad file costs one row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.defaults import DEFAULT_RETRIES
from caprl_cli.inputs.sample import DEFAULT_MAX_IMAGE_BYTES, Sample
from caprl_cli.prepare.grid import Grid
from caprl_cli.prepare.images import prepare_image
from caprl_cli.prepare.reading import read_sample_bytes
from caprl_cli.storage import StorageOptions


@dataclass(frozen=True)
class Prepared:
    """An image ready for the engine: model-sized RGB pixels plus its original size."""

    sample: Sample
    image: Image.Image
    width: int
    height: int


@dataclass(frozen=True)
class Failed:
    """An image that will become an error row."""

    sample: Sample
    kind: ErrorKind
    message: str
    width: int | None = None
    height: int | None = None


Outcome = Prepared | Failed


DEFAULT_DECODE_TIMEOUT = 120.0


@dataclass(frozen=True)
class DecodeSettings:
    """How every image of a run is read and prepared: the same object in this process, in an engine
    worker and in a Ray actor, so no executor can prepare images differently. Sent once to each decode
    worker at its start; `decode_timeout` is the pool's, enforced around a worker, never inside it."""

    grid: Grid
    max_image_pixels: int
    keep_bytes: bool = False
    storage_options: StorageOptions | None = None
    retries: int = DEFAULT_RETRIES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT


def prepare_sample(sample: Sample, settings: DecodeSettings) -> Outcome:
    """Read, decode and resize one sample; any failure becomes `Failed`.

    The encoded bytes come back with the result only when `settings.keep_bytes` (WebDataset output
    stores the original image); otherwise they are dropped here so they never cross back to the parent.
    """
    if sample.error_kind is not None:
        return Failed(sample, sample.error_kind, sample.error_message or "")
    try:
        data = read_sample_bytes(sample, settings.storage_options, settings.retries, settings.max_image_bytes)
        pixels = prepare_image(data, settings.grid, settings.max_image_pixels)
    except SampleError as exc:
        return Failed(without_bytes(sample), exc.kind, exc.message)
    except Exception as exc:  # a decoder bug must cost one row, not the run
        return Failed(without_bytes(sample), ErrorKind.DECODE, f"{type(exc).__name__}: {exc}")
    kept = replace(sample, data=data) if settings.keep_bytes else without_bytes(sample)
    return Prepared(kept, pixels.image, pixels.width, pixels.height)


def without_bytes(sample: Sample) -> Sample:
    """The sample without its encoded bytes (an error row never needs them)."""
    return sample if sample.data is None else replace(sample, data=None)
