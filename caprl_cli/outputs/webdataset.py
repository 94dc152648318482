"""WebDataset output: the committed rows published into numbered tar shards, incrementally.

Which shard holds each row is kept in the state (column `wds_shard` of the compacted part); the tar
files themselves are written by `tar_shards`. With `--num-captions N` > 1 a sample's `.txt` holds its
first caption and its `.json` row also holds all N (`captions`, `finish_reasons`, `output_token_counts`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.faults import crash_point
from caprl_cli.outputs.base import OutputOptions, OutputTarget, cache_state_dir
from caprl_cli.outputs.place import check_folder, check_names_fit
from caprl_cli.outputs.row_writers import ParquetRowWriter
from caprl_cli.outputs.rows import EXPORTED_SHARD, IMAGE_COLUMNS, PART_SCHEMA, STATUS_OK, output_columns
from caprl_cli.outputs.table import compacted_part_path
from caprl_cli.outputs.tar_shards import (
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
from caprl_cli.state.folder import RunState
from caprl_cli.state.index import CommittedIndex
from caprl_cli.storage import local_path_of

log = logging.getLogger("caprl")


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
        super().remove_stale_temporaries()

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

    def check_place(self, state: RunState) -> None:
        local = local_path_of(self.directory)
        if local is not None:
            names = [shard_name(self.pattern, 0), self.summary_location().rsplit("/", 1)[-1]]
            if state.dir.parent == local:
                names.append(state.dir.name)
            check_names_fit(local, names, "output")
            check_folder(local, "output folder")
        super().check_place(state)

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
            columns=output_columns(self.options.num_captions),
        )
        compacted = ParquetRowWriter(compacted_part_path(state), schema=COMPACTED_SCHEMA)
        stale_keys = withdrawn_by_shard(exported, index)
        written = 0
        try:
            # Captioned samples first, error samples after them: readers that infer a layout from the
            # first samples (datasets' webdataset builder) then see image, .txt and .json.
            for captioned in (True, False):
                for table in latest_of_status(index, captioned):
                    has_exported = EXPORTED_SHARD in table.column_names
                    numbers = table[EXPORTED_SHARD].to_pylist() if has_exported else [None] * table.num_rows
                    has_images = "image" in table.column_names
                    columns = [name for name in writer.columns if name in table.column_names]
                    for i, row in enumerate(table.select(columns).to_pylist()):
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
                        without_images(table).append_column(EXPORTED_SHARD, pa.array(numbers, pa.int32()))
                    )
            writer.close()
            crash_point("wds.shards_written")
            for number, keys in sorted(stale_keys.items()):
                rewrite_without(self.directory, shard_name(self.pattern, number), keys, self.storage_options)
            crash_point("wds.stale_rewritten")
            compacted.commit({"exported_rows": written})
            crash_point("wds.compacted")
        except BaseException:
            writer.abort()
            compacted.abort()
            raise
        state.record_merge([compacted.path])
        crash_point("wds.recorded")
        for part in index.parts:
            part.unlink(missing_ok=True)
        log.debug("published %d rows into WebDataset shards", written)

COMPACTED_SCHEMA = PART_SCHEMA.append(pa.field(EXPORTED_SHARD, pa.int32()))
IMAGE_COLUMN_NAMES = {field.name for field in IMAGE_COLUMNS}


def without_images(table: pa.Table) -> pa.Table:
    """A part's rows as the compacted part keeps them: every part column (the signature included, which
    older parts lack) but the image bytes, which live in the published shards from now on."""
    return table.select([name for name in PART_SCHEMA.names if name in table.column_names])


def latest_of_status(index: CommittedIndex, captioned: bool) -> Iterator[pa.Table]:
    """Per part, the latest rows of their keys that are captioned (or errors), with every column the
    part has (image bytes only for captioned rows: error rows never carry an image)."""
    for table in index.latest_tables(drop=() if captioned else IMAGE_COLUMN_NAMES):
        ok = pc.equal(table["status"], STATUS_OK)
        yield table.filter(ok if captioned else pc.invert(ok))


def withdrawn_by_shard(exported: dict[str, int], index: CommittedIndex) -> dict[int, set[str]]:
    """Shard number -> member keys of published rows whose key the index no longer holds: placeholder
    rows (`<shard>@0`) withdrawn since, dropped from their shard like rows replaced by --retry-errors."""
    if not exported:
        return {}
    keys = pa.array(list(exported), pa.string())
    gone = pc.invert(pc.is_in(keys, value_set=index.latest["key"].combine_chunks()))
    found: dict[int, set[str]] = {}
    for key in keys.filter(gone).to_pylist():
        found.setdefault(exported[key], set()).add(member_key(key))
    return found


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
