"""Walk a local folder for images (and shards) in sorted order, never opening an image.

A real disk holds more than files and folders: FIFOs, sockets and devices (opening a FIFO blocks
forever), symlinks that loop or point nowhere, folders nobody may read (`lost+found`). None of them
may stop a run. The walk decides what each entry is from a stat, before anything is opened:

- an image (or shard) file is found; other regular files and hidden entries are passed over;
- a folder is walked, once: a symlink back to a folder already walked is skipped, so loops end;
- a folder that cannot be listed is `UnreadableFolder` (the run makes it a `read` error row, so the
  loss shows in the output) and the walk goes on;
- a symlink loop, a dangling link, a FIFO, socket or device, or an entry gone since the folder was
  listed is skipped and counted in `WalkSkips`, which the run reports in one warning line.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import is_hidden, is_image_name, printable_text, stat_signature


@dataclass(frozen=True)
class FoundFile:
    """A file the walk found, and its signature from the stat the walk made anyway."""

    path: Path
    signature: str


@dataclass(frozen=True)
class UnreadableFolder:
    """A folder under the root that could not be listed: whatever it holds is lost to this run."""

    path: Path
    reason: str


Found = FoundFile | UnreadableFolder


class WalkSkips(Counter[str]):
    """How many entries the walk skipped, by reason (`symlink loop`, `FIFO`, ...)."""

    def described(self) -> str:
        """`2 symlink loops, 1 FIFO`, in a fixed order."""
        return ", ".join(f"{count} {_plural(reason, count)}" for reason, count in sorted(self.items()))


def special_file_kind(mode: int) -> str | None:
    """What a stat mode is when it is neither a regular file nor a folder: `FIFO`, `socket` or
    `device`; None for files and folders. Such entries are never opened."""
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "special file"


def walk_images(
    root: Path,
    _seen: set[tuple[int, int]] | None = None,
    wanted: Callable[[str], bool] = is_image_name,
    skips: WalkSkips | None = None,
) -> Iterator[Found]:
    """Yield the files under `root` whose name is `wanted` (images by default) in sorted order, and
    the folders under it that cannot be listed, skipping hidden files and folders.

    Symlinked folders are followed once each, so a link back to an ancestor cannot loop. Each entry is
    stat'ed once (following links); that stat both tells folders from files and signs the file. Only
    `root` itself failing to list is a usage error: the user named it.
    """
    skips = WalkSkips() if skips is None else skips
    seen = set() if _seen is None else _seen
    try:
        info = root.stat()
    except OSError as exc:
        raise UsageError(f"cannot list {printable_text(str(root))}: {exc.strerror or exc}") from None
    seen.add((info.st_dev, info.st_ino))
    try:
        entries = _sorted_entries(root)
    except OSError as exc:
        raise UsageError(f"cannot list {printable_text(str(root))}: {exc.strerror or exc}") from None
    yield from _walk_entries(entries, seen, wanted, skips)


def _sorted_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as listing:
        return sorted(listing, key=lambda entry: entry.name)


def _walk_entries(
    entries: list[os.DirEntry[str]], seen: set[tuple[int, int]], wanted: Callable[[str], bool], skips: WalkSkips
) -> Iterator[Found]:
    for entry in entries:
        if is_hidden(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=True)
        except OSError as exc:
            skips[_stat_failure(entry, exc)] += 1
            continue
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                skips["link to a folder already walked"] += 1
                continue
            seen.add((info.st_dev, info.st_ino))
            try:
                children = _sorted_entries(Path(entry.path))
            except OSError as exc:
                yield UnreadableFolder(Path(entry.path), f"cannot list folder: {exc.strerror or exc}")
                continue
            yield from _walk_entries(children, seen, wanted, skips)
        elif stat.S_ISREG(info.st_mode):
            if wanted(entry.name):
                yield FoundFile(Path(entry.path), stat_signature(info))
        else:
            skips[special_file_kind(info.st_mode) or "special file"] += 1


def _stat_failure(entry: os.DirEntry[str], exc: OSError) -> str:
    """Why an entry listed in its folder could not be stat'ed, as a skip reason."""
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and entry.is_symlink():
        return "dangling link"
    if exc.errno == errno.ENOENT:
        return "entry gone while listing"
    return f"entry that cannot be examined ({exc.strerror or exc})"


_PLURALS = {
    "link to a folder already walked": "links to a folder already walked",
    "entry gone while listing": "entries gone while listing",
}


def _plural(reason: str, count: int) -> str:
    if count == 1:
        return reason
    if reason.startswith("entry that"):
        return "entries that" + reason[len("entry that") :]
    return _PLURALS.get(reason, reason + "s")
