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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.errors import UsageError
from caprl_cli.outputs.merge import compacted_part_path, merge_output
from caprl_cli.outputs.rows import EXPORTED_SHARD, IMAGE_COLUMNS, SCHEMA, STATUS_OK
from caprl_cli.state.folder import CommittedIndex, RunState, state_dir_for
from caprl_cli.outputs.sidecar import SidecarResult, write_sidecar
from caprl_cli.storage import StorageOptions, exists, local_path_of, redact, remove, require_backend, upload
from caprl_cli.outputs.webdataset import (
    DEFAULT_SHARD_PATTERN,
    ShardSetWriter,
    existing_shard_numbers,
    member_key,
    remove_shards,
    remove_stale_temporaries,
    rewrite_without,
    shard_name,
    shard_number,
    split_output_pattern,
)
from caprl_cli.outputs.table import ParquetRowWriter, write_json_atomically

log = logging.getLogger("caprl")

DEFAULT_SHARD_SIZE = 10_000


@dataclass(frozen=True)
class OutputOptions:
    """How a target is written: its format, shard size, whether images travel, where state lives."""

    output_format: str
    shard_size: int = DEFAULT_SHARD_SIZE
    with_images: bool = True
    state_dir: Path | None = None
    storage_options: StorageOptions | None = None
    overwrite: bool = False


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

    @abstractmethod
    def default_state_dir(self) -> Path: ...

    @abstractmethod
    def summary_location(self) -> str: ...

    @abstractmethod
    def exists(self) -> bool:
        """Whether something is already published here (refused without state unless --overwrite)."""

    @abstractmethod
    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None: ...

    @abstractmethod
    def clear(self) -> None:
        """Remove what this target published (for --overwrite)."""

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


class FileTarget(OutputTarget):
    """A single Parquet or JSONL file, rebuilt from the parts whenever they changed."""

    def default_state_dir(self) -> Path:
        path = local_path_of(self.location)
        return state_dir_for(path) if path is not None else cache_state_dir(self.location)

    @property
    def local_file(self) -> Path | None:
        return local_path_of(self.location)

    def summary_location(self) -> str:
        return self.location + ".summary.json"

    def exists(self) -> bool:
        return exists(self.location, self.storage_options)

    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None:
        local = self.local_file
        if local is not None:
            merge_output(state, index, self.options.output_format, provenance, local)
            return
        staged = state.dir / f"upload-{Path(self.location.rstrip('/')).name}"
        merge_output(state, index, self.options.output_format, provenance, staged)
        try:
            upload(staged, self.location, self.storage_options)
        except BaseException:
            state.merged_path.unlink(missing_ok=True)  # not published: the next run must upload again
            raise
        finally:
            staged.unlink(missing_ok=True)

    def clear(self) -> None:
        for location in (self.location, self.summary_location()):
            remove(location, self.storage_options)


class ShardTarget(OutputTarget):
    """WebDataset shards: each row once, published incrementally.

    A run appends new shards for the rows no shard holds yet; rows that replace an earlier one
    (`--retry-errors`) are dropped from the shard that held the old row. Which shard holds a row is
    kept in the state (column `wds_shard` of the compacted part), and shards numbered past the last
    one recorded are leftovers of a crash, removed before publishing again.
    """

    def __init__(self, location: str, options: OutputOptions) -> None:
        super().__init__(location, options)
        self.directory, self.pattern = split_output_pattern(location)

    @property
    def keeps_images(self) -> bool:
        return self.options.with_images

    @property
    def tag(self) -> str:
        """Names this pattern's state and summary, so two patterns can share a folder: empty for the
        default pattern, else the pattern without `%` and `.tar` (`train-%05d.tar` -> `train-05d`)."""
        return "" if self.pattern == DEFAULT_SHARD_PATTERN else self.pattern[: -len(".tar")].replace("%", "")

    def default_state_dir(self) -> Path:
        path = local_path_of(self.directory)
        name = f".caprl-{self.tag}" if self.tag else ".caprl"
        return path / name if path is not None else cache_state_dir(self.location)

    def remove_stale_temporaries(self) -> None:
        remove_stale_temporaries(self.directory, self.pattern, self.storage_options)

    def is_own_file(self, path: Path) -> bool:
        local = local_path_of(self.directory)
        return (
            local is not None
            and path.parent.resolve() == local.resolve()
            and shard_number(self.pattern, path.name) is not None
        )

    def summary_location(self) -> str:
        name = f"{self.tag}.summary.json" if self.tag else "summary.json"
        return self.directory.rstrip("/") + "/" + name

    def exists(self) -> bool:
        return bool(self.numbers())

    def numbers(self) -> list[int]:
        return existing_shard_numbers(self.directory, self.pattern, self.storage_options)

    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None:
        exported = exported_shards(index)
        next_number = max(exported.values(), default=-1) + 1
        present = self.numbers()
        missing = set(exported.values()) - set(present)
        if missing:  # deleted by hand: their images are no longer in the state to write them again
            log.warning(
                "%d shards that hold published rows are missing from %s; pass --overwrite to start over",
                len(missing),
                self.label,
            )
        leftovers = [number for number in present if number >= next_number]
        remove_shards(self.directory, self.pattern, leftovers, self.storage_options)
        writer = ShardSetWriter(
            self.directory,
            self.pattern,
            first_number=next_number,
            shard_size=self.options.shard_size,
            with_images=self.options.with_images,
            storage_options=self.storage_options,
        )
        compacted = ParquetRowWriter(compacted_part_path(state), schema=COMPACTED_SCHEMA)
        stale_keys: dict[int, set[str]] = {}
        written = 0
        try:
            # Captioned samples first, error samples after them: readers that infer a layout from the
            # first samples (datasets' webdataset builder) then see image, .txt and .json.
            for captioned in (True, False):
                for table in latest_of_status(index, captioned):
                    has_exported = EXPORTED_SHARD in table.column_names
                    numbers = table[EXPORTED_SHARD].to_pylist() if has_exported else [None] * table.num_rows
                    has_images = "image" in table.column_names
                    for i, row in enumerate(table.select(list(SCHEMA.names)).to_pylist()):
                        if numbers[i] is not None:
                            continue
                        old = exported.get(row["key"])
                        if old is not None:
                            stale_keys.setdefault(old, set()).add(member_key(row["key"]))
                        image = table["image"][i].as_py() if has_images else None
                        ext = table["image_ext"][i].as_py() if has_images else None
                        writer.add(row, image, ext)
                        numbers[i] = next_number + written // self.options.shard_size
                        written += 1
                    compacted.write_table(
                        table.select(list(SCHEMA.names)).append_column(EXPORTED_SHARD, pa.array(numbers, pa.int32()))
                    )
            writer.close()
            for number, keys in sorted(stale_keys.items()):
                rewrite_without(self.directory, shard_name(self.pattern, number), keys, self.storage_options)
            compacted.commit({"exported_rows": written})
        except BaseException:
            writer.abort()
            compacted.abort()
            raise
        state.record_merge([compacted.path])
        for part in index.parts:
            part.unlink(missing_ok=True)
        log.debug("published %d rows into WebDataset shards", written)

    def clear(self) -> None:
        remove_shards(self.directory, self.pattern, self.numbers(), self.storage_options)


COMPACTED_SCHEMA = SCHEMA.append(pa.field(EXPORTED_SHARD, pa.int32()))
IMAGE_COLUMN_NAMES = {field.name for field in IMAGE_COLUMNS}


def latest_of_status(index: CommittedIndex, captioned: bool) -> Iterator[pa.Table]:
    """Per part, the latest rows of their keys that are captioned (or errors), with every column the
    part has (image bytes only for captioned rows: error rows never carry an image)."""
    for table in index.latest_tables(drop=() if captioned else IMAGE_COLUMN_NAMES):
        ok = pc.equal(table["status"], STATUS_OK)
        yield table.filter(ok if captioned else pc.invert(ok))


def exported_shards(index: CommittedIndex) -> dict[str, int]:
    """Key -> the shard that holds its row, for every row already published into a shard."""
    found: dict[str, int] = {}
    for part in index.parts:
        with pq.ParquetFile(part) as parquet:
            if EXPORTED_SHARD not in parquet.schema_arrow.names:
                continue
            table = parquet.read(columns=["key", EXPORTED_SHARD])
        table = table.filter(pc.is_valid(table[EXPORTED_SHARD]))
        found.update(zip(table["key"].to_pylist(), table[EXPORTED_SHARD].to_pylist(), strict=True))
    return found


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


def open_target(location: str | None, inputs: list[str], options: OutputOptions) -> OutputTarget:
    """The target for `-o` and `--format`."""
    if options.output_format == "sidecar":
        folder = location or first_local_folder(inputs)
        return SidecarTarget(folder, options)
    if location is None:
        raise UsageError("missing option -o/--output (only --format sidecar writes without one)")
    require_backend(location)
    if options.output_format == "webdataset":
        return ShardTarget(location, options)
    return FileTarget(location, options)


def first_local_folder(inputs: list[str]) -> str:
    """Sidecar runs keep their state in the first input folder unless -o names another folder."""
    for raw in inputs:
        path = local_path_of(raw)
        if path is not None and path.is_dir():
            return str(path)
        if path is not None and path.is_file():
            return str(path.parent)
    raise UsageError("--format sidecar writes .txt files beside local images: give a local folder or image")


