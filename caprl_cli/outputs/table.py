"""Parquet and JSONL outputs: one file rebuilt from the committed parts, latest row per key, one atomic commit.

Parts are read one at a time, so merging a million rows needs memory for one part plus the key index.
A key captioned again (`--retry-errors`) keeps only its newest row. When many small parts have piled
up (a long run flushes every few seconds), the same pass also writes them as one compacted part and
drops the small ones, so later resume scans read a few files instead of thousands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caprl_cli.outputs.base import OutputTarget, cache_state_dir
from caprl_cli.outputs.row_writers import ParquetRowWriter, open_writer
from caprl_cli.outputs.rows import COLUMNS
from caprl_cli.state.folder import PART_PREFIX, PART_SUFFIX, RunState, state_dir_for
from caprl_cli.state.index import CommittedIndex
from caprl_cli.state.parts import new_run_id
from caprl_cli.storage import exists, local_path_of, remove, upload

# More committed parts than this are compacted into one while merging.
COMPACT_ABOVE_PARTS = 64


def merge_output(
    state: RunState, index: CommittedIndex, output_format: str, provenance: dict[str, Any], path: Path | None = None
) -> None:
    """Write the output file (`path`, default the state's output) from `index`'s parts and record which
    parts it was built from."""
    path = path or state.output
    assert path is not None, "a merge needs an output file"
    writer = open_writer(output_format, path)
    compacted_path = compacted_part_path(state) if len(index.parts) > COMPACT_ABOVE_PARTS else None
    compacted = ParquetRowWriter(compacted_path) if compacted_path else None
    try:
        for latest in index.latest_tables(list(COLUMNS)):
            writer.write_table(latest)
            if compacted is not None:
                compacted.write_table(latest)
        writer.commit(provenance)
    except BaseException:
        writer.abort()
        if compacted is not None:
            compacted.abort()
        raise
    if compacted is None or compacted_path is None:
        state.record_merge(index.parts)
        return
    compacted.commit({"compacted_parts": len(index.parts)})
    # The compacted part sorts after the parts it replaces and holds the same latest rows, so a crash
    # before every old part is gone leaves nothing a later run could misread.
    state.record_merge([compacted_path])
    for part in index.parts:
        part.unlink(missing_ok=True)


def compacted_part_path(state: RunState) -> Path:
    """A part name that sorts after every part committed so far."""
    return state.parts_dir / f"{PART_PREFIX}{new_run_id()}-compacted{PART_SUFFIX}"


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
