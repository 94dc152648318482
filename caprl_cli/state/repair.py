"""`caprl repair OUTPUT`: rebuild a state whose parts cannot be read from the published output.

A damaged part stops every run (the output must never shrink because of the state), and nothing is
ever set aside automatically. Recovery is this explicit step, under the run's lock:

1. the rows the published output holds (a Parquet or JSONL file: its rows; WebDataset: the `.json` of
   every sample plus the shard that holds it) become one part with sequence 0, older than every other
   part, so rows committed after the last merge still win;
2. the readable parts the output was last built from are dropped: the output holds their latest rows,
   and their superseded rows must not win over the rebuilt ones (what a merge's compaction does);
3. the unreadable parts move to `<state>/unreadable/`; if any of them was committed after the last
   merge, its rows exist nowhere else, so the records of finished tar shards move there too and the
   next run reads those shards again (keys already committed are skipped);
4. the merge is recorded: the output is current if no newer parts remain.

Each step leaves a state a later run or a second `caprl repair` can use, whatever instant it is killed.
Sidecar outputs cannot be rebuilt: `.txt` files do not hold status, errors or sources.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from caprl_cli.errors import StateError, UsageError
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions, OutputTarget
from caprl_cli.outputs.locate import as_dataset_folder, check_recorded_share, located_format, missing_state_hint
from caprl_cli.outputs.parquet_dataset import DATASET_FILE, FILES_KEY, PUBLISHED_SCHEMA, DatasetTarget
from caprl_cli.outputs.row_writers import ParquetRowWriter
from caprl_cli.outputs.rows import EXPORTED_SHARD, PART_SCHEMA
from caprl_cli.outputs.table import FileTarget
from caprl_cli.outputs.tar_shards import shard_documents, shard_name
from caprl_cli.outputs.webdataset import COMPACTED_SCHEMA, ShardTarget
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import new_run_id
from caprl_cli.state.sequence import REBUILT_SEQUENCE, part_name
from caprl_cli.storage import StorageOptions, open_input

UNREADABLE_DIR = "unreadable"
BATCH_ROWS = 4096


def repair_state(
    output: str,
    output_format: str | None,
    state_dir: Path | None,
    storage_options: StorageOptions | None = None,
    share: tuple[int, int] | None = None,
) -> str:
    """Repair the state of `output` (see the module docstring); one line saying what was done. A folder
    holding a Parquet dataset is one without --format; `share` (index, count) names a node share's state
    inside it."""
    found_format = located_format(output, output_format, storage_options)
    output = as_dataset_folder(output, found_format, storage_options)
    if found_format == "sidecar":
        raise UsageError(
            "a sidecar output cannot be rebuilt (its .txt files hold no status, errors or sources): "
            "restore the unreadable part, or pass --overwrite to caption again from scratch"
        )
    options = OutputOptions(
        output_format=found_format, state_dir=state_dir, storage_options=storage_options, share=share
    )
    target = open_target(output, [output], options)
    state = RunState(target.local_file, state_dir=target.state_dir, label=target.label)
    if not state.exists():
        hint = missing_state_hint(output, share) if state_dir is None else ""
        raise UsageError(f"no caprl run has written {target.label} (no state folder {state.dir}){hint}")
    check_recorded_share(state.stored_fingerprint(), share, target.label)
    state.acquire(wait=False)
    try:
        return repair(state, target)
    finally:
        state.release()


def repair(state: RunState, target: OutputTarget) -> str:
    """Rebuild `state` (already locked) from what `target` published."""
    damaged: list[Path] = []
    index = state.committed(damaged=damaged)
    if not damaged:
        return f"nothing to repair: every state part of {target.label} can be read"
    published = target.exists()
    merged = set(state.merged_parts() or []) if published else set()
    rebuilt, rows = (write_rebuilt_part(state, target) if published else (None, 0))
    superseded = [part for part in index.parts if part.name in merged]
    for part in superseded:
        part.unlink(missing_ok=True)
    aside = state.dir / UNREADABLE_DIR
    aside.mkdir(exist_ok=True)
    for part in damaged:
        os.replace(part, free_name(aside, part.name))
    lost = [part for part in damaged if part.name not in merged]
    shards_aside = lost and state.shards_dir.is_dir() and any(state.shards_dir.iterdir())
    if shards_aside:
        shutil.move(state.shards_dir, free_name(aside, f"shards-{new_run_id()}"))
    if rebuilt is not None:
        state.record_merge([rebuilt])
    kept = len(index.parts) - len(superseded)
    what = [f"set aside {len(damaged)} unreadable part(s) in {aside}"]
    what.append(
        f"rebuilt {rows} rows from the published output as {rebuilt.name}" if rebuilt is not None
        else f"nothing is published at {target.label} to rebuild rows from"
    )
    what.append(f"kept {kept} part(s) committed since the last merge")
    if shards_aside:
        what.append("tar shards will be read again for rows only the unreadable parts held")
    return f"repaired the state of {target.label}: " + "; ".join(what)


def free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/name.<n>` if something set aside earlier already has that name."""
    candidate, n = folder / name, 1
    while candidate.exists():
        candidate, n = folder / f"{name}.{n}", n + 1
    return candidate


def write_rebuilt_part(state: RunState, target: OutputTarget) -> tuple[Path, int]:
    """The published rows as the state's oldest part (sequence 0); (its path, its row count)."""
    schema = COMPACTED_SCHEMA if isinstance(target, ShardTarget) else PART_SCHEMA
    recorded: dict[str, Any] = {}
    if isinstance(target, DatasetTarget):  # its rows, with the file each is in, and which files are its own
        schema, recorded = PUBLISHED_SCHEMA, {FILES_KEY: target.file_names()}
    path = state.parts_dir / part_name(REBUILT_SEQUENCE, new_run_id(), "rebuilt")
    state.parts_dir.mkdir(parents=True, exist_ok=True)
    writer = ParquetRowWriter(path, schema=schema)
    rows = 0
    try:
        for batch in published_rows(target, schema):
            writer.write_table(batch)
            rows += batch.num_rows
        writer.commit({"rebuilt_from": target.label, "rows": rows, **recorded})
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, (OSError, ValueError, KeyError, tarfile.TarError, pa.ArrowException)):
            raise StateError(
                f"the published output {target.label} cannot be read ({' '.join(str(exc).split())[:200]}), "
                "so the state cannot be rebuilt from it; nothing was changed"
            ) from None
        raise
    return path, rows


def published_rows(target: OutputTarget, schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows `target` published, in batches with `schema`'s columns (what the output lacks is null)."""
    if isinstance(target, ShardTarget):
        for number in target.numbers():
            name = shard_name(target.pattern, number)
            documents = shard_documents(target.directory, name, target.storage_options)
            yield from batches((as_part_row(document, {EXPORTED_SHARD: number}) for document in documents), schema)
        return
    if isinstance(target, DatasetTarget):
        for name in target.file_names():
            with target.folder.open(name) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS):
                    table = pa.Table.from_batches([batch])
                    yield conform(table.append_column(DATASET_FILE, pa.array([name] * table.num_rows)), schema)
        return
    if not isinstance(target, FileTarget):
        raise UsageError(f"{target.label} cannot be rebuilt into a state")
    with open_input(target.location, target.storage_options) as handle:
        if target.options.output_format == "parquet":
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS):
                yield conform(pa.Table.from_batches([batch]), schema)
            return
        lines = (line for line in (raw.strip() for raw in handle) if line)
        yield from batches((as_part_row(json.loads(line)) for line in lines), schema)


def batches(rows: Iterator[dict[str, Any]], schema: pa.Schema) -> Iterator[pa.Table]:
    """`rows` as tables of at most BATCH_ROWS rows with `schema` (keys it lacks are null)."""
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= BATCH_ROWS:
            yield pa.Table.from_pylist(chunk, schema=schema)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=schema)


def as_part_row(document: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A published JSON row back as a part row: `meta` (parsed in WebDataset `.json`) as JSON text."""
    row = dict(document)
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, str):
        row["meta"] = json.dumps(meta, ensure_ascii=False)
    return {**row, **(extra or {})}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns: those it lacks are null, the rest cast."""
    columns = [
        table[field.name].cast(field.type) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
