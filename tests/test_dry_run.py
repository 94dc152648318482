"""`caprl caption --dry-run`: the plan of the run the same command would do, with nothing written, locked or
loaded. One real run (transformers engine, tiny model) sets up an output with a committed error row and
images left; every dry run compares the whole directory tree before and after."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_shard

ENGINE = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "2", "--no-progress")


def tree(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under `root`: kind, size and modification time (a folder's changes when an entry is
    created in it, even one removed again, such as a lock file)."""
    found = {".": ("dir", 0, root.stat().st_mtime_ns)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", stat.st_size, stat.st_mtime_ns)
    return found


def facts(stdout: str) -> dict[str, str]:
    """`name: value` lines of the dry run's report."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def count(value: str) -> int:
    return int(value.split()[0])


def make_images(folder: Path, good: int, broken: int = 0) -> Path:
    folder.mkdir(parents=True)
    for index in range(broken):  # sorts first, so a --limit run reaches it
        (folder / f"0-broken-{index}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for index in range(good):
        Image.new("RGB", (40 + 8 * index, 40), (30 * index % 256, 90, 160)).save(folder / f"img-{index:02d}.jpg")
    return folder


def dry_run(run_caprl, root: Path, *args: str | Path):
    """A dry run; asserts it changed nothing under `root`."""
    before = tree(root)
    result = run_caprl("caption", *args, "--dry-run")
    assert tree(root) == before, "a dry run changed the directory tree"
    return result


def test_fresh_folder_plans_everything_and_loads_no_model(run_caprl, tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", good=5, broken=1)
    # a hub id that is not cached: offline, a run fails getting it; a dry run never loads a model
    result = dry_run(
        run_caprl, tmp_path, images, "-o", tmp_path / "out.parquet", "--model", "nobody/no-such-model", *ENGINE
    )
    assert result.returncode == 0, result.stderr
    found = facts(result.stdout)
    assert count(found["images to caption"]) == 6
    assert count(found["already done"]) == 0
    assert found["estimated time"].startswith("unknown")
    assert not (tmp_path / "out.parquet.caprl").exists()


def test_limit_caps_images_to_caption(run_caprl, tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", good=5)
    result = dry_run(run_caprl, tmp_path, images, "-o", tmp_path / "out.jsonl", "--limit", "2", *ENGINE)
    assert result.returncode == 0, result.stderr
    found = facts(result.stdout)
    assert count(found["images to caption"]) == 2
    assert "5 not done" in found["images to caption"]


def test_shards_left_are_counted_without_opening_them(run_caprl, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    for number in range(3):
        write_shard(shards / f"s-{number}.tar", [{"__key__": f"k{number}", "jpg": b"bytes"}])
    result = dry_run(
        run_caprl, tmp_path, str(shards / "s-{0..2}.tar"), "-o", tmp_path / "out.parquet", *ENGINE
    )
    assert result.returncode == 0, result.stderr
    found = facts(result.stdout)
    assert count(found["shards left"]) == 3
    assert count(found["images to caption"]) == 0


@pytest.fixture(scope="module")
def resumed(run_caprl, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A folder of 7 images (one broken, sorting first) after one real run with --limit 3: one error
    row, two captions, four images left."""
    root = tmp_path_factory.mktemp("dry-run")
    images = make_images(root / "images", good=6, broken=1)
    output = root / "out.parquet"
    args = (images, "-o", output, "--model", tiny_model, "--dtype", "float32", *ENGINE)
    result = run_caprl("caption", *args, "--limit", "3")
    assert result.returncode == 0, result.stderr
    return root, args


def test_after_a_limited_run_counts_what_remains(run_caprl, resumed) -> None:
    root, args = resumed
    result = dry_run(run_caprl, root, *args)
    assert result.returncode == 0, result.stderr
    found = facts(result.stdout)
    assert count(found["images to caption"]) == 4
    assert count(found["already done"]) == 3
    assert count(found["error rows kept"]) == 1
    assert "error rows to retry" not in found


def test_estimate_uses_the_last_runs_recorded_rate(run_caprl, resumed) -> None:
    root, args = resumed
    records = sorted((root / "out.parquet.caprl" / "runs").glob("*.json"))
    rate = json.loads(records[-1].read_text())["images_per_s"]
    assert rate > 0
    result = dry_run(run_caprl, root, *args)
    estimate = facts(result.stdout)["estimated time"]
    assert f"at {rate:g} images/s" in estimate


def test_retry_errors_counts_error_rows_to_retry(run_caprl, resumed) -> None:
    root, args = resumed
    result = dry_run(run_caprl, root, *args, "--retry-errors")
    assert result.returncode == 0, result.stderr
    found = facts(result.stdout)
    assert count(found["error rows to retry"]) == 1
    assert count(found["images to caption"]) == 5
    assert count(found["already done"]) == 2
    assert "error rows kept" not in found


def test_other_settings_are_refused_as_the_run_would(run_caprl, resumed) -> None:
    root, args = resumed
    result = dry_run(run_caprl, root, *args, "--max-tokens", "9")
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr


def test_overwrite_plans_everything_again(run_caprl, resumed) -> None:
    root, args = resumed
    result = dry_run(run_caprl, root, *args, "--overwrite")
    assert result.returncode == 0, result.stderr
    found = facts(result.stdout)
    assert count(found["images to caption"]) == 7
    assert count(found["already done"]) == 0
