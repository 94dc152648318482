"""Output safety: nothing is removed before a run is known to go ahead, only regular files and caprl's own
folders are ever replaced, every accepted output name works to the end, and exit codes say what happened.

Refusals are usage errors found before any model loads, so most tests run the real CLI without one; a
module fixture makes one Parquet and one WebDataset output with the tiny model for them to guard.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from caprl_cli.errors import UsageError
from caprl_cli.outputs.atomic import exchange_paths, name_fits, temp_name_pattern, temp_path_for
from caprl_cli.runner import check_fingerprint
from caprl_cli.settings import CaptionSettings, output_format_for
from caprl_cli.state.fingerprint import fingerprint_changes, fingerprint_of
from caprl_cli.state.folder import RunState
from caprl_cli.outputs.table import FileTarget
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.tar_shards import member_key

ENGINE = ("--engine", "transformers", "--max-tokens", "8", "--no-progress")


def make_images(folder: Path, names: list[str], shade: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (40 + 8 * index, 40), ((index * 60 + shade) % 256, 90, 160)).save(folder / name)


def snapshot(root: Path) -> dict[str, tuple[str, bytes | None]]:
    """Every entry under `root`: its kind and, for a regular file, its bytes."""
    found: dict[str, tuple[str, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        mode = os.lstat(path).st_mode
        kind = "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else oct(stat.S_IFMT(mode))
        found[path.relative_to(root).as_posix()] = (kind, path.read_bytes() if kind == "file" else None)
    return found


def tar_keys(path: Path) -> list[str]:
    """The sample keys of a shard, as WebDataset groups members (up to the first dot)."""
    with tarfile.open(path) as tar:
        return sorted({member.name.split(".", 1)[0] for member in tar})


@pytest.fixture(scope="module")
def made(run_caprl, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`eq/` (3 images), `other/` (a different `a.png`), and two outputs of `eq`: `ow.parquet`, `wds/`."""
    root = tmp_path_factory.mktemp("made")
    make_images(root / "eq", ["a.png", "b.png", "c.png"])
    make_images(root / "other", ["a.png"], shade=17)
    for output in ("ow.parquet", "wds/"):
        result = run_caprl("caption", root / "eq", "-o", f"{root}/{output}", "--model", tiny_model, *ENGINE)
        assert result.returncode == 0, result.stderr
    assert pq.read_table(root / "ow.parquet").num_rows == 3
    assert tar_keys(root / "wds" / "000000.tar") == [member_key(k) for k in ("a.png", "b.png", "c.png")]
    return root


# -- refused runs change nothing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "args", "says"),
    [
        ("ow.parquet", ("eq_typo", "--overwrite"), "does not exist"),
        ("ow.parquet", ("eq", "other", "--overwrite"), "names both"),
        ("ow.parquet", ("eq", "--format", "jsonl"), "contradicts"),
        ("ow.parquet", ("eq", "--overwrite", "--seed", "-1"), "--seed"),
        ("wds/", ("eq_typo", "--overwrite"), "does not exist"),
        ("wds/", ("eq", "other", "--overwrite"), "names both"),
        ("wds/", ("eq", "--format", "parquet"), "--format changed"),  # a dataset folder, but shards are there
        ("wds/", ("eq", "--format", "jsonl"), "contradicts"),
        ("wds/", ("eq", "--no-images"), "--images/--no-images"),
        ("wds", ("eq", "--format", "sidecar"), "--format changed"),
    ],
)
def test_refused_run_leaves_every_file_identical(made: Path, run_caprl, output: str, args: tuple, says: str) -> None:
    """Exit 2 promises nothing changed: no output, summary, shard or state file is touched, even with
    --overwrite (which used to delete the output and its state before checking the inputs)."""
    before = snapshot(made)
    inputs = [str(made / arg) if arg in ("eq", "eq_typo", "other") else arg for arg in args]
    result = run_caprl("caption", *inputs, "-o", f"{made}/{output}", "--model", "nobody/never-loaded", *ENGINE)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert snapshot(made) == before


def test_killed_start_over_keeps_the_old_output(made: Path, run_caprl, tmp_path: Path) -> None:
    """SIGKILL right after --overwrite swapped in the new state folder: the published output and its
    summary are the old ones, byte for byte (the new run's publish is what replaces them), and the state
    is the new one whole: its fingerprint, no parts."""
    shutil.copytree(made / "eq", tmp_path / "eq")
    for name in ("ow.parquet", "ow.parquet.summary.json"):
        shutil.copy2(made / name, tmp_path / name)
    shutil.copytree(made / "ow.parquet.caprl", tmp_path / "ow.parquet.caprl")
    published = {name: (tmp_path / name).read_bytes() for name in ("ow.parquet", "ow.parquet.summary.json")}
    result = run_caprl(
        "caption", tmp_path / "eq", "-o", tmp_path / "ow.parquet", "--overwrite", "--seed", "5",
        "--model", "nobody/x", *ENGINE, env={"CAPRL_CRASH_AT": "overwrite.swapped"},
    )
    assert result.returncode == -9, result.stderr
    assert {name: (tmp_path / name).read_bytes() for name in published} == published
    state = RunState(tmp_path / "ow.parquet")
    assert (state.stored_fingerprint() or {}).get("seed") == 5
    assert state.part_paths() == [] and state.last_run() is None


def test_start_over_swaps_in_one_step(tmp_path: Path) -> None:
    """The new state folder takes the old one's place atomically (no instant without a state folder)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    if not exchange_paths(new, old):
        pytest.skip("no atomic exchange of two paths on this system")
    assert (old / "b").read_text() == "new" and (new / "a").read_text() == "old"


def test_overwrite_of_webdataset_leaves_no_old_shard(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    """Starting over with fewer images: the old shards are replaced at publish, none survive beside the new."""
    make_images(tmp_path / "many", ["a.png", "b.png", "c.png", "d.png", "e.png"])
    make_images(tmp_path / "few", ["z.png"])
    out = tmp_path / "wds"
    first = run_caprl("caption", tmp_path / "many", "-o", f"{out}/", "--shard-size", "2", "--model", tiny_model, *ENGINE)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    again = run_caprl(
        "caption", tmp_path / "few", "-o", f"{out}/", "--shard-size", "2", "--overwrite", "--model", tiny_model, *ENGINE
    )
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"]
    assert tar_keys(out / "000000.tar") == [member_key("z.png")]
    assert json.loads((out / "summary.json").read_text())["counts"]["images"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few", "many", "wds"]  # no trash left


# -- only regular files and caprl's own folders are replaced -----------------------------------------


def _special_files(tmp_path: Path) -> list[Path]:
    fifo = tmp_path / "fifo.parquet"
    os.mkfifo(fifo)
    found = [fifo]
    device = tmp_path / "null.jsonl"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
        found.append(device)
    except PermissionError:
        pass
    folder = tmp_path / "adir.parquet"
    folder.mkdir()
    return found + [folder]


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_device_fifo_or_folder_is_never_replaced(run_caprl, tmp_path: Path, overwrite: tuple) -> None:
    make_images(tmp_path / "eq", ["a.png"])
    for special in _special_files(tmp_path):
        before = snapshot(tmp_path)
        result = run_caprl("caption", tmp_path / "eq", "-o", special, *overwrite, "--model", "nobody/x", *ENGINE)
        assert result.returncode == 2, result.stderr
        assert "regular file" in result.stderr or "directory" in result.stderr
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_foreign_state_folder_is_refused(run_caprl, tmp_path: Path, overwrite: tuple) -> None:
    make_images(tmp_path / "eq", ["a.png"])
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    result = run_caprl(
        "caption", tmp_path / "eq", "-o", tmp_path / "o.parquet", "--state-dir", home, *overwrite,
        "--model", "nobody/x", *ENGINE,
    )
    assert result.returncode == 2, result.stderr
    assert "thesis.tex" in result.stderr
    assert snapshot(tmp_path) == before


# -- unwritable places are usage errors, for every format --------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("-o", "{file}/out/"), "not a folder"),
        (("-o", "{file}/train-%06d.tar"), "not a folder"),
        (("-o", "{tmp}/o.parquet", "--state-dir", "{file}/state"), "not a folder"),
        (("-o", "{tmp}/shards/", "--state-dir", "{file}"), "not a folder"),
        (("--format", "sidecar", "-o", "{file}/side"), "not a folder"),
        (("-o", "{file}/o.parquet"), "cannot write"),
    ],
)
def test_unwritable_place_is_a_usage_error(run_caprl, tmp_path: Path, args: tuple, says: str) -> None:
    """A folder that would have to be made under a regular file (root is not stopped by chmod)."""
    make_images(tmp_path / "eq", ["a.png"])
    (tmp_path / "afile").write_text("x")
    filled = [a.format(file=tmp_path / "afile", tmp=tmp_path) for a in args]
    before = snapshot(tmp_path)
    result = run_caprl("caption", tmp_path / "eq", *filled, "--model", "nobody/x", *ENGINE)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


# -- every accepted output name works to the end -----------------------------------------------------


def test_long_output_name_works_to_the_end(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    """A 240-byte name: output, summary, state and every temporary fit (temporaries fall back to a short
    hashed name); the run record is written and a rerun has nothing to do."""
    make_images(tmp_path / "eq", ["a.png", "b.png"])
    output = tmp_path / ("o" * 232 + ".parquet")
    assert len(output.name.encode()) == 240
    for _ in range(2):
        result = run_caprl("caption", tmp_path / "eq", "-o", output, "--model", tiny_model, *ENGINE)
        assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert pq.read_table(output).num_rows == 2
    assert json.loads(output.with_name(output.name + ".summary.json").read_text())["counts"]["images"] == 2
    assert len(list((tmp_path / (output.name + ".caprl") / "runs").glob("*.json"))) == 1
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]


def test_output_name_too_long_for_its_summary_is_refused(run_caprl, tmp_path: Path) -> None:
    make_images(tmp_path / "eq", ["a.png"])
    output = tmp_path / ("o" * 242 + ".parquet")
    before = snapshot(tmp_path)
    result = run_caprl("caption", tmp_path / "eq", "-o", output, "--model", "nobody/x", *ENGINE)
    assert result.returncode == 2, result.stderr
    assert "too long" in result.stderr
    assert snapshot(tmp_path) == before


def test_temp_name_falls_back_to_a_short_hashed_name(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 250)
    temp = temp_path_for(long)
    assert name_fits(temp.name) and temp.parent == tmp_path and temp.name.startswith(".")
    assert temp_name_pattern(long.name).fullmatch(temp.name)
    short = tmp_path / "out.parquet"
    assert temp_path_for(short).name == f".out.parquet.{os.getpid()}.tmp"
    assert temp_name_pattern(short.name).fullmatch(temp_path_for(short).name)
    assert not temp_name_pattern(short.name).fullmatch(f".out.parquet2.{os.getpid()}.tmp")


@pytest.mark.parametrize(
    ("output", "requested"),
    [
        ("x.parquet", "jsonl"),
        ("x.jsonl", "parquet"),
        ("x.parquet", "webdataset"),
        ("out-%06d.tar", "parquet"),
        ("out-%06d.tar", "sidecar"),
        ("dir.jsonl/", "jsonl"),
        ("shards/", "jsonl"),
        ("adir.parquet/", None),
    ],
)
def test_format_contradicting_the_name_is_refused(output: str, requested: str | None) -> None:
    with pytest.raises(UsageError):
        output_format_for(output, requested)


def test_a_parquet_named_folder_with_format_parquet_is_a_dataset_folder() -> None:
    """`-o out.parquet/ --format parquet` asks for a folder of Parquet files (as Spark names them): the
    `/` and --format both say so; without --format the name contradicts itself and is refused above."""
    assert output_format_for("dir.parquet/", "parquet") == "parquet"


def test_trailing_slash_parquet_is_refused_by_the_cli(run_caprl, tmp_path: Path) -> None:
    """`-o adir.parquet/` used to publish, then fail writing `adir.parquet/.summary.json` (exit 1)."""
    make_images(tmp_path / "eq", ["a.png"])
    result = run_caprl("caption", tmp_path / "eq", "-o", f"{tmp_path}/adir.parquet/", "--model", "nobody/x", *ENGINE)
    assert result.returncode == 2, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]


# -- fingerprint: format and images ------------------------------------------------------------------


def _settings(tmp_path: Path, **changes: object) -> CaptionSettings:
    return CaptionSettings(**{"inputs": ("x",), "output": tmp_path / "caps.out", "output_format": "parquet", **changes})


def test_format_and_images_are_fingerprinted(tmp_path: Path) -> None:
    base = fingerprint_of(_settings(tmp_path))
    assert fingerprint_changes(base, fingerprint_of(_settings(tmp_path, output_format="jsonl"))) == ["--format"]
    wds = fingerprint_of(_settings(tmp_path, output_format="webdataset"))
    no_images = fingerprint_of(_settings(tmp_path, output_format="webdataset", images=False))
    assert fingerprint_changes(wds, no_images) == ["--images/--no-images"]


def test_changing_format_of_an_existing_output_is_refused(tmp_path: Path) -> None:
    """`-o caps.out --format parquet`, then `--format jsonl`: the same state, another format."""
    state = RunState(tmp_path / "caps.out")
    state.create()
    state.write_fingerprint(fingerprint_of(_settings(tmp_path)))
    (tmp_path / "caps.out").write_bytes(b"PAR1")
    jsonl = _settings(tmp_path, output_format="jsonl")
    target = FileTarget(str(tmp_path / "caps.out"), OutputOptions(output_format="jsonl"))
    with pytest.raises(UsageError, match="--format"):
        check_fingerprint(state, jsonl, target)


def test_state_from_before_format_and_images_were_recorded_is_continued(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    old = {k: v for k, v in fingerprint_of(settings).items() if k not in ("output_format", "images")}
    state = RunState(tmp_path / "caps.out")
    state.create()
    state.write_fingerprint(old)
    (tmp_path / "caps.out").write_bytes(b"PAR1")
    target = FileTarget(str(tmp_path / "caps.out"), OutputOptions(output_format="parquet"))
    assert check_fingerprint(state, settings, target) == fingerprint_of(settings)  # recorded once checks pass
    assert state.stored_fingerprint() == old  # not before


# -- exit codes --------------------------------------------------------------------------------------


def test_model_that_cannot_be_fetched_is_exit_1(run_caprl, tmp_path: Path) -> None:
    """Offline with a hub id not in the cache: transient, so exit 1 (a missing local folder stays 2)."""
    make_images(tmp_path / "eq", ["a.png"])
    result = run_caprl(
        "caption", tmp_path / "eq", "-o", tmp_path / "o.parquet", "--model", "nobody/not-in-any-cache", *ENGINE,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 1, result.stderr
    assert "cannot get model" in result.stderr and "Traceback" not in result.stderr
    assert "unset HF_HUB_OFFLINE to download it" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1  # one line, saying what to do
    missing = run_caprl("caption", tmp_path / "eq", "-o", tmp_path / "p.parquet", "--model", tmp_path / "nope", *ENGINE)
    assert missing.returncode == 2, missing.stderr


# -- status reads inputs as caption did --------------------------------------------------------------


def test_status_takes_the_manifest_options_of_caption(made: Path, run_caprl, tmp_path: Path) -> None:
    make_images(tmp_path / "pics", ["p.png", "q.png"])
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"picture": f"pics/{n}", "n": i}) + "\n" for i, n in enumerate("pq")))
    plain = run_caprl("status", made / "ow.parquet", manifest, "--json")
    assert plain.returncode == 2 and "image column" in plain.stderr
    result = run_caprl("status", made / "ow.parquet", manifest, "--image-column", "picture", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["remaining"] == 2
    listed = tmp_path / "files.txt"
    listed.write_text(f"{tmp_path}/pics/p.png\n")
    from_list = run_caprl("status", made / "ow.parquet", "--files-from", listed, "--json")
    assert from_list.returncode == 0, from_list.stderr
    assert json.loads(from_list.stdout)["remaining"] == 1
