"""Finding a finished output from its name alone, for the commands that read one (`status`, `repair`,
`merge`): which format it is, and where the state of a node share inside it lives.

A caption run is told `--format parquet` and `-o captions/` for a Parquet dataset folder, and a bare
folder means WebDataset shards there, so the run never guesses. A command that reads an existing folder
can look instead: a folder whose state (`.caprl`, or `.caprl-share-<i>-of-<n>`) records `parquet` as its
format, or that holds Parquet files and no state saying otherwise, is a dataset folder. Only names and
the state's small fingerprint file are read; nothing is opened for writing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from caprl_cli.errors import UsageError
from caprl_cli.outputs.parquet_dataset import STATE_NAME, DatasetFolder
from caprl_cli.settings import output_format_for
from caprl_cli.storage import StorageOptions, local_path_of

_SHARE_STATE = re.compile(re.escape(STATE_NAME) + r"-share-(\d+)-of-(\d+)")


def share_states(location: str) -> list[tuple[int, int]]:
    """(index, count) of every share whose state lies in the local folder `location`, in order."""
    local = local_path_of(location)
    if local is None or not local.is_dir():
        return []
    found = (_SHARE_STATE.fullmatch(path.name) for path in local.iterdir() if path.is_dir())
    return sorted((int(match.group(1)), int(match.group(2))) for match in found if match)


def recorded_format(state_dir: Path) -> str | None:
    """The output format a state folder's fingerprint records; None if it records none (older states,
    which no dataset folder has) or cannot be read."""
    try:
        return json.loads((state_dir / "fingerprint.json").read_text(encoding="utf-8")).get("output_format")
    except (OSError, ValueError, AttributeError):
        return None


def is_dataset_location(location: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether `location` is an existing folder holding a Parquet dataset: a state in it records
    `parquet`, or (no state in it records a format: none, or a merged folder's summary) it holds
    `.parquet` files. A WebDataset folder's state records `webdataset`, a sidecar folder's `sidecar`;
    an older state records no format, and its folder holds no Parquet files."""
    local = local_path_of(location)
    if local is not None:
        if not local.is_dir():
            return False
        states = [path for path in local.iterdir() if path.name == STATE_NAME or _SHARE_STATE.fullmatch(path.name)]
        formats = {recorded_format(path) for path in states if path.is_dir()}
        if formats - {None}:  # a caption run's state says (a merged folder's `.caprl` holds only a summary)
            return "parquet" in formats
        return any(path.suffix == ".parquet" and path.is_file() for path in local.iterdir())
    from caprl_cli.storage import filesystem

    fs, inner = filesystem(location, storage_options)
    if not fs.isdir(inner):
        return False
    return any(name.endswith(".parquet") for name in DatasetFolder.of(location, storage_options).names())


def located_format(location: str, requested: str | None, storage_options: StorageOptions | None = None) -> str:
    """The format of an existing output: `--format`, else a dataset folder is `parquet`, else its name."""
    if requested is None and is_dataset_location(location, storage_options):
        return "parquet"
    return output_format_for(location, requested)


def as_dataset_folder(location: str, output_format: str, storage_options: StorageOptions | None = None) -> str:
    """`location` with the trailing `/` that names a dataset folder, when it is an existing folder read
    as Parquet (a reading command may omit the `/` a caption run needs)."""
    if output_format != "parquet" or location.endswith("/"):
        return location
    local = local_path_of(location)
    if local is not None:
        return location + "/" if local.is_dir() else location
    return location + "/" if is_dataset_location(location, storage_options) else location


def share_of_options(num_shards: int | None, shard_index: int | None) -> tuple[int, int] | None:
    """`--num-shards N --shard-index I` of a reading command, checked, as `OutputOptions.share` holds it."""
    from caprl_cli.settings import validate_share

    validate_share(num_shards, shard_index)
    return None if num_shards is None or shard_index is None else (shard_index, num_shards)


def missing_state_hint(location: str, share: tuple[int, int] | None) -> str:
    """What to say when no state was found: which shares' states the folder does hold."""
    found = share_states(location)
    if not found or share in found:
        return ""
    names = ", ".join(f"--num-shards {count} --shard-index {index}" for index, count in found)
    return f"; the folder holds the states of node shares: pass one of {names}"


def check_recorded_share(stored: dict | None, share: tuple[int, int] | None, label: str) -> None:
    """Refuse `--num-shards/--shard-index` that name another share than the state records."""
    if share is None or stored is None:
        return
    recorded = stored.get("share")
    wanted = {"index": share[0], "count": share[1]}
    if recorded != wanted:
        what = f"share {recorded['index']} of {recorded['count']}" if recorded else "the whole of the work"
        raise UsageError(
            f"the state of {label} records {what}, not share {share[0]} of {share[1]} (--num-shards/--shard-index)"
        )
