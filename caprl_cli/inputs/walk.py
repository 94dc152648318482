"""Walk a local folder for images (and shards) in sorted order, never opening an image."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import is_hidden, is_image_name


def walk_images(
    root: Path, _seen: set[tuple[int, int]] | None = None, wanted: Callable[[str], bool] = is_image_name
) -> Iterator[Path]:
    """Yield the files under `root` whose name is `wanted` (images by default) in sorted order,
    skipping hidden files and folders.

    Symlinked folders are followed once each, so a link back to an ancestor cannot loop.
    """
    seen = set() if _seen is None else _seen
    try:
        info = root.stat()
    except OSError as exc:
        raise UsageError(f"cannot list {root}: {exc.strerror or exc}") from None
    if (info.st_dev, info.st_ino) in seen:
        return
    seen.add((info.st_dev, info.st_ino))
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as exc:
        raise UsageError(f"cannot list {root}: {exc.strerror or exc}") from None
    for entry in entries:
        if is_hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=True):
            yield from walk_images(Path(entry.path), seen, wanted)
        elif entry.is_file(follow_symlinks=True) and wanted(entry.name):
            yield Path(entry.path)
