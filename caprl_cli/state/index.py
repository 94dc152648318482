"""The committed index: for every committed key, where its latest row is and what its status is.

Built from the state's parts with Arrow, reading only the index columns, so resuming over millions of
rows costs a scan of small columns, not of captions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.outputs.rows import STATUS_OK, kind_of_error

@dataclass(frozen=True)
class CommittedIndex:
    """For every committed key, its latest row: which part and row it is in, and its status.

    Built with Arrow from the key, status and error columns only: about 50 MB of index per million
    rows, with a peak of a few hundred MB while it is built (see bench/README.md).
    """

    parts: list[Path]
    latest: pa.Table  # columns: key, status, error, part (int32), row (int64)

    @property
    def size(self) -> int:
        return self.latest.num_rows

    def keys(self, ok_only: bool = False) -> pa.Array:
        table = self.latest
        if ok_only:
            table = table.filter(pc.equal(table["status"], STATUS_OK))
        return table["key"].combine_chunks()

    def status_by_key(self) -> dict[str, bool]:
        """Committed key -> captioned ok, for lookups one sample at a time (streamed shards)."""
        ok = pc.equal(self.latest["status"], STATUS_OK).to_pylist()
        return dict(zip(self.latest["key"].to_pylist(), ok, strict=True))

    def error_counts(self) -> dict[str, int]:
        """Committed error rows by kind."""
        errors = self.latest.filter(pc.equal(self.latest["status"], "error"))["error"]
        counts = Counter(kind_of_error(text) or "" for text in pc.utf8_slice_codeunits(errors, 0, 64).to_pylist())
        return dict(sorted(counts.items()))

    def rows_by_part(self) -> list[np.ndarray]:
        """For each part, in order, the sorted row numbers that hold the latest row of their key."""
        ordered = self.latest.sort_by([("part", "ascending"), ("row", "ascending")])
        part_of_row = ordered["part"].to_numpy()
        rows = ordered["row"].to_numpy()
        bounds = np.searchsorted(part_of_row, np.arange(len(self.parts) + 1), side="left")
        return [rows[bounds[i] : bounds[i + 1]] for i in range(len(self.parts))]

    def latest_tables(
        self, columns: list[str] | None = None, drop: Collection[str] = (), skip: Collection[str] = ()
    ) -> Iterator[pa.Table]:
        """Part by part, the rows that are the latest of their key: `columns` (default all the part
        has) less `drop`, for parts not named in `skip`. One part in memory at a time."""
        for part, rows in zip(self.parts, self.rows_by_part(), strict=True):
            if len(rows) == 0 or part.name in skip:
                continue
            with pq.ParquetFile(part) as parquet:
                names = columns if columns is not None else parquet.schema_arrow.names
                table = parquet.read(columns=[name for name in names if name not in drop])
            yield table if len(rows) == table.num_rows else table.take(rows)
