"""`caprl repair`: a state with unreadable parts rebuilt from the published output, explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind, OutputLocked, StateError, UsageError
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.rows import EXPORTED_SHARD, PART_SCHEMA_WITH_IMAGES, caption_row, error_row
from caprl_cli.outputs.table import merge_output
from caprl_cli.outputs.webdataset import ShardTarget
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.fingerprint import fingerprint_of
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import PartWriter
from caprl_cli.state.repair import repair_state
from caprl_cli.state.sequence import REBUILT_SEQUENCE, sequence_of


def _ok(key: str, caption: str = "c") -> dict:
    return caption_row(key=key, source=f"/data/{key}", model="tiny", caption=caption, finish_reason="stop",
                       prompt_tokens=1, output_tokens=2, width=4, height=4, meta='{"k": 1}')


def _err(key: str) -> dict:
    return error_row(key=key, source=f"/data/{key}", model="tiny", kind=ErrorKind.DECODE, message="bad")


def _commit(state: RunState, rows: list[dict], schema=None) -> Path:
    writer = PartWriter(state.parts_dir, "run", flush_rows=len(rows) + 1, flush_seconds=3600,
                        **({"schema": schema} if schema is not None else {}))
    for row in rows:
        writer.add(row)
    writer.close()
    (part,) = writer.written
    return part


def _table_state(output: Path, fmt: str) -> RunState:
    state = RunState(output)
    state.create()
    state.write_fingerprint(fingerprint_of(CaptionSettings(inputs=("x",), output=output, output_format=fmt)))
    return state


def _latest(state: RunState) -> dict[str, tuple[str, str | None]]:
    """key -> (status, caption) of the latest committed row."""
    index = state.committed()
    found = {}
    for table in index.latest_tables(["key", "status", "caption"]):
        for row in table.to_pylist():
            found[row["key"]] = (row["status"], row["caption"])
    return found


def _read_output(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_repair_rebuilds_from_the_output_and_keeps_newer_rows(tmp_path: Path, fmt: str) -> None:
    """Merged parts: one readable (holding a row the damaged one superseded), one damaged. A part
    committed after the merge. Repair: the damaged part goes to unreadable/, the output's rows become
    the oldest part, the newer part still wins, and a merge reproduces every row the output held."""
    output = tmp_path / f"out.{fmt}"
    state = _table_state(output, fmt)
    _commit(state, [_err("a"), _ok("b", "b1")])
    damaged = _commit(state, [_ok("a", "a retried"), _ok("c", "c1")])
    merge_output(state, state.committed(), fmt, {})
    published = _read_output(output, fmt)
    newer = _commit(state, [_ok("b", "b newer"), _ok("d", "d1")])
    garbage = b"not parquet" * 10
    damaged.write_bytes(garbage)
    with pytest.raises(StateError):
        state.committed()

    report = repair_state(str(output), None, None)

    assert "unreadable" in report and "\n" not in report
    assert (state.dir / "unreadable" / damaged.name).read_bytes() == garbage
    rebuilt, kept = state.part_paths()
    assert sequence_of(rebuilt.name) == REBUILT_SEQUENCE and kept == newer
    assert _latest(state) == {
        "a": ("ok", "a retried"), "b": ("ok", "b newer"), "c": ("ok", "c1"), "d": ("ok", "d1"),
    }
    assert not state.output_is_current(state.part_paths())
    merge_output(state, state.committed(), fmt, {})
    rows = {row["key"]: row for row in _read_output(output, fmt)}
    for row in published:
        if row["key"] != "b":
            assert rows[row["key"]] == row  # every published row comes back unchanged
    assert rows["b"]["caption"] == "b newer" and set(rows) == {"a", "b", "c", "d"}


def test_repair_of_a_state_with_nothing_newer_makes_the_output_current(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    state = _table_state(output, "parquet")
    only = _commit(state, [_ok("a"), _ok("b")])
    merge_output(state, state.committed(), "parquet", {})
    before = output.read_bytes()
    only.write_bytes(b"")
    repair_state(str(output), None, None)
    assert state.output_is_current(state.part_paths())
    assert output.read_bytes() == before
    assert sorted(_latest(state)) == ["a", "b"]


def test_rows_only_a_damaged_unmerged_part_held_send_shards_to_be_read_again(tmp_path: Path) -> None:
    """A damaged part committed after the last merge held rows nothing else holds: the finished-shard
    records are set aside with it, so the next run reads those shards again."""
    output = tmp_path / "out.parquet"
    state = _table_state(output, "parquet")
    _commit(state, [_ok("a")])
    merge_output(state, state.committed(), "parquet", {})
    lost = _commit(state, [_ok("s0"), _ok("s1")])
    state.record_finished_shards("run", {"/in/shard.tar": {"samples": 2}})
    lost.write_bytes(b"junk" * 10)
    report = repair_state(str(output), None, None)
    assert "read again" in report
    assert state.finished_shards() == {}
    assert (state.dir / "unreadable" / lost.name).exists()
    assert sorted(_latest(state)) == ["a"]


def test_nothing_to_repair_changes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    state = _table_state(output, "parquet")
    part = _commit(state, [_ok("a")])
    merge_output(state, state.committed(), "parquet", {})
    report = repair_state(str(output), None, None)
    assert report.startswith("nothing to repair")
    assert state.part_paths() == [part] and not (state.dir / "unreadable").exists()


def test_repair_waits_for_no_one_a_locked_state_is_refused(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    state = _table_state(output, "parquet")
    _commit(state, [_ok("a")]).write_bytes(b"junk")
    holder = RunState(output)
    holder.acquire(wait=False)
    try:
        with pytest.raises(OutputLocked):
            repair_state(str(output), None, None)
    finally:
        holder.release()


def test_sidecar_and_unknown_outputs_are_usage_errors(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    with pytest.raises(UsageError, match="sidecar"):
        repair_state(str(folder), "sidecar", None)
    with pytest.raises(UsageError, match="no caprl run"):
        repair_state(str(tmp_path / "never.parquet"), None, None)


def test_damaged_published_output_refuses_and_changes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    state = _table_state(output, "parquet")
    part = _commit(state, [_ok("a")])
    merge_output(state, state.committed(), "parquet", {})
    part.write_bytes(b"junk")
    output.write_bytes(b"also junk")
    with pytest.raises(StateError, match="cannot be read"):
        repair_state(str(output), None, None)
    assert state.part_paths() == [part] and part.read_bytes() == b"junk"
    assert not [p for p in state.parts_dir.iterdir() if p.name != part.name]


def test_webdataset_repair_restores_every_row_and_its_shard(tmp_path: Path) -> None:
    """WebDataset: the damaged compacted part is rebuilt from the `.json` of every sample and the shard
    holding it; publishing again writes no shard and changes none."""
    out = tmp_path / "wds"
    target = ShardTarget(str(out) + "/", OutputOptions("webdataset", shard_size=2))
    state = RunState(None, state_dir=target.state_dir, label=target.label)
    state.create()
    state.write_fingerprint({"format": "webdataset"})
    rows = [{**_ok(f"k{i}"), "image": b"jpeg", "image_ext": "jpg"} for i in range(4)] + [_err("bad")]
    _commit(state, rows, schema=PART_SCHEMA_WITH_IMAGES)
    target.publish(state, state.committed(), {})
    shards = {path.name: path.read_bytes() for path in out.glob("*.tar")}
    (compacted,) = state.part_paths()
    compacted.write_bytes(b"garbage" * 5)

    repair_state(str(out) + "/", None, None)

    (rebuilt,) = state.part_paths()
    table = pq.read_table(rebuilt)
    assert sorted(table["key"].to_pylist()) == ["bad", "k0", "k1", "k2", "k3"]
    assert dict(zip(table["key"].to_pylist(), table[EXPORTED_SHARD].to_pylist())) == {
        "k0": 0, "k1": 0, "k2": 1, "k3": 1, "bad": 2,
    }
    assert {row["key"]: row["meta"] for row in table.to_pylist() if row["status"] == "ok"}["k0"] == '{"k": 1}'
    assert state.output_is_current(state.part_paths(), target.exists())
    extra = _commit(state, [{**_ok("k4"), "image": b"jpeg", "image_ext": "jpg"}], schema=PART_SCHEMA_WITH_IMAGES)
    assert extra in state.part_paths()
    target.publish(state, state.committed(), {})
    after = {path.name: path.read_bytes() for path in out.glob("*.tar")}
    assert {name: after[name] for name in shards} == shards  # untouched
    assert set(after) - set(shards) == {"000003.tar"}
