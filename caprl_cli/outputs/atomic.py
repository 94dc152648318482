"""Atomic writes, in one place: a file is either absent, the old one, or the whole new one.

Every file caprl publishes or commits (parts, outputs, summaries, state records, sidecar captions,
shards) is written under a hidden temporary name beside its final name, made durable, then renamed,
so a crash at any instant never leaves half a file under a real name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

# The longest file name most filesystems take (ext4, xfs, btrfs, APFS: 255 bytes).
NAME_MAX = 255
TEMP_SUFFIX = ".tmp"


def name_fits(name: str) -> bool:
    """Whether `name` is short enough to be one file name on common filesystems."""
    return len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX


def short_name_of(name: str) -> str:
    """A fixed-length stand-in for a name too long to derive others from (`caprl-<16 hex>`)."""
    return "caprl-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def temp_path_for(path: Path) -> Path:
    """A hidden sibling of `path`, so the final rename stays on one filesystem: `.<name>.<pid>.tmp`,
    or `.caprl-<hash>.<pid>.tmp` when that would be longer than a file name may be."""
    temp = f".{path.name}.{os.getpid()}{TEMP_SUFFIX}"
    if not name_fits(temp):
        temp = f".{short_name_of(path.name)}.{os.getpid()}{TEMP_SUFFIX}"
    return path.with_name(temp)


def temp_name_pattern(name: str) -> re.Pattern[str]:
    """Matches every temporary name `temp_path_for` gives a file called `name` (any process id)."""
    forms = (re.escape(f".{name}."), re.escape(f".{short_name_of(name)}."))
    return re.compile(f"(?:{'|'.join(forms)})" + r"\d+" + re.escape(TEMP_SUFFIX))


def fsync_rename(temp: Path, final: Path) -> None:
    """Make `temp` durable, then atomically give it its final name."""
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON document so that readers see either the old one or the whole new one."""
    temp = temp_path_for(path)
    temp.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_rename(temp, path)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or filesystem cannot, and nothing was changed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(first))
