"""Order without clocks: part names carry the state's sequence number, and that alone says which row is latest."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.outputs import table
from caprl_cli.outputs.rows import caption_row
from caprl_cli.outputs.row_writers import rows_to_table
from caprl_cli.outputs.table import merge_output
from caprl_cli.state import parts as parts_module
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import PartWriter
from caprl_cli.state.sequence import next_sequence, part_name, part_order, sequence_of

LATE_CLOCK = "20300101T000000000000Z-11"
EARLY_CLOCK = "19990101T000000000000Z-22"


def _ok(key: str, caption: str) -> dict:
    return caption_row(
        key=key, source=f"/data/{key}", model="tiny", caption=caption, finish_reason="stop",
        prompt_tokens=1, output_tokens=1, width=8, height=8,
    )


def _commit(state: RunState, run_id: str, rows: list[dict]) -> list[Path]:
    writer = PartWriter(state.parts_dir, run_id, flush_rows=len(rows), flush_seconds=3600)
    for row in rows:
        writer.add(row)
    writer.close()
    return writer.written


def _captions(path: Path) -> dict[str, str]:
    return {row["key"]: row["caption"] for row in pq.read_table(path).to_pylist()}


@pytest.fixture()
def state(tmp_path: Path) -> RunState:
    state = RunState(tmp_path / "out.parquet")
    state.create()
    return state


def test_next_sequence_is_one_above_the_highest_part(tmp_path: Path) -> None:
    """1 in an empty (or missing) folder; else one more than the highest sequenced part; temporaries,
    files set aside and names of older versions do not count."""
    assert next_sequence(tmp_path / "missing") == 1
    assert next_sequence(tmp_path) == 1
    (tmp_path / part_name(7, LATE_CLOCK, "000000000")).write_bytes(b"")
    (tmp_path / part_name(3, LATE_CLOCK, "000000001")).write_bytes(b"")
    (tmp_path / f".{part_name(40, LATE_CLOCK, 'x')}.123.tmp").write_bytes(b"")
    (tmp_path / "part-20240101T000000000000Z-1-000000000.parquet").write_bytes(b"")
    assert next_sequence(tmp_path) == 8


def test_part_order_rebuilt_then_older_names_then_sequence() -> None:
    """Sequence 0 (rebuilt from the output) sorts first, then parts named by older versions (by name), then by
    sequence number, whatever clock reading the names carry."""
    rebuilt = part_name(0, LATE_CLOCK, "rebuilt")
    legacy_late = "part-20991231T000000000000Z-1-000000000.parquet"
    legacy_early = "part-20200101T000000000000Z-1-000000000.parquet"
    second = part_name(2, EARLY_CLOCK, "000000000")
    first = part_name(1, LATE_CLOCK, "000000000")
    tenth = part_name(10, EARLY_CLOCK, "compacted")
    names = [tenth, second, legacy_late, first, rebuilt, legacy_early]
    assert sorted(names, key=part_order) == [rebuilt, legacy_early, legacy_late, first, second, tenth]
    assert sequence_of(legacy_late) is None and sequence_of(tenth) == 10


def test_state_lists_parts_by_sequence_not_by_clock(state: RunState) -> None:
    """A run whose clock reads earlier than the previous run's still commits parts that sort after them."""
    first = _commit(state, LATE_CLOCK, [_ok("k", "first run")])
    second = _commit(state, EARLY_CLOCK, [_ok("k", "second run")])
    assert state.part_paths() == first + second
    assert [sequence_of(p.name) for p in first + second] == [1, 2]
    latest = state.committed().latest.to_pylist()
    assert [(row["key"], row["part"]) for row in latest] == [("k", 1)]


def test_a_run_with_an_earlier_clock_still_wins_through_index_and_merge(
    state: RunState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run's rows are the latest even though its clock reads years before the first run's:
    in the committed index, in the merged output, and in the compacted part that replaces the parts."""
    monkeypatch.setattr(parts_module, "new_run_id", lambda: LATE_CLOCK)
    monkeypatch.setattr(table, "new_run_id", lambda: LATE_CLOCK)
    _commit(state, parts_module.new_run_id(), [_ok("k", "first run"), _ok("only-first", "kept")])
    merge_output(state, state.committed(), "parquet", {})

    monkeypatch.setattr(parts_module, "new_run_id", lambda: EARLY_CLOCK)
    monkeypatch.setattr(table, "new_run_id", lambda: EARLY_CLOCK)
    _commit(state, parts_module.new_run_id(), [_ok("k", "second run")])
    index = state.committed()
    latest = {row["key"]: row for row in index.latest.to_pylist()}
    assert index.parts[latest["k"]["part"]].name.split("-")[2:4] == EARLY_CLOCK.split("-")
    merge_output(state, index, "parquet", {})
    assert _captions(state.output) == {"k": "second run", "only-first": "kept"}

    # Compaction under the early clock: the compacted part sorts after every part it replaces, and a
    # third run with an even earlier clock still wins over it.
    monkeypatch.setattr(table, "COMPACT_ABOVE_PARTS", 1)
    merge_output(state, state.committed(), "parquet", {})
    (compacted,) = state.part_paths()
    assert compacted.name.endswith("-compacted.parquet") and sequence_of(compacted.name) == 3
    _commit(state, "19700101T000000000000Z-33", [_ok("only-first", "third run")])
    merge_output(state, state.committed(), "parquet", {})
    assert _captions(state.output) == {"k": "second run", "only-first": "third run"}


def test_parts_of_older_versions_count_as_older_than_sequenced_parts(state: RunState) -> None:
    """A state written by an older version (timestamp names) continues: new sequenced parts win over it."""
    legacy = state.parts_dir / "part-20991231T000000000000Z-1-000000000.parquet"
    pq.write_table(rows_to_table([_ok("k", "older version")]), legacy)
    (new,) = _commit(state, EARLY_CLOCK, [_ok("k", "this version")])
    assert sequence_of(new.name) == 1
    assert state.part_paths() == [legacy, new]
    merge_output(state, state.committed(), "parquet", {})
    assert _captions(state.output) == {"k": "this version"}
