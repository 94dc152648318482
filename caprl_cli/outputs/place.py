"""Where an output and its state go: refuse, before anything runs, a place caprl must not or cannot write.

Exit code 2 promises that nothing changed, so every reason a run could not write its output, summary or
state is found here, up front: a name too long to derive the summary's or the state's name from, a
device, FIFO or folder where a file would be replaced, a folder that is a file, a folder that is not
writable (read-only mounts included, which stop root too). Only regular files and caprl's own folders
are ever replaced.
"""

from __future__ import annotations

import contextvars
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from caprl_cli.errors import UsageError
from caprl_cli.outputs.atomic import name_fits

# Inside `without_probes()` (a dry run), writability is judged by permissions alone: no probe file is created.
_NO_PROBES: contextvars.ContextVar[bool] = contextvars.ContextVar("caprl_no_probes", default=False)


@contextmanager
def without_probes() -> Iterator[None]:
    """Run the place checks without creating anything, not even a probe file: a dry run writes nothing,
    so it asks the permission bits (a read-only mount still shows, as it fails `os.access`)."""
    token = _NO_PROBES.set(True)
    try:
        yield
    finally:
        _NO_PROBES.reset(token)


def probes_allowed() -> bool:
    """Whether checks may create (and remove) probe files and folders: not inside `without_probes()`."""
    return not _NO_PROBES.get()


def check_names_fit(folder: Path, names: Iterable[str], what: str) -> None:
    """Refuse if any of `names` (an output's own and those derived from it) is too long for one file name."""
    for name in names:
        if not name_fits(name):
            raise UsageError(
                f"{what} name is too long: {name[:40]}... in {folder} would be over 255 bytes; use a shorter name"
            )


def kind_of(path: Path) -> str | None:
    """What is at `path` without following a final symlink: None if nothing, else a word for it."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a file where a folder would be)
        return None
    if stat.S_ISLNK(mode):
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return "a dangling symlink"
    for test, word in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def check_replaceable_file(path: Path, what: str) -> None:
    """`path` may be written only if nothing is there or a regular file is (with or without --overwrite)."""
    found = kind_of(path)
    if found not in (None, "a regular file"):
        raise UsageError(f"{what} {path} is {found}; caprl only ever replaces regular files")


def check_folder(path: Path, what: str) -> None:
    """`path` is a folder caprl may create and write in: an existing folder or nothing, under a
    writable folder. The check leaves nothing behind (a probe file is created and removed)."""
    found = kind_of(path)
    if found not in (None, "a directory"):
        raise UsageError(f"{what} {path} is {found}, not a folder")
    existing = path
    while kind_of(existing) is None and existing.parent != existing:
        existing = existing.parent
        found = kind_of(existing)
        if found not in (None, "a directory"):
            raise UsageError(f"cannot create {what} {path}: {existing} is {found}, not a folder")
    if _NO_PROBES.get():
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write {what} {path}: permission denied in {existing}")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".caprl-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write {what} {path}: {exc.strerror or exc} in {existing}") from None


def check_own_state_folder(path: Path, foreign: list[str]) -> None:
    """A state folder that holds what caprl never writes is someone else's: never used, never replaced."""
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(
            f"state folder {path} holds files caprl did not write ({shown}); "
            "give --state-dir an empty or caprl-made folder"
        )
