"""Several captions per image: the list columns, read by pandas, DuckDB and `datasets` with no caprl
code; absent with one caption per image; null in parts written before they existed; and the documented
WebDataset and sidecar forms."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caprl_cli.engines.base import Caption, combine_captions
from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.row_writers import conform, open_writer
from caprl_cli.outputs.rows import (
    COLUMNS,
    MULTI_CAPTION_FIELDS,
    PART_SCHEMA,
    SCHEMA,
    all_output_tokens,
    caption_row,
    error_row,
    output_columns,
    output_schema,
)
from caprl_cli.outputs.sidecar import captions_path, sidecar_path, write_captions_file
from caprl_cli.outputs.tar_shards import row_json

LISTS = [name.name for name in MULTI_CAPTION_FIELDS]
ROWS = [
    caption_row(key="a.jpg", source="/d/a.jpg", model="m", caption="One.", finish_reason="stop", prompt_tokens=9,
                output_tokens=2, width=4, height=4, more=[("Two.", "repetition", 70), ("Drei.", "length", 5)]),
    error_row(key="b.png", source="/d/b.png", model="m", kind=ErrorKind.DECODE, message="empty file"),
]


@pytest.fixture(params=["parquet", "jsonl"])
def output(request, tmp_path: Path) -> Path:
    path = tmp_path / f"captions.{request.param}"
    writer = open_writer(request.param, path, output_schema(3))
    writer.write(ROWS)
    writer.commit({"model": "m"})
    return path


def test_a_row_holds_every_caption_and_the_first_in_the_scalar_columns() -> None:
    row = ROWS[0]
    assert row["captions"] == ["One.", "Two.", "Drei."] and row["caption"] == "One."
    assert row["finish_reasons"] == ["stop", "repetition", "length"] and row["finish_reason"] == "stop"
    assert row["output_token_counts"] == [2, 70, 5] and row["output_tokens"] == 2
    assert all_output_tokens(row) == 77
    single = caption_row(key="c", source="c", model="m", caption="x", finish_reason="stop", prompt_tokens=1,
                         output_tokens=3, width=1, height=1)
    assert not set(LISTS) & set(single) and all_output_tokens(single) == 3


def test_pandas_reads_the_lists(output: Path) -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(output) if output.suffix == ".parquet" else pandas.read_json(output, lines=True)
    assert list(frame.columns) == list(COLUMNS) + LISTS
    assert list(frame["captions"][0]) == ["One.", "Two.", "Drei."]
    assert frame["captions"][1] is None


def test_duckdb_reads_the_lists(output: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    reader = "read_parquet" if output.suffix == ".parquet" else "read_json_auto"
    found = duckdb.sql(
        f"select key, len(captions), captions[2], output_token_counts[2] from {reader}('{output}') order by key"
    ).fetchall()
    assert found == [("a.jpg", 3, "Two.", 70), ("b.png", None, None, None)]


def test_datasets_reads_the_lists(output: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    builder = "parquet" if output.suffix == ".parquet" else "json"
    loaded = datasets.load_dataset(builder, data_files=str(output), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded[0]["captions"] == ["One.", "Two.", "Drei."]
    assert loaded[0]["finish_reasons"] == ["stop", "repetition", "length"]
    assert loaded[1]["captions"] is None


def test_one_caption_per_image_keeps_the_contract_columns(tmp_path: Path) -> None:
    assert output_schema(1) == SCHEMA and output_columns(1) == COLUMNS
    path = tmp_path / "one.parquet"
    writer = open_writer("parquet", path, output_schema(1))
    writer.write(ROWS)
    writer.commit({})
    assert pq.read_schema(path).names == list(COLUMNS)


def test_parts_written_before_the_lists_existed_read_them_as_null() -> None:
    old_part_schema = SCHEMA.append(pa.field("signature", pa.string()))
    old = pa.Table.from_pylist([{k: v for k, v in ROWS[0].items() if k not in LISTS}], schema=old_part_schema)
    table = conform(old, PART_SCHEMA)
    assert table.schema == PART_SCHEMA
    assert table["captions"].to_pylist() == [None] and table["caption"].to_pylist() == ["One."]


def test_webdataset_json_has_the_lists_only_with_several_captions() -> None:
    assert row_json(ROWS[0], output_columns(3))["captions"] == ["One.", "Two.", "Drei."]
    assert "captions" not in row_json(ROWS[0])


def test_sidecar_captions_file_sits_beside_the_txt(tmp_path: Path) -> None:
    image = tmp_path / "cat.jpg"
    assert captions_path(image) == tmp_path / "cat.captions.json"
    assert captions_path(image, {"cat"}) == tmp_path / "cat.jpg.captions.json"
    assert sidecar_path(image).name == "cat.txt"
    write_captions_file(image, ["a", "b"], replace=False)
    assert json.loads((tmp_path / "cat.captions.json").read_text()) == ["a", "b"]
    (tmp_path / "cat.captions.json").write_text("mine")
    write_captions_file(image, ["a", "b"], replace=False)  # someone else's file is kept
    assert (tmp_path / "cat.captions.json").read_text() == "mine"


def test_combining_captions_keeps_index_order_and_fails_on_any_failure() -> None:
    one, two = Caption("1", "stop", 5, 1), Caption("2", "length", 5, 8)
    combined = combine_captions([one, two])
    assert [c.text for c in combined.all] == ["1", "2"] and combined.prompt_tokens == 5
    failed = combine_captions([one, Caption.failed("boom"), two])
    assert failed.error == "boom" and failed.extra == ()
