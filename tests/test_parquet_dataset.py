"""The Parquet dataset folder (`-o folder/ --format parquet`): a run adds files and leaves earlier ones
byte-identical, rows replaced by `--retry-errors` are dropped from the one file that held them, shares of
`--num-shards` write into one folder, and pandas, DuckDB, pyarrow.dataset and `datasets` read it as one
table. Crash points (kill -9 at every publish step) are in tests/test_crash_points.py.

Publishing is tested on real state folders and parts (no engine); one scenario runs the real CLI with
the transformers engine and the tiny model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset_rows import MODEL, bad, commit_rows, keys_of, ok, target_of

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.parquet_dataset import DatasetTarget
from caprl_cli.outputs.rows import error_row, withdrawal_row
from caprl_cli.state.folder import RunState
from caprl_cli.state.shares import share_of


def run(target: DatasetTarget, rows: list[dict]) -> RunState:
    """Commit `rows` as one run's parts (one row per part, as a run flushing often does), then publish."""
    state = RunState(None, state_dir=target.state_dir, label=target.label)
    state.create()
    commit_rows(state, rows)
    target.publish(state, state.committed(), {"run": "test"})
    return state


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.parquet"))}


def test_a_second_run_adds_files_and_leaves_earlier_ones_byte_identical(tmp_path: Path) -> None:
    target = target_of(tmp_path / "caps")
    run(target, [ok(f"k{i}") for i in range(5)])
    first = digests(tmp_path / "caps")
    assert list(first) == ["captions-000000.parquet", "captions-000001.parquet"]
    state = run(target, [ok(f"k{i}") for i in range(5, 9)])
    after = digests(tmp_path / "caps")
    assert {name: after[name] for name in first} == first
    assert sorted(set(after) - set(first)) == ["captions-000002.parquet", "captions-000003.parquet"]
    assert keys_of(tmp_path / "caps") == sorted(f"k{i}" for i in range(9))
    assert pq.read_metadata(tmp_path / "caps" / "captions-000002.parquet").metadata[b"caprl"] == b'{"run": "test"}'
    # The state holds one published part per publish, not the run's many small parts.
    assert len(state.part_paths()) == 2
    assert state.merged_parts() == [part.name for part in state.part_paths()]


def test_a_replaced_error_row_rewrites_only_the_file_that_held_it(tmp_path: Path) -> None:
    target = target_of(tmp_path / "caps")
    run(target, [ok("a"), ok("b"), ok("c"), ok("d"), bad("e"), ok("f")])
    holder = next(name for name in digests(tmp_path / "caps")
                  if "e" in pq.read_table(tmp_path / "caps" / name)["key"].to_pylist())
    before = digests(tmp_path / "caps")
    run(target, [ok("e"), ok("g")])
    after = digests(tmp_path / "caps")
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert changed == [holder]
    table = pq.read_table(tmp_path / "caps")
    assert sorted(table["key"].to_pylist()) == list("abcdefg")
    assert set(table.filter(pc.equal(table["key"], "e"))["status"].to_pylist()) == {"ok"}


def test_a_file_left_without_rows_is_removed_and_stays_removed(tmp_path: Path) -> None:
    """An empty Parquet file breaks `datasets`: a file whose every row was replaced goes away."""
    target = target_of(tmp_path / "caps", rows_per_file=2)
    run(target, [bad("a"), bad("b"), ok("c")])
    assert sorted(digests(tmp_path / "caps")) == ["captions-000000.parquet", "captions-000001.parquet"]
    state = run(target, [ok("a"), ok("b")])
    assert sorted(digests(tmp_path / "caps")) == ["captions-000001.parquet", "captions-000002.parquet"]
    assert keys_of(tmp_path / "caps") == ["a", "b", "c"]
    run(target, [ok("d")])  # the removed file is not written again
    assert "captions-000000.parquet" not in digests(tmp_path / "caps")
    assert len(state.part_paths()) == 3


def test_a_withdrawn_placeholder_leaves_its_file_and_stays_withdrawn(tmp_path: Path) -> None:
    target = target_of(tmp_path / "caps")
    placeholder = error_row(key="s.tar@0", source="s.tar", model=MODEL, kind=ErrorKind.SHARD, message="cut")
    run(target, [ok("a"), {**placeholder, "signature": None}])
    state = run(target, [{**withdrawal_row(key="s.tar@0", source="s.tar", model=MODEL), "signature": None}, ok("b")])
    assert keys_of(tmp_path / "caps") == ["a", "b"]
    assert "s.tar@0" not in state.committed().keys().to_pylist()


def test_a_file_published_but_not_recorded_is_replaced_without_duplicates(tmp_path: Path) -> None:
    """A leftover of a publish killed before its state part was committed: removed, rows published once."""
    target = target_of(tmp_path / "caps")
    run(target, [ok("a")])
    leftover = tmp_path / "caps" / "captions-000001.parquet"
    leftover.write_bytes((tmp_path / "caps" / "captions-000000.parquet").read_bytes())
    run(target, [ok("b")])
    assert keys_of(tmp_path / "caps") == ["a", "b"]


def test_a_recorded_file_deleted_by_hand_is_written_again_from_the_state(tmp_path: Path) -> None:
    target = target_of(tmp_path / "caps")
    run(target, [ok("a"), ok("b"), ok("c"), ok("d")])
    (tmp_path / "caps" / "captions-000000.parquet").unlink()
    run(target, [ok("e")])
    assert keys_of(tmp_path / "caps") == ["a", "b", "c", "d", "e"]


def test_shares_write_into_one_folder_with_their_own_files_and_states(tmp_path: Path) -> None:
    folder = tmp_path / "caps"
    first, second = target_of(folder, share=(0, 2)), target_of(folder, share=(1, 2))
    assert first.state_dir != second.state_dir
    run(first, [ok("a"), ok("b")])
    run(second, [ok("c")])
    run(first, [ok("d")])
    assert sorted(digests(folder)) == [
        "captions-0-of-2-000000.parquet", "captions-0-of-2-000001.parquet", "captions-1-of-2-000000.parquet"
    ]
    assert keys_of(folder) == ["a", "b", "c", "d"]


def test_a_folder_with_format_parquet_is_a_dataset_and_without_it_stays_webdataset(tmp_path: Path) -> None:
    from caprl_cli.errors import UsageError
    from caprl_cli.settings import output_format_for

    assert output_format_for("caps/", None) == "webdataset"
    assert output_format_for("caps/", "parquet") == "parquet"
    assert isinstance(open_target("s3://bucket/caps/", [], OutputOptions("parquet")), DatasetTarget)
    assert not isinstance(open_target(str(tmp_path / "caps.parquet"), [], OutputOptions("parquet")), DatasetTarget)
    with pytest.raises(UsageError, match="contradicts"):
        output_format_for("caps/", "jsonl")


# -- the real CLI ---------------------------------------------------------------------------------------

ENGINE = ("--engine", "transformers", "--max-tokens", "4", "--no-progress", "--workers", "0", "--rows-per-file", "2")
BAD = "a-bad.png"


def read_everywhere(folder: Path) -> dict[str, list[str]]:
    """The keys each reader users have sees in the folder."""
    import datasets
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    loaded = datasets.load_dataset("parquet", data_dir=str(folder), cache_dir=str(folder.parent / "hf-cache"))
    return {
        "pandas": sorted(pd.read_parquet(folder)["key"]),
        "duckdb": sorted(row[0] for row in duckdb.sql(f"SELECT key FROM read_parquet('{folder}/*.parquet')").fetchall()),
        "pyarrow": sorted(pads.dataset(folder, format="parquet").to_table()["key"].to_pylist()),
        "datasets": sorted(loaded["train"]["key"]),
    }


def test_cli_runs_grow_the_folder_replace_one_file_and_shares_share_it(tmp_path: Path, tiny_model: Path,
                                                                       run_caprl) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / BAD).write_bytes(b"not an image")
    for i in range(6):
        Image.new("RGB", (28 + 4 * i, 28), (40 * i, 90, 160)).save(images / f"img-{i}.png")
    names = sorted(path.name for path in images.iterdir())
    share = share_of(BAD, 2)  # the share that holds the broken image
    mine = [name for name in names if share_of(name, 2) == share]
    other = [name for name in names if share_of(name, 2) != share]
    assert len(mine) >= 3 and other, "the images must split so both shares have work"
    folder = tmp_path / "caps"

    def caption(index: int, *extra: str) -> None:
        result = run_caprl("caption", images, "-o", f"{folder}/", "--format", "parquet", "--model", tiny_model,
                           *ENGINE, "--num-shards", "2", "--shard-index", str(index), *extra)
        assert result.returncode == 0, result.stderr[-3000:]

    caption(share, "--limit", "2")
    first = digests(folder)
    caption(share)
    grown = digests(folder)
    assert {name: grown[name] for name in first} == first and len(grown) > len(first)
    caption(1 - share)
    both = digests(folder)
    assert {name: both[name] for name in grown} == grown
    assert all(name.startswith(f"captions-{1 - share}-of-2-") for name in set(both) - set(grown))

    holder = next(name for name in grown if BAD in pq.read_table(folder / name)["key"].to_pylist())
    (images / BAD).unlink()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(images / BAD)
    caption(share, "--retry-errors")
    after = digests(folder)
    assert sorted(name for name in both if after.get(name) != both[name]) == [holder]
    seen = read_everywhere(folder)
    assert seen == {reader: names for reader in seen}
    status = run_caprl("status", f"{folder}/", "--format", "parquet", "--state-dir",
                       folder / f".caprl-share-{share}-of-2")
    assert status.returncode == 0 and f"{len(mine)} done ({len(mine)} ok, 0 errors)" in status.stdout


def test_repair_rebuilds_an_unreadable_state_from_the_files(tmp_path: Path) -> None:
    from caprl_cli.state.repair import repair

    target = target_of(tmp_path / "caps")
    state = run(target, [ok("a"), ok("b"), ok("c"), bad("d")])
    files = digests(tmp_path / "caps")
    state.part_paths()[0].write_bytes(b"damaged")
    assert "rebuilt 4 rows" in repair(state, target)
    run(target, [ok("d"), ok("e")])  # replaces d's error row: its file is found through the rebuilt part
    assert keys_of(tmp_path / "caps") == ["a", "b", "c", "d", "e"]
    assert sum(digests(tmp_path / "caps").get(name) == digest for name, digest in files.items()) == len(files) - 1
