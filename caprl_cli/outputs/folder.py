"""A folder of output files that may be local or remote: the part WebDataset shards and Parquet dataset
folders share.

Both grow a folder by whole files, each built elsewhere and then given its real name in one step, so a
reader never sees half a file: locally by a rename (done by each format's own writer), remotely by an
upload to a hidden name and a `mv` (`upload`). Listing, removing and reading back work alike for both.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from caprl_cli.faults import crash_point
from caprl_cli.storage import filesystem, local_path_of


@dataclass(frozen=True)
class OutputFolder:
    """An output folder: a local path, or an fsspec filesystem and the path inside it."""

    local: Path | None
    fs: Any = None
    root: str = ""

    @classmethod
    def of(cls, location: str, options: dict | None) -> Self:
        local = local_path_of(location)
        if local is not None:
            return cls(local)
        fs, root = filesystem(location, options)
        return cls(None, fs, root.rstrip("/"))

    def names(self) -> list[str]:
        """The names of the folder's entries; none for a folder that does not exist yet."""
        try:
            if self.local is not None:
                return os.listdir(self.local)
            return [str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def upload(self, built: Path, name: str) -> None:
        """Put the local file `built` into the remote folder as `name`, atomically (to a hidden name,
        then mv); `built` is removed either way."""
        remote_temp = f"{self.root}/.{name}.{os.getpid()}.tmp"
        try:
            self.fs.put_file(str(built), remote_temp)
            crash_point("upload.put")
            self.fs.mv(remote_temp, f"{self.root}/{name}")
        except BaseException:
            self._remove_path(remote_temp)
            raise
        finally:
            built.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
        else:
            self._remove_path(f"{self.root}/{name}")

    def _remove_path(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(path)

    def open(self, name: str) -> IO[bytes]:
        return open(self.local / name, "rb") if self.local is not None else self.fs.open(f"{self.root}/{name}", "rb")
