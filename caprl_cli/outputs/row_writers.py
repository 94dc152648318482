"""Row writers, chosen by output format; each writes under a temporary name and commits atomically.

Rows arrive in small groups as images finish, so memory stays flat however large the run; the output
file only appears under its real name once it is complete (temp name, fsync, rename), so a reader
never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from caprl_cli.outputs.atomic import fsync_rename, temp_path_for
from caprl_cli.outputs.rows import COLUMNS, SCHEMA, Row

PROVENANCE_KEY = "caprl"


class RowWriter(Protocol):
    """Where finished rows go. `commit` makes the output visible; `abort` removes the temp file."""

    def write(self, rows: list[Row]) -> None: ...

    def write_table(self, table: pa.Table) -> None: ...

    def commit(self, provenance: dict[str, Any]) -> None: ...

    def abort(self) -> None: ...


def rows_to_table(rows: list[Row], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows as an Arrow table with the contract's schema (or a part schema that extends it)."""
    return pa.Table.from_pylist(rows, schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order: extra columns dropped, and a column the
    table lacks (a part written before the column existed, such as `signature`) as nulls."""
    present = set(table.column_names)
    columns = [table[field.name] if field.name in present else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


# Rows per row group: large enough for a small footer and fast scans, small enough (tens of MB of
# captions) to keep memory flat.
ROW_GROUP_ROWS = 16_384
# Min/max statistics only where they help filtering; long text columns would bloat every footer.
STATISTICS_COLUMNS = ["key", "status", "finish_reason", "prompt_tokens", "output_tokens", "width", "height", "model"]


class ParquetRowWriter:
    """Rows gathered into row groups of `row_group_rows`; provenance in the key-value metadata."""

    def __init__(self, path: Path, row_group_rows: int = ROW_GROUP_ROWS, schema: pa.Schema = SCHEMA) -> None:
        self.path = path
        self.temp = temp_path_for(path)
        self.row_group_rows = row_group_rows
        self.schema = schema
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer = pq.ParquetWriter(
            self.temp, schema, compression="zstd", write_statistics=STATISTICS_COLUMNS
        )

    def write(self, rows: list[Row]) -> None:
        if rows:
            self.write_table(rows_to_table(rows, self.schema))

    def write_table(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(conform(table, self.schema))
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self.row_group_rows)
            self._pending, self._pending_rows = [], 0

    def commit(self, provenance: dict[str, Any]) -> None:
        self._write_pending()
        self._writer.add_key_value_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)})
        self._writer.close()
        fsync_rename(self.temp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self.temp.unlink(missing_ok=True)


class JsonlRowWriter:
    """One JSON object per line with the contract's columns (or `schema`'s), in contract order."""

    def __init__(self, path: Path, schema: pa.Schema = SCHEMA) -> None:
        self.path = path
        self.temp = temp_path_for(path)
        self.columns: tuple[str, ...] = tuple(schema.names) if schema is not None else COLUMNS
        self._handle = open(self.temp, "w", encoding="utf-8")

    def write(self, rows: list[Row]) -> None:
        for row in rows:
            self._handle.write(json.dumps({name: row.get(name) for name in self.columns}, ensure_ascii=False))
            self._handle.write("\n")
        self._handle.flush()

    def write_table(self, table: pa.Table) -> None:
        present = set(table.column_names)  # a column an older part lacks is null
        for batch in table.select([name for name in self.columns if name in present]).to_batches(max_chunksize=4096):
            self.write(batch.to_pylist())

    def commit(self, provenance: dict[str, Any]) -> None:
        self._handle.close()
        fsync_rename(self.temp, self.path)

    def abort(self) -> None:
        self._handle.close()
        self.temp.unlink(missing_ok=True)


WRITERS: dict[str, type[ParquetRowWriter] | type[JsonlRowWriter]] = {
    "parquet": ParquetRowWriter,
    "jsonl": JsonlRowWriter,
}


def open_writer(output_format: str, path: Path, schema: pa.Schema = SCHEMA) -> RowWriter:
    """The writer for `output_format`, writing `schema`'s columns (`rows.output_schema`)."""
    return WRITERS[output_format](path, schema=schema)
