"""Build the requested output file from the committed parts: latest row per key, one atomic commit.

Parts are read one at a time, so merging a million rows needs memory for one part plus the key index.
A key captioned again (`--retry-errors`) keeps only its newest row.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from caprl_cli.run_state import CommittedIndex, RunState
from caprl_cli.writers import open_writer


def merge_output(state: RunState, index: CommittedIndex, output_format: str, provenance: dict[str, Any]) -> None:
    """Write `state.output` from `index`'s parts and record which parts it was built from."""
    writer = open_writer(output_format, state.output)
    try:
        for part, rows in zip(index.parts, index.rows_by_part()):
            if len(rows) == 0:
                continue
            table = pq.read_table(part)
            writer.write_table(table if len(rows) == table.num_rows else table.take(rows))
        writer.commit(provenance)
    except BaseException:
        writer.abort()
        raise
    state.record_merge(index.parts)
