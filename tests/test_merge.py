"""Merging committed parts into the output: each key once with its newest row, atomically, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.table import merge_output
from caprl_cli.outputs.rows import COLUMNS, PART_SCHEMA, SCHEMA, caption_row, error_row
from caprl_cli.state.folder import RunState
from caprl_cli.outputs.row_writers import rows_to_table

PROVENANCE = {"model": "tiny", "seed": 0, "note": "café ✓"}


def _ok(key: str, caption: str) -> dict:
    return caption_row(key=key, source=f"/data/{key}", model="tiny", caption=caption, finish_reason="stop",
                       prompt_tokens=3, output_tokens=4, width=8, height=8)


def _err(key: str) -> dict:
    return error_row(key=key, source=f"/data/{key}", model="tiny", kind=ErrorKind.ENGINE, message="boom")


PARTS = [
    [_ok("a", "a1"), _err("b"), _ok("c", "c1"), _err("d")],
    [_ok("e", "e1"), _ok("b", "b2")],
    [_ok("a", "a3"), _ok("f", "f1")],
]
# Latest row of each key, in part order then row order.
EXPECTED = [_ok("c", "c1"), _err("d"), _ok("e", "e1"), _ok("b", "b2"), _ok("a", "a3"), _ok("f", "f1")]


@pytest.fixture(params=["parquet", "jsonl"])
def fmt(request) -> str:
    return request.param


def _state(tmp_path: Path, fmt: str, parts: list[list[dict]] = PARTS) -> RunState:
    state = RunState(tmp_path / f"out.{fmt}")
    state.create()
    for i, rows in enumerate(parts):
        pq.write_table(rows_to_table(rows), state.parts_dir / f"part-2024010{i}T000000000000Z-1-000000.parquet")
    return state


def _read(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        table = pq.read_table(path)
        assert table.schema.equals(SCHEMA)
        return table.to_pylist()
    objects = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for obj in objects:
        assert list(obj) == list(COLUMNS)
    return objects


def test_merge_keeps_latest_row_per_key_in_part_order(tmp_path: Path, fmt: str) -> None:
    """Each key appears once, with its newest row, ordered by part then row."""
    state = _state(tmp_path, fmt)
    merge_output(state, state.committed(), fmt, PROVENANCE)
    rows = _read(state.output, fmt)
    assert rows == EXPECTED
    assert len({row["key"] for row in rows}) == len(rows)


def test_merge_leaves_no_temp_file_and_records_the_merge(tmp_path: Path, fmt: str) -> None:
    """After the merge only the output and its state folder are beside it, and the output is current."""
    state = _state(tmp_path, fmt)
    index = state.committed()
    assert not state.output_is_current(index.parts)
    merge_output(state, index, fmt, PROVENANCE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.output.name, state.dir.name])
    assert not [p for p in state.dir.rglob("*") if p.name.endswith(".tmp")]
    assert state.output_is_current(index.parts)
    assert state.output_is_current(state.part_paths())


def test_merge_again_after_a_new_part(tmp_path: Path, fmt: str) -> None:
    """A new part makes the output stale; merging again replaces it whole with the new latest rows."""
    state = _state(tmp_path, fmt)
    merge_output(state, state.committed(), fmt, PROVENANCE)
    pq.write_table(rows_to_table([_ok("d", "d4")]), state.parts_dir / "part-20240109T000000000000Z-1-000000.parquet")
    assert not state.output_is_current(state.part_paths())
    index = state.committed()
    merge_output(state, index, fmt, PROVENANCE)
    assert state.output_is_current(state.part_paths())
    rows = _read(state.output, fmt)
    assert rows == [row for row in EXPECTED if row["key"] != "d"] + [_ok("d", "d4")]


def test_parquet_merge_carries_provenance(tmp_path: Path) -> None:
    """The provenance dict is stored as JSON under b"caprl" in the Parquet key-value metadata."""
    state = _state(tmp_path, "parquet")
    merge_output(state, state.committed(), "parquet", PROVENANCE)
    metadata = pq.read_metadata(state.output).metadata
    assert json.loads(metadata[b"caprl"].decode("utf-8")) == PROVENANCE


def test_merge_with_no_parts_writes_an_empty_output(tmp_path: Path, fmt: str) -> None:
    """An index without parts still commits an output: Parquet with the schema's columns, JSONL with no lines."""
    state = _state(tmp_path, fmt, parts=[])
    index = state.committed()
    merge_output(state, index, fmt, PROVENANCE)
    assert state.output.is_file()
    if fmt == "parquet":
        table = pq.read_table(state.output)
        assert table.num_rows == 0
        assert table.schema.names == list(COLUMNS)
        assert table.schema.equals(SCHEMA)
        assert json.loads(pq.read_metadata(state.output).metadata[b"caprl"]) == PROVENANCE
    else:
        assert state.output.read_text(encoding="utf-8") == ""
    assert state.output_is_current([])


def test_failed_merge_keeps_the_previous_output(tmp_path: Path, fmt: str) -> None:
    """If a part vanishes mid-merge the old output stays, no temp file is left, and the merge is not recorded."""
    state = _state(tmp_path, fmt)
    merge_output(state, state.committed(), fmt, PROVENANCE)
    before = state.output.read_bytes()
    pq.write_table(rows_to_table([_ok("z", "z1")]), state.parts_dir / "part-20240109T000000000000Z-1-000000.parquet")
    index = state.committed()
    index.parts[-1].unlink()
    with pytest.raises(Exception):
        merge_output(state, index, fmt, PROVENANCE)
    assert state.output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.output.name, state.dir.name])
    assert not state.output_is_current(index.parts)


def _many_parts(tmp_path: Path, fmt: str, count: int) -> RunState:
    """`count` one-row parts; key k0 is an error first and captioned again in the last part."""
    state = RunState(tmp_path / f"out.{fmt}")
    state.create()
    rows = [[_err("k0")]] + [[_ok(f"k{i}", f"c{i}")] for i in range(1, count - 1)] + [[_ok("k0", "again")]]
    for i, part_rows in enumerate(rows):
        name = f"part-20240101T000000{i:06d}Z-1-000000000.parquet"
        pq.write_table(rows_to_table(part_rows), state.parts_dir / name)
    return state


def test_many_parts_are_compacted_while_merging(tmp_path: Path, fmt: str) -> None:
    """Past COMPACT_ABOVE_PARTS, the merge leaves one part holding exactly the latest rows."""
    from caprl_cli.outputs.table import COMPACT_ABOVE_PARTS

    count = COMPACT_ABOVE_PARTS + 6
    state = _many_parts(tmp_path, fmt, count)
    merge_output(state, state.committed(), fmt, PROVENANCE)
    parts = state.part_paths()
    assert len(parts) == 1 and parts[0].name.endswith("-compacted.parquet")
    compacted = pq.read_table(parts[0]).to_pylist()
    assert sorted(row["key"] for row in compacted) == sorted(f"k{i}" for i in range(count - 1))
    assert {row["key"]: row["caption"] for row in compacted}["k0"] == "again"
    # Parts from before signatures (and the list columns of several captions per image) existed compact
    # with those columns null; the output keeps the contract.
    assert {row.pop("signature") for row in compacted} == {None}
    for name in ("captions", "finish_reasons", "output_token_counts"):
        assert {row.pop(name) for row in compacted} == {None}
    assert _read(state.output, fmt) == compacted
    assert state.output_is_current(parts)
    assert not [p for p in state.parts_dir.iterdir() if p.name.endswith(".tmp")]


def test_compaction_keeps_each_rows_signature(tmp_path: Path, fmt: str) -> None:
    """The compacted part still tells where each key came from (its image signature), so a run after
    compaction tells the same image from a different one; the published output has no such column."""
    from caprl_cli.outputs.table import COMPACT_ABOVE_PARTS

    state = RunState(tmp_path / f"out.{fmt}")
    state.create()
    for i in range(COMPACT_ABOVE_PARTS + 2):
        row = {**_ok(f"k{i}", f"c{i}"), "signature": f"{i}:123"}
        name = f"part-20240101T000000{i:06d}Z-1-000000000.parquet"
        pq.write_table(rows_to_table([row], PART_SCHEMA), state.parts_dir / name)
    merge_output(state, state.committed(), fmt, PROVENANCE)
    (part,) = state.part_paths()
    assert {row["key"]: row["signature"] for row in pq.read_table(part).to_pylist()} == {
        f"k{i}": f"{i}:123" for i in range(COMPACT_ABOVE_PARTS + 2)
    }
    assert dict(zip(*state.committed().latest.select(["key", "signature"]).to_pydict().values()))["k3"] == "3:123"
    assert all("signature" not in row for row in _read(state.output, fmt))


def test_compaction_interrupted_before_cleanup_reads_the_same(tmp_path: Path, fmt: str) -> None:
    """Old parts left beside the compacted one (a crash mid-cleanup) change no latest row."""
    from caprl_cli.outputs.table import COMPACT_ABOVE_PARTS

    state = _many_parts(tmp_path, fmt, COMPACT_ABOVE_PARTS + 6)
    before = {row["key"]: row for row in state.committed().latest.select(["key", "status"]).to_pylist()}
    merge_output(state, state.committed(), fmt, PROVENANCE)
    compacted = state.part_paths()[0]
    # Put the old parts back as if the process had died before deleting them.
    restored = _many_parts(tmp_path / "again", fmt, COMPACT_ABOVE_PARTS + 6)
    for part in restored.part_paths():
        part.rename(state.parts_dir / part.name)
    index = state.committed()
    assert state.part_paths()[-1] == compacted
    assert {row["key"]: row for row in index.latest.select(["key", "status"]).to_pylist()} == before
    assert not state.output_is_current(index.parts)
