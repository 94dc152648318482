"""The committed index: for every committed key, where its latest row is, what its status is, and
which source and image signature it was made from.

Built from the state's parts with Arrow, reading only the index columns, so resuming over millions of
rows costs a scan of small columns, not of captions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.rows import SIGNATURE, STATUS_ERROR, STATUS_OK, STATUS_WITHDRAWN, kind_of_error

# Error kinds whose rows may name no sample but a place in a stream (`<shard>@<byte>`, `<manifest>@<line>`).
_PLACEHOLDER_KINDS = (ErrorKind.SHARD.value, ErrorKind.UNAVAILABLE.value, ErrorKind.MANIFEST.value)
_UNAVAILABLE_PREFIX = ErrorKind.UNAVAILABLE.value + ":"

# The columns the index reads from every part: a key's latest status, and where its row came from
# (source and image signature), so planning can tell the same image from a different one.
INDEX_COLUMNS = ("key", "status", "error", "source", SIGNATURE)
# Columns that parts written by older versions lack: read as nulls.
_OPTIONAL = {SIGNATURE: pa.string()}


def read_index_columns(parquet: pq.ParquetFile) -> pa.Table:
    """A part's index columns, in `INDEX_COLUMNS` order; a missing optional one (no `signature` in a
    part from an older version) comes back as nulls, a missing required one raises like damage."""
    present = set(parquet.schema_arrow.names)
    table = parquet.read(columns=[name for name in INDEX_COLUMNS if name in present or name not in _OPTIONAL])
    for name, kind in _OPTIONAL.items():
        if name not in present:
            table = table.append_column(pa.field(name, kind), pa.nulls(table.num_rows, kind))
    return table.select(list(INDEX_COLUMNS))


class CommittedOrigin(NamedTuple):
    """Where a committed key's latest row came from, and whether it holds a caption."""

    ok: bool
    source: str | None
    signature: str | None


@dataclass(frozen=True)
class CommittedIndex:
    """For every committed key, its latest row: which part and row it is in, and its status.

    Built with Arrow from the index columns only (key, status, error, source, signature): about 50 MB
    of index per million rows plus the length of their sources, with a peak of a few hundred MB while
    it is built (see bench/README.md).
    """

    parts: list[Path]
    latest: pa.Table  # columns: INDEX_COLUMNS, part (int32), row (int64)

    def __post_init__(self) -> None:
        # A key whose latest row withdraws it (a placeholder row a later clean read made obsolete) is
        # not committed at all: not done, not counted, not published.
        withdrawn = pc.fill_null(pc.equal(self.latest["status"], STATUS_WITHDRAWN), False)
        if pc.any(withdrawn).as_py():
            object.__setattr__(self, "latest", self.latest.filter(pc.invert(withdrawn)))

    @classmethod
    def empty(cls) -> CommittedIndex:
        """The index of an output that holds nothing yet (a first run, or --overwrite)."""
        columns = {name: pa.array([], pa.string()) for name in INDEX_COLUMNS}
        return cls(parts=[], latest=pa.table({**columns, "part": pa.array([], pa.int32()), "row": pa.array([], pa.int64())}))

    @property
    def size(self) -> int:
        return self.latest.num_rows

    def keys(self, ok_only: bool = False) -> pa.Array:
        table = self.latest
        if ok_only:
            table = table.filter(pc.equal(table["status"], STATUS_OK))
        return table["key"].combine_chunks()

    def unavailable(self) -> pa.ChunkedArray:
        """Per latest row: an error row of kind `unavailable` (a read that failed transiently). Such a
        key is not done: every plain run tries it again, and its new row replaces this one."""
        error = pc.fill_null(self.latest["error"], "")
        return pc.and_(pc.equal(self.latest["status"], STATUS_ERROR), pc.starts_with(error, _UNAVAILABLE_PREFIX))

    def placeholders(self) -> dict[str, list[str]]:
        """Error rows that name a place in a stream rather than a sample, by stream: `<stream>@<n>` keys
        of kind shard, unavailable or manifest, grouped by `<stream>` (a shard's source, a manifest's
        name). A later clean read of the stream withdraws them."""
        errors = self.latest.filter(pc.equal(self.latest["status"], STATUS_ERROR))
        errors = errors.filter(pc.match_substring_regex(errors["key"], r"@\d+$"))
        found: dict[str, list[str]] = {}
        for key, error in zip(errors["key"].to_pylist(), errors["error"].to_pylist(), strict=True):
            if kind_of_error(error) in _PLACEHOLDER_KINDS:
                found.setdefault(key.rsplit("@", 1)[0], []).append(key)
        return found

    def origins_by_key(self) -> dict[str, CommittedOrigin]:
        """Committed key -> its latest row's status, source and signature, for lookups one sample at a
        time (streamed shards and manifests). Keys whose latest row is `unavailable` are left out: they
        are not done."""
        latest = self.latest.filter(pc.invert(self.unavailable()))
        ok = pc.equal(latest["status"], STATUS_OK).to_pylist()
        origins = map(CommittedOrigin, ok, latest["source"].to_pylist(), latest[SIGNATURE].to_pylist())
        return dict(zip(latest["key"].to_pylist(), origins, strict=True))

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
        has; a named column an older part lacks is left out) less `drop`, for parts not named in
        `skip`. One part in memory at a time."""
        for part, rows in zip(self.parts, self.rows_by_part(), strict=True):
            if len(rows) == 0 or part.name in skip:
                continue
            with pq.ParquetFile(part) as parquet:
                present = parquet.schema_arrow.names
                names = [name for name in columns if name in present] if columns is not None else present
                table = parquet.read(columns=[name for name in names if name not in drop])
            yield table if len(rows) == table.num_rows else table.take(rows)
