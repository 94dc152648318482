"""Captions as `<image>.txt` beside each image, the layout kohya-ss/sd-scripts and taggui train from.

A sidecar someone wrote by hand is worth more than ours, so an existing one with other content is kept
unless asked to overwrite; one with the same content is simply left alone, which is what a run resumed
after a crash sees. Each file is written under a hidden temporary name and renamed, so a reader never
sees half a caption, and a symlinked `.txt` is never followed: at most the link itself is replaced.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from caprl_cli.outputs.table import temp_path_for


class SidecarResult(str, Enum):
    """What `write_sidecar` did."""

    WRITTEN = "written"
    UNCHANGED = "unchanged"  # the file already held exactly this caption
    KEPT_EXISTING = "kept_existing"  # a different (or symlinked, or not regular) file was left alone


def sidecar_path(image_path: str | Path) -> Path:
    """Same folder, same stem, `.txt`: `cat.jpg` -> `cat.txt`, `a.b.png` -> `a.b.txt`."""
    path = Path(image_path)
    return path.with_name(f"{path.stem}.txt")


def write_sidecar(image_path: str | Path, caption: str, overwrite: bool) -> SidecarResult:
    """Write `caption` (UTF-8, as is) to the image's sidecar, unless a different one is there already."""
    target = sidecar_path(image_path)
    data = caption.encode("utf-8")
    if target.is_symlink() or (target.exists() and not target.is_file()):
        if not overwrite:
            return SidecarResult.KEPT_EXISTING
    elif target.exists():
        if _holds(target, data):
            return SidecarResult.UNCHANGED
        if not overwrite:
            return SidecarResult.KEPT_EXISTING
    _write_atomically(target, data)
    return SidecarResult.WRITTEN


def _holds(path: Path, data: bytes) -> bool:
    """True if the regular file at `path` contains exactly `data` (the size is checked first)."""
    return path.stat().st_size == len(data) and path.read_bytes() == data


def _write_atomically(path: Path, data: bytes) -> None:
    """A hidden temp (created fresh, never through a link) made durable, then renamed over `path`.
    The folder is not fsynced: a lost rename just leaves the sidecar missing, and a rerun writes it."""
    temp = temp_path_for(path)
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
