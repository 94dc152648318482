"""`caprl merge`: finished outputs (the shares of `--num-shards`, say) joined into one output.

Every key once. When a key is in several outputs, an `ok` row wins over an error row; otherwise the
row of the output finished latest (its provenance's `run.finished_at`; for equal times, the one named
later on the command line). Outputs captioned with other settings (model, prompt, sampling, pixel
limits) are refused unless forced, and the merged provenance lists every input's own.

A Parquet dataset folder (`-o captions/ --format parquet`) is read as one output: its `*.parquet` files
in name order, its provenance from each file's key-value metadata (every file's settings are checked,
the latest `finished_at` stands for the folder). With `--format parquet` and a folder (`merged/`) the
merged output is such a folder too: files named and bounded (`--rows-per-file`) as a caption run
names them, each written whole under a temporary name, the summary in `<folder>/.caprl/`.

The merge streams: a first pass reads only keys and statuses into one index (a few dozen bytes a
row), a second pass copies the winning rows batch by batch into the output's writer. The output is
published atomically like every caption output: a file under a temporary name renamed when whole,
WebDataset shards each whole, and the summary last.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.errors import UsageError
from caprl_cli.outputs import rows as contract
from caprl_cli.outputs.atomic import write_json_atomically
from caprl_cli.defaults import DEFAULT_ROWS_PER_FILE, DEFAULT_SHARD_SIZE
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.locate import is_dataset_location
from caprl_cli.outputs.parquet_dataset import DatasetFolder, DatasetTarget, FileSequence
from caprl_cli.outputs.row_writers import PROVENANCE_KEY, ParquetRowWriter, open_writer
from caprl_cli.outputs.rows import SCHEMA, STATUS_OK
from caprl_cli.outputs.table import FileTarget
from caprl_cli.outputs.tar_shards import (
    ShardSetWriter,
    existing_shard_numbers,
    remove_shards,
    shard_name,
    shard_rows,
    split_output_pattern,
)
from caprl_cli.outputs.webdataset import ShardTarget
from caprl_cli.outputs.provenance import totals_of, utc_now
from caprl_cli.storage import StorageOptions, exists, local_path_of, open_input, redact, upload

log = logging.getLogger("caprl")

MERGEABLE_FORMATS = ("parquet", "jsonl", "webdataset")
BATCH_ROWS = 8192
# Provenance fields that decide what a caption says: outputs that differ in one are not merged unless
# forced. `grid_factor` and versions are facts of the model and machine, not settings.
CAPTIONING_FIELDS = ("engine", "model", "revision", "prompt", "system_prompt", "sampling")
PIXEL_SETTINGS = ("min_pixels", "max_pixels", "max_image_pixels")
RULE = "ok over error; otherwise the output finished latest (run.finished_at), then the one named later"
# Columns an output may hold beyond the contract's (several captions per image), typed as parts type them.
_EXTRA_FIELDS = {f.name: f for f in getattr(contract, "MULTI_CAPTION_FIELDS", ())}


@dataclass
class MergeInput:
    """One finished output to merge: where it is, its format, and what its provenance says."""

    location: str
    output_format: str
    storage_options: StorageOptions = field(default_factory=dict)
    provenance: dict[str, Any] | None = None
    rows: int = 0
    dataset: bool = False  # a Parquet dataset folder: its `*.parquet` files, in name order
    file_provenance: list[dict[str, Any] | None] = field(default_factory=list)  # dataset: each file's
    listed: list[str] | None = None  # dataset: its files as first listed, so both passes read the same

    @property
    def label(self) -> str:
        return redact(self.location)

    def data_files(self) -> list[str]:
        """A dataset folder's Parquet files, by name (hidden state folders and temporaries left out)."""
        if self.listed is None:
            names = DatasetFolder.of(self.location, self.storage_options).names()
            self.listed = sorted(name for name in names if name.endswith(".parquet") and not name.startswith((".", "_")))
        return self.listed

    def open_file(self, name: str):  # noqa: ANN201
        return DatasetFolder.of(self.location, self.storage_options).open(name)

    @property
    def finished_at(self) -> str:
        return str(((self.provenance or {}).get("run") or {}).get("finished_at") or "")

    def check_exists(self) -> None:
        if self.dataset:
            if not self.data_files():
                raise UsageError(f"merge input {self.label} holds no Parquet files")
        elif self.output_format == "webdataset":
            directory, pattern = split_output_pattern(self.location)
            if not existing_shard_numbers(directory, pattern, self.storage_options):
                raise UsageError(f"merge input {self.label} holds no WebDataset shards")
        elif not exists(self.location, self.storage_options):
            raise UsageError(f"merge input {self.label} does not exist")

    def read_provenance(self) -> dict[str, Any] | None:
        """The provenance the output carries: Parquet key-value metadata, else its summary JSON. A
        dataset folder's: the latest-finished of its files' (all of them are kept for the checks)."""
        if self.dataset:
            self.file_provenance = []
            for name in self.data_files():
                with self.open_file(name) as handle:
                    metadata = pq.ParquetFile(handle).metadata.metadata or {}
                raw = metadata.get(PROVENANCE_KEY.encode())
                self.file_provenance.append(json.loads(raw) if raw else None)
            known = [record for record in self.file_provenance if record is not None]
            if len(known) < len(self.file_provenance):
                return None
            return max(known, key=lambda record: str((record.get("run") or {}).get("finished_at") or ""))
        if self.output_format == "parquet":
            with open_input(self.location, self.storage_options) as handle:
                metadata = pq.ParquetFile(handle).metadata.metadata or {}
            if PROVENANCE_KEY.encode() in metadata:
                return json.loads(metadata[PROVENANCE_KEY.encode()])
        summary = self.summary_location()
        if not exists(summary, self.storage_options):
            return None
        with open_input(summary, self.storage_options) as handle:
            return json.loads(handle.read().decode("utf-8"))

    def summary_location(self) -> str:
        return target_for(self.location, self.output_format, self.storage_options).summary_location()

    def columns(self) -> list[str]:
        """The output's column names (Parquet schema, else the first row's; a dataset's: all its files')."""
        if self.dataset:
            names: list[str] = []
            for name in self.data_files():
                with self.open_file(name) as handle:
                    names += [column for column in pq.ParquetFile(handle).schema_arrow.names if column not in names]
            return names
        if self.output_format == "parquet":
            with open_input(self.location, self.storage_options) as handle:
                return list(pq.ParquetFile(handle).schema_arrow.names)
        for table, _ in self.batches(with_images=False):
            return list(table.column_names)
        return list(SCHEMA.names)

    def batches(self, columns: list[str] | None = None, with_images: bool = False) -> Iterator[tuple[pa.Table, list[tuple[bytes | None, str | None]] | None]]:
        """The output's rows in a fixed order, as tables of at most BATCH_ROWS rows, each with the
        (image bytes, extension) of its rows when `with_images` and the output is WebDataset."""
        if self.dataset:
            for name in self.data_files():
                with self.open_file(name) as handle:
                    parquet = pq.ParquetFile(handle)
                    present = [column for column in columns or parquet.schema_arrow.names if column in parquet.schema_arrow.names]
                    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
                        yield pa.Table.from_batches([batch]), None
        elif self.output_format == "parquet":
            with open_input(self.location, self.storage_options) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    yield pa.Table.from_batches([batch]), None
        elif self.output_format == "jsonl":
            yield from _grouped(self._jsonl_rows(), columns)
        else:
            yield from _grouped(self._shard_rows(with_images), columns)

    def _jsonl_rows(self) -> Iterator[tuple[dict[str, Any], None]]:
        with open_input(self.location, self.storage_options, stream=True) as handle:
            for n, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line), None
                    except ValueError:
                        raise UsageError(f"merge input {self.label}: line {n} is not JSON") from None

    def _shard_rows(self, with_images: bool) -> Iterator[tuple[dict[str, Any], tuple[bytes | None, str | None] | None]]:
        directory, pattern = split_output_pattern(self.location)
        for number in existing_shard_numbers(directory, pattern, self.storage_options):
            for document, image, ext in shard_rows(directory, shard_name(pattern, number), self.storage_options):
                meta = document.get("meta")
                if meta is not None and not isinstance(meta, str):  # shards hold meta parsed (`row_json`)
                    document["meta"] = json.dumps(meta, ensure_ascii=False)
                yield document, ((image, ext) if with_images else None)


def _grouped(
    rows: Iterator[tuple[dict[str, Any], tuple[bytes | None, str | None] | None]], columns: list[str] | None
) -> Iterator[tuple[pa.Table, list[tuple[bytes | None, str | None]] | None]]:
    """Rows as tables of BATCH_ROWS rows (with the contract's types), with their images alongside."""
    batch: list[dict[str, Any]] = []
    images: list[tuple[bytes | None, str | None]] = []
    has_images = False
    for row, image in rows:
        batch.append(row)
        images.append(image or (None, None))
        has_images = has_images or image is not None
        if len(batch) >= BATCH_ROWS:
            yield _table_of(batch, columns), (images if has_images else None)
            batch, images, has_images = [], [], False
    if batch:
        yield _table_of(batch, columns), (images if has_images else None)


def _table_of(rows: list[dict[str, Any]], columns: list[str] | None) -> pa.Table:
    names = columns or [name for name in rows[0] if name in SCHEMA.names or name in _EXTRA_FIELDS]
    schema = pa.schema([SCHEMA.field(name) if name in SCHEMA.names else _EXTRA_FIELDS[name] for name in names])
    return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows], schema=schema)


def target_for(  # noqa: ANN201
    location: str, output_format: str, storage_options: StorageOptions | None, rows_per_file: int = DEFAULT_ROWS_PER_FILE
):
    options = OutputOptions(output_format=output_format, storage_options=storage_options, rows_per_file=rows_per_file)
    if output_format == "webdataset":
        return ShardTarget(location, options)
    if is_dataset(location, output_format, storage_options):
        return DatasetTarget(location, options)
    return FileTarget(location, options)


def is_dataset(location: str, output_format: str, storage_options: StorageOptions | None) -> bool:
    """Whether a Parquet merge input or output is a dataset folder: a name ending in `/`, or a folder."""
    return output_format == "parquet" and (location.endswith("/") or is_folder(location, storage_options))


def format_of(location: str, requested: str | None, storage_options: StorageOptions | None) -> str:
    """The format of a merge input or output: `--format`, else a folder holding a Parquet dataset
    (outputs/locate.py), else its name (`.parquet`, `.jsonl`, a shard pattern or a folder), else a remote
    or local folder is WebDataset shards."""
    from caprl_cli.settings import output_format_for

    try:
        if requested is None and is_dataset_location(location, storage_options):
            return "parquet"
        found = output_format_for(location, requested)
    except UsageError:
        if requested is None and is_folder(location, storage_options):
            return "webdataset"
        raise
    if found not in MERGEABLE_FORMATS:
        raise UsageError(f"cannot merge {found} outputs: merge Parquet, JSONL or WebDataset outputs")
    return found


def is_folder(location: str, storage_options: StorageOptions | None) -> bool:
    local = local_path_of(location)
    if local is not None:
        return local.is_dir()
    from caprl_cli.storage import filesystem

    fs, inner = filesystem(location, storage_options)
    return bool(fs.isdir(inner))


def captioning_settings(provenance: dict[str, Any]) -> dict[str, Any]:
    """What decides a caption, from a provenance record (older records lack `revision`: None)."""
    found = {name: provenance.get(name) for name in CAPTIONING_FIELDS}
    pixels = provenance.get("pixels") or {}
    found["pixels"] = {name: pixels.get(name) for name in PIXEL_SETTINGS}
    return found


def differing_settings(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Names of the captioning settings in which two provenance records differ."""
    a, b = captioning_settings(first), captioning_settings(other)
    names = [name for name in a if a[name] != b[name]]
    revisions = first.get("model_revision"), other.get("model_revision")
    if all(revisions) and revisions[0] != revisions[1]:
        names.append("model_revision")
    return names


def place_identity(location: str, output_format: str) -> str:
    """What two spellings of one output have in common (a local path resolved; shards by folder and pattern)."""
    if output_format == "webdataset":
        directory, pattern = split_output_pattern(location)
        local = local_path_of(directory)
        return f"{local.resolve() if local is not None else directory.rstrip('/')}/{pattern}"
    local = local_path_of(location)
    return str(local.resolve()) if local is not None else location


@dataclass
class MergeReport:
    output: str
    inputs: int
    rows: int
    duplicates: int
    forced: bool
    elapsed_s: float

    def __str__(self) -> str:
        line = f"merged {self.inputs} outputs into {self.output}: {self.rows} rows"
        if self.duplicates:
            noun = "key was" if self.duplicates == 1 else "keys were"
            line += f" ({self.duplicates} {noun} in more than one: ok beats error, else the latest output's row)"
        if self.forced:
            line += "; settings differed (--force)"
        return line + f" in {self.elapsed_s:.1f}s"


def merge_outputs(
    locations: list[str],
    output: str,
    *,
    output_format: str | None = None,
    force: bool = False,
    storage_options: StorageOptions | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    with_images: bool = True,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> MergeReport:
    """Join finished outputs into `output`; every check runs before anything is written."""
    started = time.monotonic()
    options = storage_options or {}
    inputs = plan_inputs(locations, options)
    fmt = merged_format(output, output_format, inputs[0].output_format, options)
    check_output_place(output, fmt, inputs, options)
    forced = check_settings(inputs, force)
    winners, duplicates = pick_winners(inputs)
    columns = merged_columns(inputs)

    def provenance_for(totals: dict[str, Any]) -> dict[str, Any]:
        return merged_provenance(inputs, output, fmt, totals, duplicates, forced, started)

    totals = write_merged(
        inputs, winners, output, fmt, columns, options, shard_size, with_images, provenance_for, rows_per_file
    )
    write_summary(target_for(output, fmt, options).summary_location(), provenance_for(totals), options)
    return MergeReport(redact(output), len(inputs), totals["images"], duplicates, forced, time.monotonic() - started)


def plan_inputs(locations: list[str], options: StorageOptions) -> list[MergeInput]:
    """The inputs, checked: each exists, all in one format, none named twice."""
    if not locations:
        raise UsageError("missing argument OUTPUT: name the outputs to merge")
    inputs = [MergeInput(location, format_of(location, None, options), options) for location in locations]
    for item in inputs:
        item.dataset = is_dataset(item.location, item.output_format, options)
    formats = sorted({item.output_format for item in inputs})
    if len(formats) > 1:
        raise UsageError(f"cannot merge outputs of different formats ({', '.join(formats)}): convert one first")
    seen: set[str] = set()
    for item in inputs:
        identity = place_identity(item.location, item.output_format)
        if identity in seen:
            raise UsageError(f"merge input {item.label} is named twice")
        seen.add(identity)
        item.check_exists()
        item.provenance = item.read_provenance()
    return inputs


def merged_format(output: str, requested: str | None, inputs_format: str, options: StorageOptions) -> str:
    """`--format`, else the merged output's name, else the inputs' format."""
    try:
        return format_of(output, requested, options)
    except UsageError:
        if requested is None:
            return inputs_format
        raise


def check_output_place(output: str, fmt: str, inputs: list[MergeInput], options: StorageOptions) -> None:
    """Refuse an output that is one of the inputs, or that a caption run keeps a state for."""
    identity = place_identity(output, fmt)
    for item in inputs:
        if place_identity(item.location, item.output_format) == identity:
            raise UsageError(f"the merged output {redact(output)} is one of the inputs; merge into another place")
    target = target_for(output, fmt, options)
    if isinstance(target, DatasetTarget):
        check_dataset_place(target)
        return
    state = target.default_state_dir()
    if local_path_of(output) is not None and state.exists():
        raise UsageError(
            f"{redact(output)} is the output of a caption run (state folder {state}); merge into another place"
        )
    local = local_path_of(output)
    if fmt != "webdataset" and local is not None and local.is_dir():
        raise UsageError(
            f"the merged output {output} is a folder; name a .{fmt} file"
            + (", or end it with / for a Parquet dataset folder" if fmt == "parquet" else "")
        )


def check_dataset_place(target: DatasetTarget) -> None:
    """A merged dataset folder holds nothing but its own files: refuse one a caption run keeps a state in
    (`.caprl`, `.caprl-share-*` with a fingerprint), or one holding Parquet files not named as a merge
    names them (another share's, or someone else's); an earlier merge's files are replaced."""
    from caprl_cli.outputs.locate import share_states

    local = local_path_of(target.directory)
    if local is not None:
        if local.exists() and not local.is_dir():
            raise UsageError(f"the merged output {target.label} is a file; name a folder ending in /")
        if (local / ".caprl" / "fingerprint.json").is_file() or share_states(target.directory):
            raise UsageError(f"{target.label} is the output of a caption run (it holds its state); merge into another place")
    foreign = [
        name for name in target.folder.names()
        if name.endswith(".parquet") and not name.startswith(".") and target.number_of(name) is None
    ]
    if foreign:
        raise UsageError(
            f"the merged output {target.label} holds other Parquet files ({foreign[0]}, ...); merge into an empty folder"
        )


def check_settings(inputs: list[MergeInput], force: bool) -> bool:
    """Refuse inputs captioned with other settings than the first (or without provenance) unless
    `force`; returns whether the merge went ahead despite a difference."""
    first = inputs[0]
    problems: list[str] = []
    for item in inputs:
        if item.provenance is None:
            problems.append(f"{item.label} records no provenance (its summary JSON is missing)")
    if not problems:
        for item in inputs:
            assert first.provenance is not None and item.provenance is not None
            # A dataset folder's files may come from several runs (or shares): each is checked.
            for record in item.file_provenance if item.dataset else [item.provenance]:
                names = differing_settings(first.provenance, record or {})
                if names:
                    problems.append(
                        f"{item.label} was captioned with other settings than {first.label} ({', '.join(names)} differ)"
                    )
                    break
    if problems and not force:
        raise UsageError(f"{problems[0]}; pass --force to merge anyway")
    for problem in problems:
        log.warning("merging anyway (--force): %s", problem)
    return bool(problems)


@dataclass
class Winners:
    """Per input, which of its rows (by position) go into the merged output, and which are ok."""

    keep: list[np.ndarray]
    ok: list[np.ndarray]


def pick_winners(inputs: list[MergeInput]) -> tuple[Winners, int]:
    """First pass: keys and statuses only. For every key, the row that wins (see RULE); returns the
    keep masks and how many keys were in more than one input."""
    recency = sorted(range(len(inputs)), key=lambda i: (inputs[i].finished_at, i))
    rank_of = {item: rank for rank, item in enumerate(recency)}
    tables: list[pa.Table] = []
    oks: list[np.ndarray] = []
    for i, item in enumerate(inputs):
        seen = 0
        ok_parts: list[np.ndarray] = []
        for table, _ in item.batches(columns=["key", "status"]):
            ok = pc.fill_null(pc.equal(table["status"], STATUS_OK), False)
            n = table.num_rows
            tables.append(
                pa.table(
                    {
                        "key": table["key"].cast(pa.string()),
                        "ok": ok,
                        "rank": pa.array(np.full(n, rank_of[i], np.int32)),
                        "input": pa.array(np.full(n, i, np.int32)),
                        "position": pa.array(np.arange(seen, seen + n, dtype=np.int64)),
                    }
                )
            )
            ok_parts.append(ok.to_numpy(zero_copy_only=False))
            seen += n
        item.rows = seen
        oks.append(np.concatenate(ok_parts) if ok_parts else np.zeros(0, bool))
    keep = [np.zeros(item.rows, bool) for item in inputs]
    if not tables:
        return Winners(keep, oks), 0
    index = pa.concat_tables(tables).combine_chunks()
    order = index.sort_by([("key", "ascending"), ("ok", "descending"), ("rank", "descending"), ("position", "descending")])
    keys = order["key"]
    first = np.ones(order.num_rows, bool)
    if order.num_rows > 1:
        first[1:] = pc.not_equal(keys.slice(1), keys.slice(0, order.num_rows - 1)).to_numpy(zero_copy_only=False)
    chosen = order.filter(pa.array(first))
    for i in range(len(inputs)):
        mine = chosen.filter(pc.equal(chosen["input"], i))
        keep[i][mine["position"].to_numpy()] = True
    duplicates = int(order.num_rows - chosen.num_rows)
    return Winners(keep, oks), duplicates


def merged_columns(inputs: list[MergeInput]) -> list[str]:
    """The contract's columns, plus the extra columns (several captions) any input holds."""
    extra: list[str] = []
    for item in inputs:
        extra += [name for name in item.columns() if name in _EXTRA_FIELDS and name not in extra]
    return [*SCHEMA.names, *extra]


def write_merged(
    inputs: list[MergeInput],
    winners: Winners,
    output: str,
    fmt: str,
    columns: list[str],
    options: StorageOptions,
    shard_size: int,
    with_images: bool,
    provenance_for: Callable[[dict[str, Any]], dict[str, Any]],
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> dict[str, Any]:
    """Second pass: the winning rows of each input, in input order, into the output (a Parquet file
    carries `provenance_for(totals)` in its metadata; a dataset folder's files carry it without the
    totals, known only at the end, which its summary holds); returns the totals."""
    errors: dict[str, int] = {}
    ok = 0

    def count(table: pa.Table) -> None:
        nonlocal ok
        statuses = table["status"].to_pylist()
        ok += sum(status == STATUS_OK for status in statuses)
        for error in table.filter(pc.invert(pc.fill_null(pc.equal(table["status"], STATUS_OK), False)))["error"].to_pylist():
            kind = contract.kind_of_error(error) or "unknown"
            errors[kind] = errors.get(kind, 0) + 1

    if fmt == "webdataset":
        directory, pattern = split_output_pattern(output)
        writer = ShardSetWriter(
            directory, pattern, first_number=0, shard_size=shard_size, with_images=with_images, storage_options=options
        )
        try:
            # Captioned rows first, errors after: readers that infer a layout from the first samples
            # (datasets' webdataset builder) then see image, .txt and .json, as in caption's shards.
            for captioned in (True, False):
                for table, images in _winning(inputs, winners, columns, captioned, with_images):
                    count(table)
                    for j, row in enumerate(table.to_pylist()):
                        image, ext = images[j] if images is not None else (None, None)
                        writer.add(row, image, ext)
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
        present = existing_shard_numbers(directory, pattern, options)
        remove_shards(directory, pattern, [n for n in present if n >= len(written)], options)  # an earlier merge's
        return totals_of(ok, errors)
    target = target_for(output, fmt, options, rows_per_file)
    if isinstance(target, DatasetTarget):
        schema = pa.schema([SCHEMA.field(name) if name in SCHEMA.names else _EXTRA_FIELDS[name] for name in columns])
        target.remove_stale_temporaries()  # of a merge killed while writing a file
        files = FileSequence(target, 0, provenance_for(None), schema=schema)  # type: ignore[arg-type]
        try:
            for table, _ in _winning(inputs, winners, columns, None, False):
                count(table)
                for _piece in files.add(table):
                    pass
            written = set(files.close())
        except BaseException:
            files.abort()
            raise
        for name in target.file_names():  # an earlier merge's files beyond this one's
            if name not in written:
                target.folder.remove(name)
        return totals_of(ok, errors)
    local = local_path_of(output)
    with tempfile.TemporaryDirectory(prefix="caprl-merge-") as staging:
        path = local if local is not None else Path(staging) / Path(output.rstrip("/")).name
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([SCHEMA.field(name) if name in SCHEMA.names else _EXTRA_FIELDS[name] for name in columns])
        writer = ParquetRowWriter(path, schema=schema) if fmt == "parquet" else open_writer(fmt, path)
        try:
            for table, _ in _winning(inputs, winners, columns, None, False):
                count(table)
                writer.write_table(table)
            totals = totals_of(ok, errors)
            writer.commit(provenance_for(totals))
        except BaseException:
            writer.abort()
            raise
        if local is None:
            upload(path, output, options)
    return totals


def _winning(
    inputs: list[MergeInput], winners: Winners, columns: list[str], captioned: bool | None, with_images: bool
) -> Iterator[tuple[pa.Table, list[tuple[bytes | None, str | None]] | None]]:
    """Each input's winning rows (only ok ones, or only errors, unless `captioned` is None)."""
    for i, item in enumerate(inputs):
        if not winners.keep[i].any():
            continue
        wanted = winners.keep[i] if captioned is None else winners.keep[i] & (winners.ok[i] == captioned)
        if not wanted.any():
            continue
        seen = 0
        reading_images = with_images and captioned is not False and item.output_format == "webdataset"
        for table, images in item.batches(with_images=reading_images):
            mask = wanted[seen : seen + table.num_rows]
            seen += table.num_rows
            if not mask.any():
                continue
            present = set(table.column_names)
            full = pa.table(
                {
                    name: table[name] if name in present else pa.nulls(table.num_rows, _type_of(name))
                    for name in columns
                }
            )
            picked = full.filter(pa.array(mask))
            yield picked, ([images[j] for j in np.flatnonzero(mask)] if images is not None else None)


def _type_of(name: str) -> pa.DataType:
    return SCHEMA.field(name).type if name in SCHEMA.names else _EXTRA_FIELDS[name].type


def merged_provenance(
    inputs: list[MergeInput],
    output: str,
    fmt: str,
    totals: dict[str, Any],
    duplicates: int,
    forced: bool,
    started: float,
) -> dict[str, Any]:
    """The newest input's settings, this output's counts, and every input's own provenance."""
    newest = max(range(len(inputs)), key=lambda i: (inputs[i].finished_at, i))
    base = dict(inputs[newest].provenance or {})
    for name in ("run", "counts", "share", "merge"):
        base.pop(name, None)
    return {
        **base,
        "output": redact(output),
        "format": fmt,
        "share": None,
        "counts": totals,
        "run": {"finished_at": utc_now(), "elapsed_s": round(time.monotonic() - started, 3), "merged": True},
        "merge": {
            "rule": RULE,
            "forced": forced,
            "duplicate_keys": duplicates,
            "inputs": [
                {"location": item.label, "format": item.output_format, "rows": item.rows, "provenance": item.provenance}
                for item in inputs
            ],
        },
    }


def write_summary(location: str, provenance: dict[str, Any], options: StorageOptions) -> None:
    """The summary JSON beside the merged output, written atomically (uploaded when remote)."""
    local = local_path_of(location)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)  # a dataset folder's `.caprl/`
        write_json_atomically(local, provenance)
        return
    with tempfile.TemporaryDirectory(prefix="caprl-merge-") as staging:
        path = Path(staging) / "summary.json"
        write_json_atomically(path, provenance)
        upload(path, location, options)

