"""Parquet and JSONL outputs: one file rebuilt from the committed parts, latest row per key, one atomic commit.

Parts are read one at a time, so merging a million rows needs memory for one part plus the key index.
A key captioned again (`--retry-errors`) keeps only its newest row. When many small parts have piled
up (a long run flushes every few seconds), the same pass also writes them as one compacted part and
drops the small ones, so later resume scans read a few files instead of thousands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from caprl_cli.faults import crash_point
from caprl_cli.outputs.base import OutputTarget, cache_state_dir
from caprl_cli.outputs.place import check_folder, check_names_fit, check_replaceable_file
from caprl_cli.outputs.provenance import summary_path_for
from caprl_cli.outputs.row_writers import ParquetRowWriter, open_writer
from caprl_cli.outputs.rows import PART_SCHEMA, SCHEMA, output_schema
from caprl_cli.state.folder import RunState, state_dir_for
from caprl_cli.state.index import CommittedIndex
from caprl_cli.state.parts import new_run_id
from caprl_cli.state.sequence import next_sequence, part_name
from caprl_cli.storage import exists, local_path_of, remove_stale_uploads, upload

# More committed parts than this are compacted into one while merging.
COMPACT_ABOVE_PARTS = 64


def merge_output(
    state: RunState,
    index: CommittedIndex,
    output_format: str,
    provenance: dict[str, Any],
    path: Path | None = None,
    record: bool = True,
    schema: pa.Schema = SCHEMA,
) -> list[Path]:
    """Write the output file (`path`, default the state's output) from `index`'s parts; return the parts
    it was built from, and record them unless `record` is False (a file still to be uploaded is not
    published yet: its caller records the merge once the upload completed)."""
    path = path or state.output
    assert path is not None, "a merge needs an output file"
    writer = open_writer(output_format, path, schema)
    compacted_path = compacted_part_path(state) if len(index.parts) > COMPACT_ABOVE_PARTS else None
    compacted = ParquetRowWriter(compacted_path, schema=PART_SCHEMA) if compacted_path else None
    try:
        for latest in index.latest_tables(list(PART_SCHEMA.names)):  # the output writer keeps the contract's
            writer.write_table(latest)
            if compacted is not None:
                compacted.write_table(latest)
        crash_point("merge.output_temp")
        writer.commit(provenance)
        crash_point("merge.output_renamed")
    except BaseException:
        writer.abort()
        if compacted is not None:
            compacted.abort()
        raise
    if compacted is None or compacted_path is None:
        if record:
            state.record_merge(index.parts)
        return list(index.parts)
    compacted.commit({"compacted_parts": len(index.parts)})
    crash_point("compact.committed")
    # The compacted part sorts after the parts it replaces and holds the same latest rows, so a crash
    # before every old part is gone leaves nothing a later run could misread.
    if record:
        state.record_merge([compacted_path])
    crash_point("compact.recorded")
    for part in index.parts:
        part.unlink(missing_ok=True)
    return [compacted_path]


def compacted_part_path(state: RunState) -> Path:
    """A part that sorts after every part committed so far: the state's next sequence number."""
    return state.parts_dir / part_name(next_sequence(state.parts_dir), new_run_id(), "compacted")


class FileTarget(OutputTarget):
    """A single Parquet or JSONL file, rebuilt from the parts whenever they changed."""

    @property
    def schema(self) -> pa.Schema:
        """The output's columns: the list columns too with several captions per image."""
        return output_schema(self.options.num_captions)

    def default_state_dir(self) -> Path:
        path = local_path_of(self.location)
        return state_dir_for(path) if path is not None else cache_state_dir(self.location)

    @property
    def local_file(self) -> Path | None:
        return local_path_of(self.location)

    def summary_location(self) -> str:
        return self.location + ".summary.json"

    def remove_stale_temporaries(self) -> None:
        remove_stale_uploads(self.location, self.storage_options)  # a remote upload killed before its rename
        super().remove_stale_temporaries()

    def exists(self) -> bool:
        return exists(self.location, self.storage_options)

    def check_place(self, state: RunState) -> None:
        local = self.local_file
        if local is not None:
            names = [local.name, local.name + ".summary.json"]
            if state.dir.parent == local.parent:
                names.append(state.dir.name)
            check_names_fit(local.parent, names, "output")
            check_replaceable_file(local, "output")
            check_replaceable_file(summary_path_for(local), "summary")
            check_folder(local.parent, "output folder")
        super().check_place(state)

    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None:
        local = self.local_file
        if local is not None:
            merge_output(state, index, self.options.output_format, provenance, local, schema=self.schema)
            return
        staged = state.dir / f"upload-{Path(self.location.rstrip('/')).name}"
        built_from = merge_output(
            state, index, self.options.output_format, provenance, staged, record=False, schema=self.schema
        )
        try:
            upload(staged, self.location, self.storage_options)
            crash_point("upload.done")
        finally:
            staged.unlink(missing_ok=True)
        # Only now is the output current: a run killed or failing before this line leaves the previous
        # record, which names other parts, so the next run merges and uploads again.
        state.record_merge(built_from)

