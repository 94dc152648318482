"""Atomic writes, in one place: a file is either absent, the old one, or the whole new one.

Every file caprl publishes or commits (parts, outputs, summaries, state records, sidecar captions,
shards) is written under a hidden temporary name beside its final name, made durable, then renamed,
so a crash at any instant never leaves half a file under a real name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def temp_path_for(path: Path) -> Path:
    """A hidden sibling of `path`, so the final rename stays on one filesystem."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


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
