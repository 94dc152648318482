"""Where a run's captions end up: a Parquet/JSONL file, WebDataset shards, or sidecar .txt files.

Whatever the target, the committed parts in the local state folder are the truth and the target is
built from them at the end of a run (`publish`), so a crash never leaves a target half-written and a
resumed run finishes it. Targets may be remote (`s3://bucket/caps/`): each file is written under a
temporary name and renamed once complete. The state folder always stays on local disk (it needs
flock and fsync); for a remote target it lives in the user's cache unless `--state-dir` says where.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caprl_cli.defaults import DEFAULT_ROWS_PER_FILE, DEFAULT_SHARD_SIZE
from caprl_cli.outputs.atomic import write_json_atomically
from caprl_cli.outputs.place import check_folder, check_own_state_folder
from caprl_cli.state.folder import RunState
from caprl_cli.state.index import CommittedIndex
from caprl_cli.storage import StorageOptions, local_path_of, redact, remove_stale_uploads, upload

log = logging.getLogger("caprl")



@dataclass(frozen=True)
class OutputOptions:
    """How a target is written: its format, shard size, whether images travel, where state lives."""

    output_format: str
    shard_size: int = DEFAULT_SHARD_SIZE
    with_images: bool = True
    state_dir: Path | None = None
    storage_options: StorageOptions | None = None
    replace_sidecars: bool = False  # sidecar: replace existing .txt files that differ
    rows_per_file: int = DEFAULT_ROWS_PER_FILE  # Parquet dataset folder: rows per data file at most
    share: tuple[int, int] | None = None  # --shard-index, --num-shards: a dataset folder names files by share
    num_captions: int = 1  # > 1: rows carry the list columns (rows.output_schema)


def cache_state_dir(location: str) -> Path:
    """The local state folder of a remote target: one per target URL in the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    return cache / "caprl" / "state" / digest


class OutputTarget(ABC):
    """One place captions are published to."""

    def __init__(self, location: str, options: OutputOptions) -> None:
        self.location = location
        self.label = redact(location)
        self.options = options
        self.storage_options = options.storage_options or {}

    @property
    def state_dir(self) -> Path:
        return self.options.state_dir or self.default_state_dir()

    @property
    def keeps_images(self) -> bool:
        """Whether parts must carry each image's original bytes until they are published."""
        return False

    @property
    def local_file(self) -> Path | None:
        """The local output file the state folder guards (temporaries beside it are cleaned up)."""
        return None

    def is_own_file(self, path: Path) -> bool:
        """Whether `path` is a file this target publishes: never an input, even inside an input folder."""
        return False

    def remove_stale_temporaries(self) -> None:
        """Delete what a killed publish left under temporary names (the state folder cleans its own)."""
        remove_stale_uploads(self.summary_location(), self.storage_options)

    def check_place(self, state: RunState) -> None:
        """Refuse (UsageError, nothing touched) a place this target or its state cannot be written to,
        or must not be: run before the state is locked, created or cleared."""
        check_folder(state.dir, "state folder")
        check_own_state_folder(state.dir, state.foreign_entries())

    @abstractmethod
    def default_state_dir(self) -> Path: ...

    @abstractmethod
    def summary_location(self) -> str: ...

    @abstractmethod
    def exists(self) -> bool:
        """Whether something is already published here (refused without state unless --overwrite)."""

    @abstractmethod
    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None: ...

    def write_summary(self, state: RunState, provenance: dict[str, Any]) -> None:
        self.write_json(self.summary_location(), state, provenance)

    def write_json(self, location: str, state: RunState, payload: dict[str, Any]) -> None:
        path = local_path_of(location)
        if path is not None:
            write_json_atomically(path, payload)
            return
        local = state.dir / f".upload-{os.getpid()}.json"
        write_json_atomically(local, payload)
        try:
            upload(local, location, self.storage_options)
        finally:
            local.unlink(missing_ok=True)
