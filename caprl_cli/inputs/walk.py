"""Walk a local folder for images (and shards) in sorted order, never opening an image."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import is_hidden, is_image_name, stat_signature


@dataclass(frozen=True)
class FoundFile:
    """A file the walk found, and its signature from the stat the walk made anyway."""

    path: Path
    signature: str


def walk_images(
    root: Path, _seen: set[tuple[int, int]] | None = None, wanted: Callable[[str], bool] = is_image_name
) -> Iterator[FoundFile]:
    """Yield the files under `root` whose name is `wanted` (images by default) in sorted order,
    skipping hidden files and folders.

    Symlinked folders are followed once each, so a link back to an ancestor cannot loop. Each entry is
    stat'ed once (following links); that stat both tells folders from files and signs the file.
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
        try:
            entry_info = entry.stat(follow_symlinks=True)
        except OSError:  # a dangling link, or a file gone since the folder was read
            continue
        if stat.S_ISDIR(entry_info.st_mode):
            yield from walk_images(Path(entry.path), seen, wanted)
        elif stat.S_ISREG(entry_info.st_mode) and wanted(entry.name):
            yield FoundFile(Path(entry.path), stat_signature(entry_info))
