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


def test_an_upload_that_raises_is_published_again(memory_fs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the upload of a remote output fails with an error, the state must not say the output is
    current. (This tests error handling; an upload killed with SIGKILL is in test_crash_points.)"""
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


def _row(key: str) -> dict:
    return caption_row(key=key, source=f"/{key}.jpg", model="m", caption=f"c {key}", finish_reason="stop",
                       prompt_tokens=1, output_tokens=1, width=1, height=1)


@pytest.mark.parametrize("compact", [False, True])
def test_remote_merge_is_recorded_only_after_the_upload_completed(
    memory_fs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    """While the upload runs, `merged.json` still names what was published before (nothing, then the
    first merge's parts): a run killed mid-upload leaves an output the next run publishes again."""
    import caprl_cli.outputs.table as outputs
    from caprl_cli.state.parts import PartWriter

    if compact:
        monkeypatch.setattr(outputs, "COMPACT_ABOVE_PARTS", 1)
    target = FileTarget("memory://bucket/caps.parquet", OutputOptions("parquet", state_dir=tmp_path / "state"))
    state = RunState(None, state_dir=target.state_dir, label=target.label)
    state.create()
    seen_during_upload: list[list[str] | None] = []
    real_upload = outputs.upload

    def watched_upload(*args: object, **kwargs: object) -> None:
        seen_during_upload.append(state.merged_parts())
        real_upload(*args, **kwargs)

    monkeypatch.setattr(outputs, "upload", watched_upload)
    for keys in (["a", "b"], ["c", "d"]):
        writer = PartWriter(state.parts_dir, "run", flush_rows=1, flush_seconds=3600)
        for key in keys:
            writer.add(_row(key))
        writer.close()
        before = state.merged_parts()
        target.publish(state, state.committed(), {})
        assert seen_during_upload[-1] == before
        assert state.merged_parts() == [part.name for part in state.part_paths()] != before
    assert state.output_is_current(state.part_paths(), target.exists())
    with memory_fs.open("/bucket/caps.parquet", "rb") as handle:
        assert sorted(pq.read_table(handle)["key"].to_pylist()) == ["a", "b", "c", "d"]


def test_remote_shards_are_recorded_only_after_every_shard_is_uploaded(
    memory_fs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WebDataset: each shard upload happens while the merge record still names the earlier parts."""
    import caprl_cli.outputs.tar_shards as tar_shards
    from caprl_cli.outputs.rows import PART_SCHEMA_WITH_IMAGES
    from caprl_cli.state.parts import PartWriter

    target = ShardTarget("memory://bucket/wds/", OutputOptions("webdataset", shard_size=1, state_dir=tmp_path / "s"))
    state = RunState(None, state_dir=target.state_dir, label=target.label)
    state.create()
    seen: list[list[str] | None] = []
    real_commit = tar_shards._Place.commit

    def watched_commit(self: object, built: Path, name: str) -> None:
        seen.append(state.merged_parts())
        real_commit(self, built, name)

    monkeypatch.setattr(tar_shards._Place, "commit", watched_commit)
    writer = PartWriter(state.parts_dir, "run", flush_rows=1, flush_seconds=3600, schema=PART_SCHEMA_WITH_IMAGES)
    for key in ("a", "b"):
        writer.add({**_row(key), "image": b"jpeg", "image_ext": "jpg"})
    writer.close()
    target.publish(state, state.committed(), {})
    assert seen == [None, None]
    assert state.merged_parts() == [part.name for part in state.part_paths()]
    assert target.numbers() == [0, 1]
