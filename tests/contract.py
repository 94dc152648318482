"""Checks of the data contract shared by the end-to-end tests: structure only, never caption words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageOps

from caprl_cli.prepare.grid import Grid
from caprl_cli.outputs.rows import COLUMNS


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSONL output, read with the plain libraries users have."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]
    table = pq.read_table(path)
    assert tuple(table.column_names) == COLUMNS
    return table.to_pylist()


def displayed_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).size


def assert_rows_match_corpus(
    rows: list[dict[str, Any]],
    root: Path,
    expected: dict[str, str | None],
    *,
    model: str,
    max_tokens: int,
    grid: Grid,
) -> None:
    """Every image has exactly one row with the right status/kind; ok rows are fully populated."""
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a key was written twice"
    assert set(keys) == set(expected)
    text_tokens: set[int] = set()
    for row in rows:
        assert set(row) == set(COLUMNS)
        key = row["key"]
        assert row["model"] == model
        assert row["source"] == str((root / key).resolve())
        kind = expected[key]
        if kind is not None:
            assert row["status"] == "error", key
            assert row["caption"] is None
            assert row["error"].split(":", 1)[0] == kind, (key, row["error"])
            continue
        assert row["status"] == "ok", (key, row["error"])
        assert row["error"] is None
        assert isinstance(row["caption"], str)
        assert row["finish_reason"] in ("stop", "length")
        assert 1 <= row["output_tokens"] <= max_tokens
        if row["finish_reason"] == "length":
            assert row["output_tokens"] == max_tokens
        width, height = displayed_size(root / key)
        assert (row["width"], row["height"]) == (width, height), key
        target_w, target_h = grid.target_size(width, height)
        text_tokens.add(row["prompt_tokens"] - (target_w * target_h) // (grid.factor**2))
    # The engine saw exactly the grid caprl resized to: the rest of each prompt is the same text.
    assert len(text_tokens) == 1, text_tokens
