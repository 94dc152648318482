"""Committed part files: rows reach disk in whole parts, by count, by timer and on close."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.state.parts import PartWriter, new_run_id
from caprl_cli.state.sequence import sequence_of
from caprl_cli.outputs.rows import SCHEMA, caption_row, error_row
from caprl_cli.state.folder import RunState


def _row(i: int) -> dict:
    if i % 4 == 3:
        return error_row(key=f"img_{i:04d}.png", source=f"/d/img_{i:04d}.png", model="tiny",
                         kind=ErrorKind.DECODE, message="not an image")
    return caption_row(
        key=f"img_{i:04d}.png", source=f"/d/img_{i:04d}.png", model="tiny", caption=f"caption {i} ✓",
        finish_reason="stop", prompt_tokens=10 + i, output_tokens=i, width=32, height=16,
    )


@pytest.fixture
def parts_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "parts"
    folder.mkdir()
    return folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _committed(folder: Path) -> list[str]:
    """Final part names only (a part being written is a hidden `.tmp` until renamed)."""
    return [name for name in _names(folder) if name.startswith("part-") and name.endswith(".parquet")]


def _read(path: Path) -> list[dict]:
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    return table.to_pylist()


def _poll(condition, timeout: float = 60.0) -> bool:
    """Whether `condition()` became true; polled, with a bound generous for a loaded machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_commits_a_part_every_flush_rows(parts_dir: Path) -> None:
    """With flush_rows=3, the 3rd and 6th rows each commit a part at once; the rest waits in the buffer."""
    writer = PartWriter(parts_dir, "run1", flush_rows=3, flush_seconds=3600)
    try:
        for i in range(2):
            writer.add(_row(i))
        assert _names(parts_dir) == []
        writer.add(_row(2))
        assert len(writer.written) == 1 and writer.rows_written == 3
        for i in range(3, 7):
            writer.add(_row(i))
        assert len(writer.written) == 2 and writer.rows_written == 6
        assert _names(parts_dir) == sorted(p.name for p in writer.written)
        assert _read(writer.written[0]) == [_row(i) for i in range(3)]
        assert _read(writer.written[1]) == [_row(i) for i in range(3, 6)]
    finally:
        writer.close()
    assert len(writer.written) == 3 and writer.rows_written == 7
    assert _read(writer.written[2]) == [_row(6)]


def test_close_commits_the_rest_and_stops_the_timer(parts_dir: Path) -> None:
    """`close` commits buffered rows as a last part and ends the background thread."""
    writer = PartWriter(parts_dir, "run1", flush_rows=1000, flush_seconds=3600)
    for i in range(5):
        writer.add(_row(i))
    assert _names(parts_dir) == []
    writer.close()
    assert not writer._timer.is_alive()
    assert [p.name for p in writer.written] == _names(parts_dir)
    (part,) = writer.written
    assert _read(part) == [_row(i) for i in range(5)]
    assert writer.rows_written == 5


def test_close_with_nothing_buffered_writes_no_part(parts_dir: Path) -> None:
    """An empty buffer never becomes an empty part, at close or on an explicit flush."""
    writer = PartWriter(parts_dir, "run1", flush_rows=2, flush_seconds=3600)
    writer.flush()
    writer.add(_row(0))
    writer.add(_row(1))  # committed by count
    writer.close()
    assert len(writer.written) == 1
    assert _names(parts_dir) == [writer.written[0].name]


def _committed_rows(folder: Path) -> list[dict]:
    return [row for name in _committed(folder) for row in _read(folder / name)]


def test_timer_commits_buffered_rows(parts_dir: Path) -> None:
    """Rows fewer than flush_rows still reach disk within about flush_seconds, without close."""
    writer = PartWriter(parts_dir, "run1", flush_rows=1000, flush_seconds=0.2)
    try:
        writer.add(_row(0))
        writer.add(_row(1))
        assert _poll(lambda: len(_committed_rows(parts_dir)) == 2)
        assert _committed_rows(parts_dir) == [_row(0), _row(1)]
        parts_before = len(_committed(parts_dir))
        writer.add(_row(2))
        assert _poll(lambda: len(_committed(parts_dir)) == parts_before + 1)
        assert _committed_rows(parts_dir) == [_row(i) for i in range(3)]
    finally:
        writer.close()
    assert writer.rows_written == 3
    assert [r for p in writer.written for r in _read(p)] == [_row(i) for i in range(3)]


class _CountingEvent(threading.Event):
    """An Event that counts the waits that ended by timing out."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        self.timeouts += not woken
        return woken


def test_timer_writes_nothing_when_idle(parts_dir: Path) -> None:
    """With nothing buffered the timer commits no (empty) parts, however often it wakes."""
    writer = PartWriter(parts_dir, "run1", flush_rows=1000, flush_seconds=0.05)
    wakes = _CountingEvent()
    writer._closed = wakes  # the timer waits on this between checks: each return is one wake-up
    # 20 wake-ups, each after a wait of flush_seconds / 4 that timed out: well past flush_seconds.
    assert _poll(lambda: wakes.timeouts >= 20, timeout=60), "the flush timer never woke up"
    writer.close()
    assert _names(parts_dir) == []
    assert writer.written == []


def test_part_names_sort_in_creation_order(parts_dir: Path) -> None:
    """Part names start with `part-` and a sequence number, carry the run id, end `.parquet`, and take
    the sequence numbers 1, 2, 3, ... in the order written."""
    run_id = new_run_id()
    writer = PartWriter(parts_dir, run_id, flush_rows=1, flush_seconds=3600)
    for i in range(12):
        writer.add(_row(i))
    writer.close()
    names = [p.name for p in writer.written]
    assert len(names) == 12
    assert names == sorted(names) == _names(parts_dir)
    assert [sequence_of(name) for name in names] == list(range(1, 13))
    for name in names:
        assert f"-{run_id}-" in name and name.startswith("part-") and name.endswith(".parquet")
    assert [r for p in writer.written for r in _read(p)] == [_row(i) for i in range(12)]


def test_parts_of_a_later_run_sort_after_an_earlier_run(parts_dir: Path) -> None:
    """A second run's parts sort after the first run's, so its rows count as newer, even when its run
    id (the clock) reads earlier than the first run's."""
    first = PartWriter(parts_dir, "20300101T000000000000Z-7", flush_rows=1, flush_seconds=3600)
    for i in range(3):
        first.add(_row(i))
    first.close()
    second = PartWriter(parts_dir, "20200101T000000000000Z-7", flush_rows=1, flush_seconds=3600)
    for i in range(3):
        second.add(_row(i))
    second.close()
    assert _names(parts_dir) == [p.name for p in first.written + second.written]


def test_no_temporary_file_remains(parts_dir: Path) -> None:
    """After count, timer and close commits only final `part-*.parquet` names are in the folder."""
    writer = PartWriter(parts_dir, "run1", flush_rows=2, flush_seconds=0.1)
    for i in range(3):
        writer.add(_row(i))
    assert _poll(lambda: len(_committed(parts_dir)) == 2)
    writer.add(_row(3))
    writer.close()
    names = _names(parts_dir)
    assert len(names) == 3
    assert all(n.startswith("part-") and n.endswith(".parquet") and not n.endswith(".tmp") for n in names)
    assert not any(n.startswith(".") for n in names)


def test_parts_are_what_run_state_reads_as_committed(tmp_path: Path) -> None:
    """Parts written by PartWriter into a state folder are the committed index RunState reads."""
    state = RunState(tmp_path / "out.parquet")
    state.create()
    writer = PartWriter(state.parts_dir, new_run_id(), flush_rows=3, flush_seconds=3600)
    for i in range(8):
        writer.add(_row(i))
    writer.close()
    assert state.part_paths() == writer.written
    index = state.committed()
    assert index.size == 8
    assert sorted(index.keys(ok_only=True).to_pylist()) == [_row(i)["key"] for i in range(8) if i % 4 != 3]
    assert index.error_counts() == {"decode": 2}


def test_failed_write_keeps_rows_buffered(tmp_path: Path) -> None:
    """If a part cannot be written the error reaches the caller and the rows stay for the next try."""
    parts_dir = tmp_path / "missing"
    writer = PartWriter(parts_dir, "run1", flush_rows=2, flush_seconds=3600)
    writer.add(_row(0))
    with pytest.raises(OSError):
        writer.add(_row(1))
    assert writer.written == [] and writer.rows_written == 0
    parts_dir.mkdir()
    writer.close()
    (part,) = writer.written
    assert _read(part) == [_row(0), _row(1)]

