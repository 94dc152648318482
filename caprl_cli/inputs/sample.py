"""The sample: one image to caption, with the key that names it in every output, and image names.

Listing never opens an image; it only decides keys (the path relative to the input root, POSIX, with
extension) and sources. Keys are what later stages, outputs and resumed runs match on, so they must be
stable across runs and unique within one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from caprl_cli.errors import ErrorKind

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True, slots=True)
class Sample:
    """One image to caption. `path` (a local path or a URL) is read by a preprocessing worker; `data`
    is already in memory (a shard member). A sample found broken while listing (a hostile tar member,
    a manifest line without an image) carries `error_kind`/`error_message` and becomes an error row
    without being decoded: the run records it and goes on.
    """

    key: str
    source: str
    path: str | None = None
    data: bytes | None = None
    meta: str | None = None  # JSON text: the sample's side members or manifest columns
    ext: str | None = None  # the image's extension as stored ("jpg"), for WebDataset output members
    error_kind: ErrorKind | None = None
    error_message: str | None = None


def is_image_name(name: str) -> bool:
    """True for file names with a supported image extension, in any case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_ext(name: str) -> str:
    """The extension of an image's name as WebDataset members carry it: `Cat.JPG` -> `jpg`."""
    return os.path.splitext(name)[1][1:].lower()


def is_hidden(name: str) -> bool:
    """Dot files, including macOS `._*` resource forks and `.DS_Store`, are never inputs."""
    return name.startswith(".")
