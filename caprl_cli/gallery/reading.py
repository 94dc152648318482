"""The published rows of an output, in any format, streamed: never the whole output in memory.

A gallery is made for outputs of millions of rows, so each format is read the way it can be read in
pieces: Parquet by record batches of only the columns the page shows, JSONL line by line, WebDataset
shard by shard (with each sample's own image bytes, when the shards carry images), a Parquet dataset
folder file by file, and a sidecar
folder from its state's parts one at a time (the `.txt` files hold no status, errors or sources).
The run's provenance comes from where each format keeps it: the Parquet key-value metadata, else the
summary JSON beside the output (in the state folder for sidecar outputs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caprl_cli.errors import UsageError
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions, OutputTarget
from caprl_cli.outputs.row_writers import PROVENANCE_KEY
from caprl_cli.outputs.sidecar import SidecarTarget
from caprl_cli.outputs.table import FileTarget
from caprl_cli.outputs.tar_shards import shard_rows, shard_name
from caprl_cli.outputs.webdataset import ShardTarget
from caprl_cli.settings import output_format_for
from caprl_cli.storage import StorageOptions, local_path_of, open_input, read_bytes, redact

# The columns a gallery reads; the rest (meta, signatures) stay on disk.
# `captions` holds every caption of a row when the run made several per image (--num-captions).
COLUMNS = (
    "key", "source", "caption", "status", "error", "finish_reason", "output_tokens", "width", "height", "model",
    "captions",
)
BATCH_ROWS = 4096


@dataclass(frozen=True)
class PublishedRow:
    """One row of the output, and the image the output itself carries for it (WebDataset with images)."""

    row: dict[str, Any]
    image: bytes | None = None
    image_ext: str | None = None


def find_target(
    output: str, output_format: str | None, storage_options: StorageOptions, state_dir: Path | None = None
) -> OutputTarget:
    """The target a caption run with this `-o` (and `--format`) published to. A local folder without
    `--format` holds WebDataset shards; without shards, Parquet dataset files; without either, sidecar
    captions when it has a caprl state."""
    try:
        found = output_format_for(output, output_format)
    except UsageError:
        raise UsageError(
            f"cannot tell the format of {redact(output)}: name a .parquet or .jsonl file or a folder, or pass --format"
        ) from None
    options = OutputOptions(output_format=found, state_dir=state_dir, storage_options=storage_options)
    target = open_target(output, [output], options)
    if output_format is None and isinstance(target, ShardTarget) and not target.numbers():
        # A folder without shards: a Parquet dataset folder, else sidecar captions with their state.
        folder_name = output if output.endswith("/") else output + "/"
        dataset = open_target(folder_name, [output], dataclasses.replace(options, output_format="parquet"))
        folder = local_path_of(output)
        if not isinstance(dataset, FileTarget) and dataset.exists():
            target = dataset
        elif folder is not None and (folder / ".caprl").is_dir():
            target = SidecarTarget(str(folder), OutputOptions(output_format="sidecar", state_dir=state_dir))
    if not target.exists() and not isinstance(target, SidecarTarget):
        raise UsageError(f"nothing is published at {target.label}: run caprl caption first")
    return target


def published_rows(target: OutputTarget) -> Iterator[PublishedRow]:
    """Every row `target` publishes, in its stored order (so a seeded sample is repeatable)."""
    if isinstance(target, ShardTarget):
        yield from _shard_rows(target)
    elif isinstance(target, SidecarTarget):
        yield from _state_rows(target)
    elif isinstance(target, FileTarget) and target.options.output_format == "parquet":
        yield from _parquet_rows(target.location, target.storage_options)
    elif hasattr(target, "file_names"):  # a Parquet dataset folder: its files in order
        for name in target.file_names():
            yield from _parquet_rows(f"{target.directory}/{name}", target.storage_options)
    elif isinstance(target, FileTarget):
        yield from _jsonl_rows(target)
    else:
        raise UsageError(f"caprl gallery cannot read {target.label}")


def _parquet_rows(location: str, storage_options: StorageOptions) -> Iterator[PublishedRow]:
    import pyarrow.parquet as pq

    with open_input(location, storage_options) as handle:
        parquet = pq.ParquetFile(handle)
        present = [name for name in COLUMNS if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
            for row in batch.to_pylist():
                yield PublishedRow(row)


def _jsonl_rows(target: FileTarget) -> Iterator[PublishedRow]:
    with open_input(target.location, target.storage_options) as handle:
        for raw in handle:
            line = raw.strip()
            if line:
                document = json.loads(line)
                yield PublishedRow({name: document.get(name) for name in COLUMNS})


def _shard_rows(target: ShardTarget) -> Iterator[PublishedRow]:
    for number in target.numbers():
        name = shard_name(target.pattern, number)
        for document, image, ext in shard_rows(target.directory, name, target.storage_options):
            yield PublishedRow({name: document.get(name) for name in COLUMNS}, image, ext)


def _state_rows(target: SidecarTarget) -> Iterator[PublishedRow]:
    """A sidecar output's rows: the latest row of every key in its state, one part at a time."""
    from caprl_cli.state.folder import RunState
    from caprl_cli.status import read_committed

    state = RunState(None, state_dir=target.state_dir, label=target.label)
    if not state.exists():
        raise UsageError(f"no caprl run has written sidecar captions in {target.label} (no state folder {state.dir})")
    index, _ = read_committed(state)
    for table in index.latest_tables(list(COLUMNS)):
        for row in table.to_pylist():
            yield PublishedRow({name: row.get(name) for name in COLUMNS})


def read_provenance(target: OutputTarget) -> dict[str, Any] | None:
    """What produced the output: the Parquet metadata, else the summary JSON; None when neither is there."""
    first = target.location if isinstance(target, FileTarget) else None
    if hasattr(target, "file_names"):  # a Parquet dataset folder: every file carries the provenance
        names = target.file_names()
        first = f"{target.directory}/{names[-1]}" if names else None
    if first is not None and target.options.output_format == "parquet":
        import pyarrow.parquet as pq

        try:
            with open_input(first, target.storage_options) as handle:
                metadata = pq.ParquetFile(handle).metadata.metadata or {}
            stored = metadata.get(PROVENANCE_KEY.encode())
            if stored:
                return json.loads(stored)
        except (OSError, ValueError):
            pass
    try:
        return json.loads(read_bytes(target.summary_location(), target.storage_options))
    except (OSError, ValueError):
        return None
