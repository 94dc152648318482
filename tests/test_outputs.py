"""Choosing and publishing targets without an engine: where state lives, what -o means per format, and
a remote upload that fails leaving the output to be published again."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import UsageError
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions, cache_state_dir
from caprl_cli.outputs.sidecar import SidecarTarget
from caprl_cli.outputs.table import FileTarget
from caprl_cli.outputs.webdataset import ShardTarget
from caprl_cli.outputs.rows import caption_row
from caprl_cli.state.folder import RunState
from caprl_cli.outputs.row_writers import rows_to_table


def test_targets_by_format_and_their_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = open_target(str(tmp_path / "o.parquet"), [], OutputOptions("parquet"))
    assert isinstance(local, FileTarget) and local.state_dir == tmp_path / "o.parquet.caprl"
    remote = open_target("memory://bucket/o.jsonl", [], OutputOptions("jsonl"))
    assert remote.state_dir == cache_state_dir("memory://bucket/o.jsonl")
    assert remote.state_dir.is_relative_to(tmp_path / "cache")
    given = open_target("memory://bucket/o.jsonl", [], OutputOptions("jsonl", state_dir=tmp_path / "s"))
    assert given.state_dir == tmp_path / "s"
    shards = open_target(str(tmp_path / "wds") + "/", [], OutputOptions("webdataset"))
    assert isinstance(shards, ShardTarget) and shards.state_dir == tmp_path / "wds" / ".caprl"
    (tmp_path / "pics").mkdir()
    sidecar = open_target(None, [str(tmp_path / "pics")], OutputOptions("sidecar"))
    assert isinstance(sidecar, SidecarTarget) and sidecar.state_dir == tmp_path / "pics" / ".caprl"


def test_missing_output_and_sidecar_without_a_local_folder_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        open_target(None, ["x"], OutputOptions("parquet"))
    with pytest.raises(UsageError):
        open_target(None, ["s3://bucket/x/"], OutputOptions("sidecar"))


def test_failed_upload_is_published_again(memory_fs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the upload of a remote output fails, the state must not say the output is current."""
    import caprl_cli.outputs.table as outputs

    target = FileTarget("memory://bucket/caps.parquet", OutputOptions("parquet", state_dir=tmp_path / "state"))
    state = RunState(None, state_dir=target.state_dir, label=target.label)
    state.create()
    for number, key in enumerate(["a", "b"]):
        row = caption_row(key=key, source=f"/{key}.jpg", model="m", caption="c", finish_reason="stop",
                          prompt_tokens=1, output_tokens=1, width=1, height=1)
        pq.write_table(rows_to_table([row]), state.parts_dir / f"part-2026010{number}T000000000000Z-1-0.parquet")
        if number == 0:
            target.publish(state, state.committed(), {})  # an older version is already in the bucket
    index = state.committed()

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset")

    with monkeypatch.context() as patch:
        patch.setattr(outputs, "upload", refuse)
        with pytest.raises(OSError):
            target.publish(state, index, {})
    assert not state.output_is_current(index.parts, target.exists())
    target.publish(state, index, {})
    assert state.output_is_current(index.parts, target.exists())
    with memory_fs.open("/bucket/caps.parquet", "rb") as handle:
        assert pq.read_table(handle)["key"].to_pylist() == ["a", "b"]
    assert not list(target.state_dir.glob("upload-*"))
