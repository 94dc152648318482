"""The tools around Parquet dataset folders and node shares: `caprl merge` reading and writing dataset
folders, `caprl status`/`caprl repair` finding a share's state inside a folder, `--dry-run` planning
one share, and the compaction that keeps a folder's state from piling up one part per publish.

Everything runs on real state folders, parts and files (published through `DatasetTarget`, no engine);
the CLI commands run in a subprocess. The compaction's crash test SIGKILLs a real process at each of
its steps and checks the next publish recovers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dataset_rows import MODEL, bad, commit_rows, keys_of, ok, target_of
from PIL import Image

from caprl_cli.errors import ErrorKind
from caprl_cli.faults import CRASH_ENV
from caprl_cli.outputs.parquet_dataset import DATASET_FILE, DatasetTarget, is_published_part
from caprl_cli.outputs.row_writers import PROVENANCE_KEY
from caprl_cli.outputs.rows import error_row, withdrawal_row
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.fingerprint import fingerprint_of
from caprl_cli.state.folder import RunState
from caprl_cli.state.shares import share_of

PROVENANCE = {"model": MODEL, "prompt": "p", "engine": "transformers", "run": {"finished_at": "2024-01-01T00:00:00"}}


def settings_of(folder: Path, share: tuple[int, int] | None = None) -> CaptionSettings:
    count, index = (share[1], share[0]) if share else (None, None)
    return CaptionSettings(inputs=("x",), output=f"{folder}/", output_format="parquet", model=MODEL,
                           num_shards=count, shard_index=index)


def publish(target: DatasetTarget, rows: list[dict], provenance: dict | None = None) -> RunState:
    """Commit `rows` as one run's parts (fingerprinted as a caption run would), then publish them."""
    state = RunState(None, state_dir=target.state_dir, label=target.label)
    if not state.exists():
        state.create()
        share = target.share
        state.write_fingerprint(fingerprint_of(settings_of(Path(target.directory), share)))
    commit_rows(state, rows)
    target.publish(state, state.committed(), provenance or PROVENANCE)
    return state


# -- --dry-run with a share ------------------------------------------------------------------------------


def test_dry_run_counts_only_its_share(tmp_path: Path) -> None:
    from caprl_cli.dry_run import preview_run

    images = tmp_path / "images"
    images.mkdir()
    names = [f"img-{i:02d}.png" for i in range(12)]
    for name in names:
        Image.new("RGB", (8, 8)).save(images / name)
    mine = [name for name in names if share_of(name, 2) == 0]
    assert 0 < len(mine) < len(names)
    settings = dataclasses.replace(settings_of(tmp_path / "caps", (0, 2)), inputs=(str(images),))
    found = preview_run(settings)
    assert found.to_caption == len(mine)
    assert found.inputs == len(mine)


# -- status and repair find a dataset folder, and a share's state inside it -------------------------------


@pytest.fixture
def shared_folder(tmp_path: Path) -> Path:
    """A dataset folder two shares wrote into; share 1 holds an error row."""
    folder = tmp_path / "caps"
    publish(target_of(folder, share=(0, 2)), [ok("a"), ok("b"), ok("c")])
    publish(target_of(folder, share=(1, 2)), [ok("d"), bad("e")])
    return folder


def test_status_finds_a_share_state_in_a_dataset_folder_without_state_dir(shared_folder: Path) -> None:
    from caprl_cli.status import output_status

    for spelling in (str(shared_folder), f"{shared_folder}/"):
        found = output_status(spelling, [], share=(1, 2))
        assert (found["done"], found["ok"], found["errors"]) == (2, 1, 1)
        assert found["share"] == {"index": 1, "count": 2}
        assert output_status(spelling, [], "parquet", share=(0, 2))["done"] == 3


def test_status_without_a_share_names_the_shares_the_folder_holds(shared_folder: Path) -> None:
    from caprl_cli.errors import UsageError
    from caprl_cli.status import output_status

    with pytest.raises(UsageError, match="--num-shards 2 --shard-index 0, --num-shards 2 --shard-index 1"):
        output_status(str(shared_folder), [])


def test_status_refuses_a_share_the_state_does_not_record(tmp_path: Path) -> None:
    """A share's single-file output read with another --shard-index: refused, not reported as that share."""
    from caprl_cli.errors import UsageError
    from caprl_cli.status import output_status

    output = tmp_path / "share-0.parquet"
    state = RunState(output)
    state.create()
    state.write_fingerprint(fingerprint_of(dataclasses.replace(settings_of(tmp_path, (0, 2)), output=str(output))))
    assert output_status(str(output), [], share=(0, 2))["share"] == {"index": 0, "count": 2}
    with pytest.raises(UsageError, match="records share 0 of 2, not share 1 of 2"):
        output_status(str(output), [], share=(1, 2))


def test_status_cli_takes_the_share_options(shared_folder: Path, run_caprl) -> None:
    result = run_caprl("status", shared_folder, "--num-shards", "2", "--shard-index", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["done"] == 3
    result = run_caprl("status", shared_folder, "--num-shards", "2")
    assert result.returncode == 2 and "--shard-index" in result.stderr and "Traceback" not in result.stderr


def test_repair_detects_a_dataset_folder_and_rebuilds_a_share_from_its_files(shared_folder: Path) -> None:
    from caprl_cli.state.repair import repair_state

    state = RunState(None, state_dir=shared_folder / ".caprl-share-1-of-2")
    state.part_paths()[0].write_bytes(b"damaged")
    report = repair_state(str(shared_folder), None, None, share=(1, 2))
    assert "rebuilt 2 rows" in report
    index = state.committed()
    assert sorted(index.keys().to_pylist()) == ["d", "e"]
    # the rebuilt part knows which file holds each row: a retried error row leaves its file
    publish(target_of(shared_folder, share=(1, 2)), [ok("e")])
    assert keys_of(shared_folder) == ["a", "b", "c", "d", "e"]


def test_repair_of_a_whole_dataset_folder_needs_no_format(tmp_path: Path) -> None:
    from caprl_cli.state.repair import repair_state

    folder = tmp_path / "caps"
    state = publish(target_of(folder), [ok("a"), ok("b"), bad("c"), ok("d")])
    state.part_paths()[0].write_bytes(b"damaged")
    assert "rebuilt 4 rows" in repair_state(str(folder), None, None)
    assert all(is_published_part(part) for part in state.part_paths())


# -- caprl merge: dataset folders in and out ---------------------------------------------------------------


def parquet_file(path: Path, rows: list[dict], provenance: dict | None = None) -> Path:
    from caprl_cli.outputs.row_writers import ParquetRowWriter

    writer = ParquetRowWriter(path)
    writer.write(rows)
    writer.commit(provenance or {**PROVENANCE, "run": {"finished_at": "2025-01-01T00:00:00"}})
    return path


def test_merge_reads_a_dataset_folder_with_a_parquet_file(shared_folder: Path, tmp_path: Path) -> None:
    from caprl_cli.outputs.merging import merge_outputs

    later = parquet_file(tmp_path / "later.parquet", [ok("e"), ok("f")])
    report = merge_outputs([str(shared_folder), str(later)], str(tmp_path / "m.parquet"))
    table = pq.read_table(tmp_path / "m.parquet")
    assert sorted(table["key"].to_pylist()) == list("abcdef") and report.duplicates == 1
    assert dict(zip(table["key"].to_pylist(), table["status"].to_pylist()))["e"] == "ok"
    provenance = json.loads(pq.read_metadata(tmp_path / "m.parquet").metadata[PROVENANCE_KEY.encode()])
    first = provenance["merge"]["inputs"][0]
    assert (first["format"], first["rows"], first["provenance"]["model"]) == ("parquet", 5, MODEL)


def test_merge_refuses_a_dataset_whose_files_were_captioned_otherwise(tmp_path: Path) -> None:
    from caprl_cli.errors import UsageError
    from caprl_cli.outputs.merging import merge_outputs

    folder = tmp_path / "caps"
    publish(target_of(folder), [ok("a")])
    publish(target_of(folder), [ok("b")], {**PROVENANCE, "prompt": "Name the colours."})
    other = parquet_file(tmp_path / "x.parquet", [ok("c")])
    with pytest.raises(UsageError, match="prompt"):
        merge_outputs([str(other), str(folder)], str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()
    assert merge_outputs([str(other), str(folder)], str(tmp_path / "m.parquet"), force=True).forced


def test_merge_writes_a_dataset_folder_of_bounded_files(shared_folder: Path, tmp_path: Path) -> None:
    import pandas as pd

    from caprl_cli.outputs.merging import merge_outputs

    out = tmp_path / "merged"
    extra = parquet_file(tmp_path / "extra.parquet", [ok("f"), ok("g")])
    merge_outputs([str(extra), str(shared_folder)], f"{out}/", output_format="parquet", rows_per_file=2)
    names = sorted(path.name for path in out.glob("*.parquet"))
    assert names == [f"captions-{n:06d}.parquet" for n in range(4)]
    assert all(pq.read_metadata(out / name).num_rows <= 2 for name in names)
    assert sorted(pd.read_parquet(out)["key"]) == list("abcdefg")
    assert json.loads((out / ".caprl" / "summary.json").read_text())["counts"]["images"] == 7
    # a merged folder is itself a merge input (no caption state in it: found by its Parquet files)
    merge_outputs([str(out)], str(tmp_path / "again.jsonl"))
    assert len((tmp_path / "again.jsonl").read_text().splitlines()) == 7
    # merged again from less: the earlier merge's files beyond the new ones are gone
    merge_outputs([str(extra)], f"{out}/", output_format="parquet", rows_per_file=2)
    assert sorted(path.name for path in out.glob("*.parquet")) == ["captions-000000.parquet"]
    assert sorted(pd.read_parquet(out)["key"]) == ["f", "g"]


def test_merge_into_a_caption_runs_dataset_folder_is_refused(shared_folder: Path, tmp_path: Path, run_caprl) -> None:
    extra = parquet_file(tmp_path / "extra.parquet", [ok("f")])
    before = sorted(path.name for path in shared_folder.iterdir())
    result = run_caprl("merge", extra, "-o", f"{shared_folder}/", "--format", "parquet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "caption run" in result.stderr
    assert sorted(path.name for path in shared_folder.iterdir()) == before
    (tmp_path / "foreign").mkdir()
    parquet_file(tmp_path / "foreign" / "theirs.parquet", [ok("z")])
    result = run_caprl("merge", extra, "-o", f"{tmp_path / 'foreign'}/", "--format", "parquet")
    assert result.returncode == 2 and "other Parquet files" in result.stderr
    result = run_caprl("merge", extra, shared_folder, "-o", f"{tmp_path / 'ok'}/", "--format", "parquet")
    assert result.returncode == 0, result.stderr
    assert sorted(pq.read_table(tmp_path / "ok")["key"].to_pylist()) == list("abcdef")


# -- compaction of a dataset folder's published state parts ------------------------------------------------

PUBLISHES = 64  # COMPACT_ABOVE_PARTS: the next publish compacts


def file_digests(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def many_publishes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder after one publish an hour for PUBLISHES hours (k05 an error row), one state part each."""
    from caprl_cli.outputs.table import COMPACT_ABOVE_PARTS

    assert COMPACT_ABOVE_PARTS == PUBLISHES
    folder = tmp_path_factory.mktemp("hourly") / "caps"
    target = target_of(folder)
    for hour in range(PUBLISHES):
        state = publish(target, [bad(f"k{hour:02d}") if hour == 5 else ok(f"k{hour:02d}")])
    assert len(state.part_paths()) == PUBLISHES
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(folder, tmp_path / "caps")
    return tmp_path / "caps"


def assert_consistent(folder: Path, keys: list[str]) -> RunState:
    """Every key once in the files and in the state, the state's record current, few parts, no temporaries."""
    state = RunState(None, state_dir=folder / ".caprl")
    assert keys_of(folder) == keys
    index = state.committed()
    assert sorted(index.keys().to_pylist()) == keys
    parts = state.part_paths()
    assert all(is_published_part(part) for part in parts) and len(parts) <= PUBLISHES
    assert state.merged_parts() == [part.name for part in parts]
    assert [path.name for path in state.parts_dir.iterdir() if path.name.startswith(".")] == []
    return state


def test_published_parts_are_compacted_and_files_stay_byte_identical(many_publishes: Path, tmp_path: Path) -> None:
    folder = copy_of(many_publishes, tmp_path)
    before = file_digests(folder)
    publish(target_of(folder), [ok("k64")])
    keys = [f"k{hour:02d}" for hour in range(PUBLISHES + 1)]
    state = assert_consistent(folder, keys)
    assert len(state.part_paths()) == 32
    after = file_digests(folder)
    assert {name: after[name] for name in before} == before
    # a compacted part still knows each row's file: the retried error row leaves (only) its own file
    holder = next(name for name in before if "k05" in pq.read_table(folder / name)["key"].to_pylist())
    compacted = pq.read_table(state.part_paths()[-1], columns=["key", DATASET_FILE])
    assert dict(zip(compacted["key"].to_pylist(), compacted[DATASET_FILE].to_pylist()))["k05"] == holder
    publish(target_of(folder), [ok("k05")])
    assert holder not in file_digests(folder)
    assert sorted(set(before) - set(file_digests(folder))) == [holder]
    table = pq.read_table(folder)
    assert dict(zip(table["key"].to_pylist(), table["status"].to_pylist()))["k05"] == "ok"
    assert_consistent(folder, keys)


def test_a_withdrawal_survives_compaction(many_publishes: Path, tmp_path: Path) -> None:
    folder = copy_of(many_publishes, tmp_path)
    placeholder = {**error_row(key="s.tar@0", source="s.tar", model=MODEL, kind=ErrorKind.SHARD, message="cut"),
                   "signature": None}
    publish(target_of(folder), [placeholder])  # the 65th publish: compacted, the placeholder among them
    publish(target_of(folder), [{**withdrawal_row(key="s.tar@0", source="s.tar", model=MODEL), "signature": None}])
    for hour in range(40):  # enough publishes for the withdrawal's own part to be compacted too
        publish(target_of(folder), [ok(f"n{hour:02d}")])
    keys = sorted([f"k{hour:02d}" for hour in range(PUBLISHES)] + [f"n{hour:02d}" for hour in range(40)])
    state = assert_consistent(folder, keys)
    compacted = [part for part in state.part_paths() if part.name.endswith("-compacted.parquet")]
    rows = pq.read_table(compacted[-1], columns=["key", "status"]).to_pylist()
    assert {"key": "s.tar@0", "status": "withdrawn"} in rows  # the withdrawal's own part was compacted


@pytest.mark.parametrize("point", ["dataset.compacted", "dataset.compact_recorded"])
def test_a_compaction_killed_at_any_step_loses_nothing(many_publishes: Path, tmp_path: Path, point: str) -> None:
    """SIGKILL (a real one, `caprl_cli.faults`) at each compaction step of a real publish process; the
    next publish leaves every key once and the state compacted."""
    folder = copy_of(many_publishes, tmp_path)
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_dataset_tools import ok, publish, target_of; publish(target_of(Path(sys.argv[2])), [ok('k64')])"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(folder)],
                            env={**os.environ, CRASH_ENV: point}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert keys_of(folder) == [f"k{hour:02d}" for hour in range(PUBLISHES + 1)]  # the files were published
    publish(target_of(folder), [ok("k65")])
    state = assert_consistent(folder, [f"k{hour:02d}" for hour in range(PUBLISHES + 2)])
    assert len(state.part_paths()) <= 33
