"""Outputs are plain files that pandas, DuckDB and `datasets` read directly, with no caprl code."""

from __future__ import annotations

from pathlib import Path

import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.rows import COLUMNS, caption_row, error_row
from caprl_cli.outputs.row_writers import open_writer

ROWS = [
    caption_row(key="a/x.jpg", source="/data/a/x.jpg", model="m", caption="A red car.", finish_reason="stop",
                prompt_tokens=120, output_tokens=5, width=640, height=480),
    error_row(key="b/y.png", source="/data/b/y.png", model="m", kind=ErrorKind.DECODE, message="empty file"),
    caption_row(key="c/ü z.webp", source="/data/c/ü z.webp", model="m", caption="Ein Bild.\nZeile 2",
                finish_reason="length", prompt_tokens=90, output_tokens=7, width=10, height=20, meta='{"k": 1}'),
]


@pytest.fixture(params=["parquet", "jsonl"])
def output(request, tmp_path: Path) -> Path:
    path = tmp_path / f"captions.{request.param}"
    writer = open_writer(request.param, path)
    writer.write(ROWS[:2])
    writer.write(ROWS[2:])
    writer.commit({"model": "m"})
    return path


def test_pandas(output: Path) -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(output) if output.suffix == ".parquet" else pandas.read_json(output, lines=True)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["key"].tolist() == [row["key"] for row in ROWS]
    assert frame["status"].tolist() == ["ok", "error", "ok"]


def test_duckdb(output: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    reader = "read_parquet" if output.suffix == ".parquet" else "read_json_auto"
    counts = dict(duckdb.sql(f"select status, count(*) from {reader}('{output}') group by status").fetchall())
    assert counts == {"ok": 2, "error": 1}
    tokens = duckdb.sql(f"select sum(output_tokens) from {reader}('{output}')").fetchall()[0][0]
    assert tokens == 12


def test_datasets(output: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    builder = "parquet" if output.suffix == ".parquet" else "json"
    loaded = datasets.load_dataset(builder, data_files=str(output), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 3
    assert set(COLUMNS) <= set(loaded.column_names)
    assert loaded[1]["caption"] is None and loaded[1]["error"].startswith("decode: ")
