"""Helpers for end-to-end tests that watch a running `caprl` process: wait for an event, find what it
has committed, read its output by key."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq


def wait_until(condition: Callable[[], object], process: subprocess.Popen, timeout: float = 600) -> object:
    """Poll `condition` until it holds; fails if the run ends first (the event never came). The bound
    only keeps a broken run from hanging the suite; it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the run ended before the event: {process.communicate()[1]}"
        time.sleep(0.05)
    raise AssertionError("the event did not come")


def committed_parts(output: Path) -> list[Path]:
    """The part files committed so far in the state folder of a local Parquet/JSONL output."""
    state = output.parent / f"{output.name}.caprl"
    return [path for path in state.rglob("*.parquet") if not path.name.startswith(".")]


def rows_by_key(output: Path) -> dict[str, list[dict]]:
    """The rows of a Parquet output, grouped by key (a key written twice shows as two rows)."""
    rows: dict[str, list[dict]] = {}
    for row in pq.read_table(output).to_pylist():
        rows.setdefault(row["key"], []).append(row)
    return rows
