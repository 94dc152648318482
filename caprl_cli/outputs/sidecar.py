"""Captions as `<image>.txt` beside each image, the layout kohya-ss/sd-scripts and taggui train from.

A sidecar someone wrote by hand is worth more than ours, so an existing one with other content is kept
unless asked to overwrite; one with the same content is simply left alone, which is what a run resumed
after a crash sees. Each file is written under a hidden temporary name and renamed, so a reader never
sees half a caption, and a symlinked `.txt` is never followed: at most the link itself is replaced.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from caprl_cli.outputs.atomic import temp_path_for
from caprl_cli.outputs.base import OutputTarget
from caprl_cli.outputs.rows import STATUS_OK
from caprl_cli.state.folder import RunState
from caprl_cli.state.index import CommittedIndex

log = logging.getLogger("caprl")


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


class SidecarTarget(OutputTarget):
    """`<image>.txt` beside each captioned image of a local folder; the state lives in `<folder>/.caprl`
    where the folder is `-o` if given, else the first input folder."""

    def default_state_dir(self) -> Path:
        return Path(self.location) / ".caprl"

    def summary_location(self) -> str:
        return str(self.state_dir / "summary.json")

    def exists(self) -> bool:
        return False  # existing .txt files are handled one by one: kept unless --overwrite

    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None:
        already = set(state.merged_parts() or [])
        results: Counter[str] = Counter()
        for table in index.latest_tables(["source", "caption", "status"], skip=already):
            for row in table.filter(pc.equal(table["status"], STATUS_OK)).to_pylist():
                if not Path(row["source"]).is_absolute() or not Path(row["source"]).is_file():
                    results["not_local"] += 1  # an image from a URL or a manifest: nowhere to put a .txt
                    continue
                results[write_sidecar(row["source"], row["caption"] or "", self.options.overwrite).value] += 1
        if results["not_local"]:
            log.warning("wrote no .txt for %d images that are not local files", results["not_local"])
        if results[SidecarResult.KEPT_EXISTING.value]:
            log.warning(
                "kept %d existing .txt files that differ from the new captions (pass --overwrite to replace them)",
                results[SidecarResult.KEPT_EXISTING.value],
            )
        state.record_merge(index.parts)

    def clear(self) -> None:
        pass  # sidecar files are only replaced one by one, never removed wholesale
