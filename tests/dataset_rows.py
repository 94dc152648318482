"""Rows, dataset targets and committed parts for the Parquet dataset folder tests, written without a
model: what a caption run would commit, so that publishing, shares and repair are tested on their own."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.parquet_dataset import DatasetTarget
from caprl_cli.outputs.rows import PART_SCHEMA, caption_row, error_row
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import PartWriter, new_run_id

MODEL = "tiny"


def ok(key: str) -> dict:
    return {**caption_row(key=key, source=f"/in/{key}", model=MODEL, caption="c", finish_reason="stop",
                          prompt_tokens=1, output_tokens=1, width=28, height=28), "signature": "s"}


def bad(key: str) -> dict:
    return {**error_row(key=key, source=f"/in/{key}", model=MODEL, kind=ErrorKind.DECODE, message="no"),
            "signature": "s"}


def target_of(folder: Path, rows_per_file: int = 3, share: tuple[int, int] | None = None) -> DatasetTarget:
    target = open_target(f"{folder}/", [], OutputOptions("parquet", rows_per_file=rows_per_file, share=share))
    assert isinstance(target, DatasetTarget)
    return target


def commit_rows(state: RunState, rows: list[dict]) -> None:
    """Commit `rows` as one run's parts, one row per part (as a run flushing often does)."""
    parts = PartWriter(state.parts_dir, new_run_id(), flush_rows=1, schema=PART_SCHEMA)
    for row in rows:
        parts.add(row)
    parts.close()


def keys_of(folder: Path) -> list[str]:
    """The keys of every row in the folder's Parquet files, sorted."""
    return sorted(pq.read_table(folder)["key"].to_pylist())
