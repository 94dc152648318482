"""Publishing WebDataset shards from the state, and a publish that fails with an error (disk full) at
each step: every key ends up in exactly one shard, with its latest row. No engine runs here; parts are
written as a run writes them (rows plus original image bytes). Kills (SIGKILL, no cleanup) at each
step are tested on the real CLI in test_crash_points."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.webdataset import ShardTarget
from caprl_cli.state.parts import new_run_id
from caprl_cli.state.sequence import next_sequence, part_name
from caprl_cli.outputs.rows import PART_SCHEMA_WITH_IMAGES, caption_row, error_row
from caprl_cli.state.folder import RunState
from caprl_cli.inputs.shards import split_member_name
from caprl_cli.outputs.row_writers import rows_to_table


def _ok(key: str) -> dict:
    row = caption_row(key=key, source=f"/data/{key}.jpg", model="tiny", caption=f"caption of {key}",
                      finish_reason="stop", prompt_tokens=3, output_tokens=4, width=8, height=8)
    return {**row, "image": f"jpeg bytes of {key}".encode(), "image_ext": "jpg"}


def _err(key: str) -> dict:
    return error_row(key=key, source=f"/data/{key}.jpg", model="tiny", kind=ErrorKind.DECODE, message="bad")


class Publisher:
    """A WebDataset target in `tmp_path/out` and its state; `commit` writes one part like a run does."""

    def __init__(self, tmp_path: Path) -> None:
        self.target = ShardTarget(str(tmp_path / "out") + "/", OutputOptions("webdataset", shard_size=2))
        self.state = RunState(None, state_dir=self.target.state_dir, label="out")
        self.state.create()
        self.parts = 0

    def commit(self, rows: list[dict]) -> None:
        # The state's next sequence number, as a run takes it: sorts after every part so far.
        name = part_name(next_sequence(self.state.parts_dir), new_run_id(), f"{self.parts:09d}")
        pq.write_table(rows_to_table(rows, PART_SCHEMA_WITH_IMAGES), self.state.parts_dir / name)
        self.parts += 1

    def publish(self) -> None:
        self.target.remove_stale_temporaries()
        self.target.publish(self.state, self.state.committed(), {})

    def samples(self) -> dict[str, list[tuple[str, str]]]:
        """Per key, every (shard, status) it appears with across the published shards."""
        found: dict[str, list[tuple[str, str]]] = {}
        for shard in sorted(Path(self.target.directory).glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
            keys = Counter(split_member_name(name)[0] for name in members)
            for key in keys:
                status = "ok" if f"{key}.txt" in members else "error"
                found.setdefault(key, []).append((shard.name, status))
        return found


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return Publisher(tmp_path)


def test_runs_add_shards_and_retries_replace_rows(publisher: Publisher) -> None:
    publisher.commit([_ok("a"), _err("b"), _ok("c")])
    publisher.publish()
    assert publisher.samples() == {"a": [("000000.tar", "ok")], "c": [("000000.tar", "ok")],
                                   "b": [("000001.tar", "error")]}
    publisher.commit([_ok("b"), _ok("d")])  # b captioned again (--retry-errors), d new
    publisher.publish()
    found = publisher.samples()
    assert {key: [status for _, status in places] for key, places in found.items()} == {
        "a": ["ok"], "b": ["ok"], "c": ["ok"], "d": ["ok"]}
    assert found["b"][0][0] == "000002.tar"  # the new row went to a new shard, the old one was dropped
    parts = publisher.state.part_paths()
    assert len(parts) == 1 and "image" not in pq.read_schema(parts[0]).names  # images gone once published


@pytest.mark.parametrize("fail_at", ["rewrite", "compacted-commit", "record-merge"])
def test_a_publish_that_raises_at_any_step_is_repaired_by_the_next(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    """An OSError (disk full) after the new shards exist (before the stale row is dropped), while the
    compacted part is committed, or while the merge is recorded: the error's cleanup runs, and the next
    publish leaves each key exactly once. This tests error handling; kills are in test_crash_points."""
    import caprl_cli.outputs.webdataset as outputs

    publisher.commit([_ok("a"), _err("b"), _ok("c")])
    publisher.publish()
    publisher.commit([_ok("b"), _ok("d"), _ok("e")])

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, f"No space left on device ({fail_at})")

    with monkeypatch.context() as patch:
        if fail_at == "rewrite":
            patch.setattr(outputs, "rewrite_without", disk_full)
        elif fail_at == "compacted-commit":
            patch.setattr(outputs.ParquetRowWriter, "commit", disk_full)
        else:
            patch.setattr(publisher.state, "record_merge", disk_full)
        with pytest.raises(OSError, match="No space left"):
            publisher.publish()
    publisher.publish()
    found = publisher.samples()
    assert sorted(found) == ["a", "b", "c", "d", "e"]
    assert all(len(places) == 1 and places[0][1] == "ok" for places in found.values()), found
    assert not [path for path in Path(publisher.target.directory).iterdir() if path.name.endswith(".tmp")]
    publisher.publish()  # nothing new: nothing changes
    assert publisher.samples() == found
