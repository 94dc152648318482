"""Row writers: rows come back exactly as written, in the contract's schema, and the output file only
appears, whole, on commit."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.rows import COLUMNS, SCHEMA, caption_row, error_row
from caprl_cli.outputs.atomic import temp_path_for, write_json_atomically
from caprl_cli.outputs.row_writers import JsonlRowWriter, ParquetRowWriter, open_writer

PROVENANCE = {"model": "tiny", "seed": 7, "settings": {"max_new_tokens": 32}, "note": "café ✓"}
WRITERS = {"parquet": ParquetRowWriter, "jsonl": JsonlRowWriter}


def _row(i: int) -> dict:
    if i % 3 == 2:
        return error_row(
            key=f"broken_{i}.jpg", source=f"/data/broken_{i}.jpg", model="tiny", kind=ErrorKind.DECODE,
            message="not an image\nat all", meta=None,
        )
    return caption_row(
        key=f"dir/img_{i}.jpg", source=f"/data/dir/img_{i}.jpg", model="tiny",
        caption=f"A caption {i} — with ünïcode and \"quotes\"\nover two lines.",
        finish_reason="stop" if i % 2 else "length", prompt_tokens=100 + i, output_tokens=2**31 - 1 - i,
        width=640 + i, height=480, meta=json.dumps({"i": i}) if i % 2 else None,
    )


BATCHES = [[_row(0), _row(1), _row(2)], [_row(3)], [], [_row(4), _row(5), _row(6), _row(7)]]
ALL_ROWS = [row for batch in BATCHES for row in batch]


def _write_all(writer, batches=BATCHES) -> None:
    for batch in batches:
        writer.write(batch)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(params=sorted(WRITERS))
def fmt(request) -> str:
    return request.param


def _out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / f"captions.{fmt}"


def test_open_writer_picks_the_format(tmp_path: Path, fmt: str) -> None:
    """`open_writer` returns the writer class for the format name."""
    writer = open_writer(fmt, _out(tmp_path, fmt))
    try:
        assert isinstance(writer, WRITERS[fmt])
    finally:
        writer.abort()


def test_parquet_roundtrip(tmp_path: Path) -> None:
    """Rows written over several calls read back equal, in order, with exactly rows.SCHEMA."""
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path)
    _write_all(writer)
    writer.commit(PROVENANCE)
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    assert table.schema.names == list(COLUMNS)
    assert [table.schema.field(name).nullable for name in COLUMNS] == [SCHEMA.field(n).nullable for n in COLUMNS]
    assert table.to_pylist() == ALL_ROWS


def test_parquet_row_groups_are_bounded(tmp_path: Path) -> None:
    """Small writes are gathered into row groups of at most `row_group_rows` (memory stays flat, the
    footer small); nothing is lost at the boundaries."""
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path, row_group_rows=3)
    _write_all(writer)
    writer.commit(PROVENANCE)
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sum(sizes) == len(ALL_ROWS)
    assert max(sizes) <= 3 and parquet.num_row_groups <= len(ALL_ROWS) // 3 + 2
    assert pq.read_table(path).to_pylist() == ALL_ROWS


def test_parquet_long_text_has_no_statistics(tmp_path: Path) -> None:
    """Captions get no min/max statistics: they would copy long text into every footer."""
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path)
    _write_all(writer)
    writer.commit(PROVENANCE)
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert columns["key"].is_stats_set
    assert not columns["caption"].is_stats_set


def test_parquet_provenance_in_key_value_metadata(tmp_path: Path) -> None:
    """Provenance is stored as JSON under b"caprl" in the file's key-value metadata."""
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path)
    _write_all(writer)
    writer.commit(PROVENANCE)
    metadata = pq.read_metadata(path).metadata
    assert b"caprl" in metadata
    assert json.loads(metadata[b"caprl"].decode("utf-8")) == PROVENANCE


def test_parquet_without_rows_is_a_valid_empty_table(tmp_path: Path) -> None:
    """A run with no images still commits a readable file with the schema and provenance."""
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path)
    writer.write([])
    writer.commit(PROVENANCE)
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.equals(SCHEMA)
    assert json.loads(pq.read_metadata(path).metadata[b"caprl"]) == PROVENANCE


def test_parquet_refuses_row_without_key(tmp_path: Path) -> None:
    """`key` is not nullable in the contract: a row without one cannot be written."""
    writer = ParquetRowWriter(_out(tmp_path, "parquet"))
    try:
        with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, ValueError)):
            writer.write([{**_row(0), "key": None}])
    finally:
        writer.abort()


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    """Rows written over several calls read back equal, one object per line, columns in contract order."""
    path = _out(tmp_path, "jsonl")
    writer = JsonlRowWriter(path)
    _write_all(writer)
    writer.commit(PROVENANCE)
    objects = _read_jsonl(path)
    assert objects == ALL_ROWS
    for obj in objects:
        assert list(obj) == list(COLUMNS)
    assert pa.Table.from_pylist(objects, schema=SCHEMA).schema.equals(SCHEMA)


def test_jsonl_fills_missing_columns_with_null(tmp_path: Path) -> None:
    """A row lacking optional columns still gets every contract column (null), and nothing extra."""
    path = _out(tmp_path, "jsonl")
    writer = JsonlRowWriter(path)
    writer.write([{"key": "k.jpg", "status": "ok", "extra": "dropped"}])
    writer.commit({})
    (obj,) = _read_jsonl(path)
    assert list(obj) == list(COLUMNS)
    assert obj["key"] == "k.jpg" and obj["status"] == "ok"
    assert all(obj[name] is None for name in COLUMNS if name not in ("key", "status"))


def test_jsonl_keeps_non_ascii_as_utf8(tmp_path: Path) -> None:
    """Captions are written as UTF-8 text, not \\u escapes, and a newline in a caption stays in its line."""
    path = _out(tmp_path, "jsonl")
    writer = JsonlRowWriter(path)
    writer.write([_row(0)])
    writer.commit({})
    text = path.read_text(encoding="utf-8")
    assert "ünïcode" in text
    assert len(text.splitlines()) == 1


def test_output_appears_only_on_commit(tmp_path: Path, fmt: str) -> None:
    """Before commit only a hidden temp sibling exists; after commit only the final file."""
    path = _out(tmp_path, fmt)
    writer = WRITERS[fmt](path)
    _write_all(writer)
    assert not path.exists()
    temp = temp_path_for(path)
    assert temp.parent == path.parent and temp.name.startswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == [temp.name]
    writer.commit(PROVENANCE)
    assert path.exists()
    assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_abort_leaves_nothing(tmp_path: Path, fmt: str) -> None:
    """An aborted run leaves neither the output nor its temp file."""
    path = _out(tmp_path, fmt)
    writer = WRITERS[fmt](path)
    _write_all(writer)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_abort_keeps_previous_output(tmp_path: Path, fmt: str) -> None:
    """An aborted run does not touch an output committed earlier at the same path."""
    path = _out(tmp_path, fmt)
    first = WRITERS[fmt](path)
    first.write(BATCHES[0])
    first.commit(PROVENANCE)
    before = path.read_bytes()
    second = WRITERS[fmt](path)
    second.write(BATCHES[3])
    assert path.read_bytes() == before
    second.abort()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_commit_replaces_previous_output(tmp_path: Path, fmt: str) -> None:
    """Committing over an existing output replaces it whole."""
    path = _out(tmp_path, fmt)
    first = WRITERS[fmt](path)
    first.write(BATCHES[0])
    first.commit(PROVENANCE)
    second = WRITERS[fmt](path)
    second.write(BATCHES[3])
    second.commit(PROVENANCE)
    rows = pq.read_table(path).to_pylist() if fmt == "parquet" else _read_jsonl(path)
    assert rows == BATCHES[3]


def test_write_json_atomically(tmp_path: Path) -> None:
    """The JSON document is written whole (UTF-8, round-trips), replaces the old one, leaves no temp file."""
    path = tmp_path / "state.json"
    write_json_atomically(path, {"done": 1, "name": "café ✓"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"done": 1, "name": "café ✓"}
    payload = {"done": 2, "nested": {"list": [1, 2, None], "ok": True}}
    write_json_atomically(path, payload)
    assert json.loads(path.read_text(encoding="utf-8")) == payload
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert not temp_path_for(path).exists()


def test_parquet_readable_with_pandas(tmp_path: Path) -> None:
    """The Parquet output is an ordinary table for pandas."""
    pd = pytest.importorskip("pandas")
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path)
    _write_all(writer)
    writer.commit(PROVENANCE)
    frame = pd.read_parquet(path)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == len(ALL_ROWS)
    assert list(frame["key"]) == [row["key"] for row in ALL_ROWS]
    assert list(frame["status"]) == [row["status"] for row in ALL_ROWS]


def test_parquet_readable_with_datasets(tmp_path: Path) -> None:
    """The Parquet output loads with Hugging Face `datasets` with the same columns and rows."""
    datasets = pytest.importorskip("datasets")
    path = _out(tmp_path, "parquet")
    writer = ParquetRowWriter(path)
    _write_all(writer)
    writer.commit(PROVENANCE)
    dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == list(COLUMNS)
    assert dataset.num_rows == len(ALL_ROWS)
    assert dataset.to_list() == ALL_ROWS
