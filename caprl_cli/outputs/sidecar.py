"""Captions as `<image>.txt` beside each image, the layout kohya-ss/sd-scripts and taggui train from.

A sidecar someone wrote by hand is worth more than ours, so an existing one with other content is kept
unless `--replace-sidecars` asks to replace it (`--overwrite` only forgets the state); one with the same
content is simply left alone, which is what a run resumed after a crash sees.

Two images in one folder whose names differ only in their extension (`cat.jpg`, `cat.png`) would share
`cat.txt`; such images get their whole name plus `.txt` instead (`cat.jpg.txt`, `cat.png.txt`), every
other image keeps `<stem>.txt`, and the run names the collision in a warning. Which images collide is
decided from the image files in the folder, so every run over the same folder picks the same names. Each file is written under a hidden temporary name and renamed, so a reader never
sees half a caption, and a symlinked `.txt` is never followed: at most the link itself is replaced.

Names are taken as they are on disk: an image whose name is not valid UTF-8 (its row's source holds
the `%XX` text form) gets its `.txt` under its real bytes, and a temporary name too long for the
filesystem is replaced by a short hashed one. Only a `.txt` name that itself cannot exist (over 255
bytes: `<252+ byte image name>.txt` when stems collide) is not written; the run counts those in a
warning and their captions stay in the state.

With `--num-captions N` > 1 the `.txt` holds the first caption and `<same name>.captions.json` beside it
(`cat.captions.json`, or `cat.jpg.captions.json` when stems collide) holds all N as a JSON list of
strings, written and kept or replaced by the same rules.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Collection
from enum import Enum
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from caprl_cli.inputs.sample import is_hidden, is_image_name, name_from_text
from caprl_cli.outputs.atomic import NAME_MAX, name_fits, temp_path_for
from caprl_cli.faults import crash_point
from caprl_cli.outputs.base import OutputTarget
from caprl_cli.outputs.place import check_folder
from caprl_cli.outputs.rows import STATUS_OK
from caprl_cli.state.folder import RunState
from caprl_cli.state.index import CommittedIndex

log = logging.getLogger("caprl")


class SidecarResult(str, Enum):
    """What `write_sidecar` did."""

    WRITTEN = "written"
    UNCHANGED = "unchanged"  # the file already held exactly this caption
    KEPT_EXISTING = "kept_existing"  # a different (or symlinked, or not regular) file was left alone
    NAME_TOO_LONG = "name_too_long"  # the `.txt` name is longer than a file name may be: not written


def sidecar_path(image_path: str | Path, shared_stems: Collection[str] = ()) -> Path:
    """Same folder, same stem, `.txt`: `cat.jpg` -> `cat.txt`, `a.b.png` -> `a.b.txt`; an image whose
    stem another image in its folder shares (`shared_stems`) keeps its whole name: `cat.jpg.txt`."""
    path = Path(image_path)
    return path.with_name(f"{path.name if path.stem in shared_stems else path.stem}.txt")


def captions_path(image_path: str | Path, shared_stems: Collection[str] = ()) -> Path:
    """Where all captions of an image go with several per image: the sidecar's name with
    `.captions.json` for `.txt` (`cat.jpg` -> `cat.captions.json`)."""
    sidecar = sidecar_path(image_path, shared_stems)
    return sidecar.with_name(sidecar.name[: -len(".txt")] + ".captions.json")


def local_image(source: str) -> Path | None:
    """The local image file a row's `source` names, or None (a URL, a manifest's image, gone).

    A source holds the text form of a name that is not valid UTF-8 (`caf%E9.jpg`, see
    `inputs.sample.name_text`); the file itself has the real bytes, so that form is decoded when the
    source as written names no file."""
    for candidate in (source, name_from_text(source)):
        if candidate is not None and Path(candidate).is_absolute() and Path(candidate).is_file():
            return Path(candidate)
    return None


def shared_stems_in(folder: Path) -> set[str]:
    """Stems that more than one image file in `folder` has (`cat` for `cat.jpg` and `cat.png`)."""
    try:
        names = [name for name in os.listdir(folder) if is_image_name(name) and not is_hidden(name)]
    except OSError:
        return set()
    counts = Counter(Path(name).stem for name in names)
    return {stem for stem, count in counts.items() if count > 1}


def write_sidecar(
    image_path: str | Path, caption: str, replace: bool, shared_stems: Collection[str] = ()
) -> SidecarResult:
    """Write `caption` (UTF-8, as is) to the image's sidecar, unless a different one is there already
    (and not `replace`). Only a regular file or a symlink (the link itself) is ever replaced."""
    return write_file(sidecar_path(image_path, shared_stems), caption.encode("utf-8"), replace)


def write_captions_file(
    image_path: str | Path, captions: list[str], replace: bool, shared_stems: Collection[str] = ()
) -> SidecarResult:
    """Write every caption of the image as a JSON list to `captions_path`, as `write_sidecar` does."""
    data = json.dumps(captions, ensure_ascii=False).encode("utf-8")
    return write_file(captions_path(image_path, shared_stems), data, replace)


def write_file(target: Path, data: bytes, replace: bool) -> SidecarResult:
    """`data` into `target` unless a different file is there already (and not `replace`)."""
    if not name_fits(target.name):  # `<252-byte name>.txt` when stems collide
        return SidecarResult.NAME_TOO_LONG
    if target.is_symlink():
        if not replace:
            return SidecarResult.KEPT_EXISTING
    elif target.exists():
        if not target.is_file():
            return SidecarResult.KEPT_EXISTING
        if _holds(target, data):
            return SidecarResult.UNCHANGED
        if not replace:
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

    def check_place(self, state: RunState) -> None:
        check_folder(Path(self.location), "sidecar folder")
        super().check_place(state)

    def exists(self) -> bool:
        return False  # existing .txt files are handled one by one: kept unless --replace-sidecars

    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None:
        # --replace-sidecars goes over every caption, so files kept by earlier runs are replaced too.
        already = set() if self.options.replace_sidecars else set(state.merged_parts() or [])
        results: Counter[str] = Counter()
        stems: dict[Path, set[str]] = {}
        collided: dict[Path, set[str]] = {}
        several = self.options.num_captions > 1
        columns = ["source", "caption", "status", *(["captions"] if several else [])]
        for table in index.latest_tables(columns, skip=already):
            for row in table.filter(pc.equal(table["status"], STATUS_OK)).to_pylist():
                image = local_image(row["source"])
                if image is None:
                    results["not_local"] += 1  # an image from a URL or a manifest: nowhere to put a .txt
                    continue
                shared = stems.setdefault(image.parent, shared_stems_in(image.parent))
                if image.stem in shared:
                    collided.setdefault(image.parent, set()).add(image.stem)
                results[write_sidecar(image, row["caption"] or "", self.options.replace_sidecars, shared).value] += 1
                if several and row.get("captions") is not None:
                    write_captions_file(image, row["captions"], self.options.replace_sidecars, shared)
                crash_point("sidecar.txt")
        if results["not_local"]:
            log.warning("wrote no .txt for %d images that are not local files", results["not_local"])
        warn_collisions(collided)
        if results[SidecarResult.NAME_TOO_LONG.value]:
            log.warning(
                "wrote no .txt for %d images whose name is too long to add .txt to (over %d bytes); their "
                "captions are in the state only",
                results[SidecarResult.NAME_TOO_LONG.value],
                NAME_MAX,
            )
        if results[SidecarResult.KEPT_EXISTING.value]:
            log.warning(
                "kept %d existing .txt files that differ from the new captions (pass --replace-sidecars to replace them)",
                results[SidecarResult.KEPT_EXISTING.value],
            )
        crash_point("sidecar.written")
        state.record_merge(index.parts)


def warn_collisions(collided: dict[Path, set[str]], shown: int = 3) -> None:
    """One warning line naming images that share a stem, and where their captions went instead."""
    groups = [(folder, stem) for folder, found in sorted(collided.items()) for stem in sorted(found)]
    if not groups:
        return
    named = "; ".join(
        " and ".join(sorted(p.name for p in folder.iterdir() if p.stem == stem and is_image_name(p.name)))
        + f" in {folder}"
        for folder, stem in groups[:shown]
    )
    more = f" (and {len(groups) - shown} more)" if len(groups) > shown else ""
    log.warning(
        "images share a name up to the extension: %s%s; each gets <image name>.txt (e.g. cat.jpg.txt) instead of "
        "<stem>.txt",
        named,
        more,
    )
