"""The real CLI (and `run_caption` in-process for memory:// targets) with the real transformers engine,
publishing WebDataset shards, sidecar .txt files and remote outputs; everything read back with the plain
libraries users have (tarfile, webdataset, datasets, pyarrow, fsspec). Structure only, never caption words.

Engine runs are shared through module-scoped fixtures: each CLI run costs seconds on a small machine.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from PIL import Image

from caprl_cli.outputs.rows import COLUMNS
from caprl_cli.outputs.tar_shards import member_key

ENGINE_ARGS = ("--engine", "transformers", "--max-tokens", "8", "--no-progress")
SHARD_SIZE = 3
# WebDataset's own split of a member name into sample key and extension (tariterators.base_plus_ext).
WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
SIDE_EXTS = ("json", "txt")

Members = dict[str, bytes]


# -- building inputs -------------------------------------------------------------------------------


def encoded(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def tar_samples(data: bytes) -> list[tuple[str, Members]]:
    """(key, {ext: bytes}) per sample of a tar, grouped exactly as WebDataset groups members."""
    samples: list[tuple[str, Members]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            assert info.isfile(), info.name
            match = WDS_NAME.match(info.name)
            assert match, info.name
            key, ext = match.groups()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            assert ext not in samples[-1][1], f"{info.name} twice"
            handle = tar.extractfile(info)
            assert handle is not None
            samples[-1][1][ext] = handle.read()
    return samples


def shard_samples(shards: dict[str, bytes]) -> list[tuple[str, str, Members]]:
    """(shard name, key, members) of every sample of every shard, shards in name order."""
    return [(name, key, members) for name in sorted(shards) for key, members in tar_samples(shards[name])]


def local_shards(folder: Path, glob: str = "*.tar") -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob(glob))}


def snapshot(folder: Path, glob: str = "*.tar") -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of each file: what "untouched" is checked against."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.glob(glob))}


def image_member(members: Members) -> tuple[str, bytes]:
    images = [(ext, data) for ext, data in members.items() if ext not in SIDE_EXTS]
    assert len(images) == 1, sorted(members)
    return images[0]


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.startswith(".") and path.name.endswith(".tmp")]


def row_of(members: Members) -> dict[str, Any]:
    document = json.loads(members["json"].decode("utf-8"))
    assert list(document) == list(COLUMNS)
    return document


def caprl_args(tiny_model: Path, *args: str | Path) -> tuple[str | Path, ...]:
    return ("caption", *args, "--model", tiny_model, *ENGINE_ARGS)


# -- shared inputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder of 7 images (awkward names, PNG and JPEG) plus a broken one, and a WebDataset shard of 5
    samples (one broken, one PNG, one key under a dotted folder), each image with a .json side member."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "images"
    files = write_files(folder, {
        "a.png": encoded((64, 48), (200, 10, 10), "PNG"),
        "b.jpg": encoded((48, 64), (10, 200, 10), "JPEG"),
        "c d.png": encoded((56, 56), (0, 0, 200), "PNG"),
        "x.y.jpg": encoded((60, 40), (90, 90, 90), "JPEG"),
        "sub/e.jpeg": encoded((40, 60), (100, 100, 0), "JPEG"),
        "sub/f.png": encoded((30, 30), (0, 100, 100), "PNG"),
        "G.JPG": encoded((70, 50), (50, 50, 50), "JPEG"),
        "broken.jpg": b"this is not a jpeg at all" * 4,
    })
    samples = [
        {"__key__": "000001", "jpg": encoded((52, 40), (40, 0, 0), "JPEG"), "json": {"i": 1, "tag": "x"}},
        {"__key__": "000002", "jpg": encoded((53, 40), (80, 0, 0), "JPEG"), "json": {"i": 2, "tag": "y"}},
        {"__key__": "000003", "png": encoded((54, 40), (120, 0, 0), "PNG"), "json": {"i": 3, "tag": "z"}},
        {"__key__": "000004", "jpg": b"garbage, not a jpeg" * 3, "json": {"i": 4}},
        {"__key__": "grp.v2/000005", "jpg": encoded((55, 40), (160, 0, 0), "JPEG"), "json": {"i": 5}},
    ]
    shard = write_shard(root / "in" / "input-000000.tar", samples)
    shard_members = dict(tar_samples(shard.read_bytes()))  # the exact bytes the shard holds
    assert list(shard_members) == [sample["__key__"] for sample in samples]
    return {
        "folder": folder,
        "files": files,
        "shard": shard,
        "shard_members": shard_members,
        "shard_json": {sample["__key__"]: sample["json"] for sample in samples},
        "broken": {"broken.jpg", "000004"},
    }


def expected_member_keys(inputs: dict[str, Any]) -> set[str]:
    return {member_key(key) for key in inputs["files"]} | set(inputs["shard_members"])


# -- 1 and 6: a folder and a shard into shards of 3 ------------------------------------------------


@pytest.fixture(scope="module")
def wds_run(run_caprl, tiny_model: Path, inputs, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("wds") / "shards"
    result = run_caprl(*caprl_args(
        tiny_model, inputs["folder"], inputs["shard"], "-o", out, "--format", "webdataset",
        "--shard-size", str(SHARD_SIZE),
    ))
    return result, out


def test_webdataset_shards_are_numbered_and_hold_at_most_shard_size(wds_run, inputs) -> None:
    result, out = wds_run
    assert result.returncode == 0, result.stderr
    total = len(inputs["files"]) + len(inputs["shard_members"])
    shards = local_shards(out)
    count = -(-total // SHARD_SIZE)
    assert list(shards) == [f"{n:06d}.tar" for n in range(count)]
    sizes = [len(tar_samples(data)) for data in shards.values()]
    assert sum(sizes) == total
    assert all(size == SHARD_SIZE for size in sizes[:-1]) and 1 <= sizes[-1] <= SHARD_SIZE
    assert sorted(path.name for path in out.iterdir()) == [".caprl", *shards, "summary.json"]


def test_webdataset_and_tarfile_read_every_sample_exactly_once(wds_run, inputs) -> None:
    import webdataset as wds

    _, out = wds_run
    ours = [(key, members) for _, key, members in shard_samples(local_shards(out))]
    keys = [key for key, _ in ours]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected_member_keys(inputs)
    urls = [str(path) for path in sorted(out.glob("*.tar"))]
    theirs = [
        (sample["__key__"], {name: value for name, value in sample.items() if not name.startswith("__")})
        for sample in wds.WebDataset(urls, shardshuffle=False)
    ]
    assert theirs == ours


def test_rows_captions_and_original_image_bytes(wds_run, inputs) -> None:
    _, out = wds_run
    by_member_key = {member_key(key): key for key in inputs["files"]}
    statuses = Counter()
    for _, key, members in shard_samples(local_shards(out)):
        row = row_of(members)
        statuses[row["status"]] += 1
        from_shard = key in inputs["shard_members"]
        assert row["key"] == (key if from_shard else by_member_key[key])
        if row["key"] in inputs["broken"]:
            assert set(members) == {"json"}, key
            assert row["status"] == "error" and row["caption"] is None
            assert row["error"].split(":", 1)[0] == "decode"
        else:
            assert row["status"] == "ok", row
            assert members["txt"].decode("utf-8") == row["caption"]
            ext, data = image_member(members)
            assert set(members) == {"json", "txt", ext}
            if from_shard:
                assert {ext: data} == image_member_of_input(inputs["shard_members"][key])
            else:
                assert data == inputs["files"][row["key"]], key
        if from_shard:
            assert row["meta"] == {"json": inputs["shard_json"][key]}  # an object, not JSON text
            assert row["source"] == str(inputs["shard"].resolve())
        else:
            assert row["meta"] is None
            assert row["source"] == str((inputs["folder"] / row["key"]).resolve())
    assert statuses == {"ok": 11, "error": 2}


def image_member_of_input(members: Members) -> Members:
    ext, data = image_member(members)
    return {ext: data}


def test_shard_input_keys_are_the_output_member_keys(wds_run, inputs) -> None:
    import webdataset as wds

    _, out = wds_run
    input_keys = [sample["__key__"] for sample in wds.WebDataset([str(inputs["shard"])], shardshuffle=False)]
    shard_source = str(inputs["shard"].resolve())
    output_keys = [
        key for _, key, members in shard_samples(local_shards(out)) if row_of(members)["source"] == shard_source
    ]
    assert sorted(output_keys) == sorted(input_keys)
    assert len(output_keys) == len(set(output_keys))


def test_folder_image_members_keep_their_own_extension(wds_run, inputs) -> None:
    _, out = wds_run
    by_member_key = {member_key(key): key for key in inputs["files"]}
    found = {}
    for _, key, members in shard_samples(local_shards(out)):
        if key in by_member_key and by_member_key[key] not in inputs["broken"]:
            found[by_member_key[key]] = image_member(members)[0]
    assert found == {key: Path(key).suffix[1:].lower() for key in found}


def test_datasets_loads_the_shards(wds_run, inputs, tmp_path: Path) -> None:
    """`datasets` infers features from the first samples of the first shard and refuses samples with
    other members; this output mixes image formats (originals are kept as they are: png, jpg, webp)
    and error rows have only .json, so the features are given, as a user of such a corpus would."""
    import datasets

    _, out = wds_run
    urls = [str(path) for path in sorted(out.glob("*.tar"))]
    samples = shard_samples(local_shards(out))
    image_exts = {ext for _, _, members in samples for ext in members if ext not in SIDE_EXTS}
    features = datasets.Features({
        "json": datasets.Json(),
        "txt": datasets.Value("string"),
        **{ext: datasets.Image() for ext in sorted(image_exts)},
    })
    loaded = datasets.load_dataset(
        "webdataset", data_files={"train": urls}, split="train", features=features, cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == len(samples) == len(expected_member_keys(inputs))
    rows = loaded.to_list()
    assert sorted(row["json"]["key"] for row in rows) == sorted([*inputs["files"], *inputs["shard_members"]])
    assert sum(row["txt"] is not None for row in rows) == sum(row["json"]["status"] == "ok" for row in rows) == 11


def test_state_folder_summary_and_no_temporaries(wds_run, inputs) -> None:
    result, out = wds_run
    assert (out / ".caprl" / "fingerprint.json").is_file()
    assert list((out / ".caprl" / "parts").glob("part-*.parquet"))
    assert temporaries(out) == []
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["format"] == "webdataset"
    assert summary["counts"] == {"images": 13, "ok": 11, "error": 2, "errors_by_kind": {"decode": 2}}
    assert "captioned 11 of 13 images" in result.stderr


# -- 2 and 3: a shard pattern, captions only ---------------------------------------------------------


@pytest.fixture(scope="module")
def pattern_run(run_caprl, tiny_model: Path, inputs, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pattern")
    result = run_caprl(*caprl_args(
        tiny_model, inputs["folder"], inputs["shard"], "-o", out / "out-%05d.tar", "--no-images",
        "--shard-size", str(SHARD_SIZE),
    ))
    return result, out, local_shards(out, "out-*.tar"), sorted(path.name for path in out.iterdir())


def test_pattern_names_the_shards(pattern_run) -> None:
    result, out, shards, names = pattern_run
    assert result.returncode == 0, result.stderr
    assert list(shards) == [f"out-{n:05d}.tar" for n in range(5)]
    assert names == [".caprl-out-05d", *shards, "out-05d.summary.json"]
    assert (out / ".caprl-out-05d" / "fingerprint.json").is_file()


def test_no_images_writes_captions_only_with_the_input_keys(pattern_run, inputs) -> None:
    _, out, shards, _ = pattern_run
    samples = shard_samples(shards)
    keys = [key for _, key, _ in samples]
    assert len(keys) == len(set(keys)) and set(keys) == expected_member_keys(inputs)
    for _, key, members in samples:
        row = row_of(members)
        assert member_key(row["key"]) == key
        assert set(members) == ({"json", "txt"} if row["status"] == "ok" else {"json"}), key
        if row["status"] == "ok":
            assert members["txt"].decode("utf-8") == row["caption"]
    assert [len(tar_samples(data)) for data in shards.values()] == [3, 3, 3, 3, 1]
    assert temporaries(out) == []


def test_second_pattern_in_the_same_folder_is_an_output_of_its_own(pattern_run, run_caprl, tiny_model: Path,
                                                                   tmp_path: Path) -> None:
    _, out, _, _ = pattern_run
    val = tmp_path / "val"
    files = write_files(val, {
        "a.png": encoded((40, 40), (1, 2, 3), "PNG"),  # the same key as a training image, another image
        "v1.png": encoded((44, 40), (3, 2, 1), "PNG"),
    })
    result = run_caprl(*caprl_args(tiny_model, val, "-o", out / "val-%05d.tar", "--no-images"))
    assert result.returncode == 0, result.stderr
    shards = local_shards(out, "val-*.tar")
    assert list(shards) == ["val-00000.tar"]
    assert sorted(key for _, key, _ in shard_samples(shards)) == sorted(member_key(key) for key in files)


# -- 4 and 5: resume, nothing to do, retry errors ---------------------------------------------------


@pytest.fixture(scope="module")
def resume_runs(run_caprl, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """--limit 4, then the rest, then nothing to do; then `flaky.png` (garbage so far) becomes a real
    image at the same path and a fourth run passes --retry-errors."""
    root = tmp_path_factory.mktemp("resume")
    folder = root / "images"
    files = write_files(folder, {
        "broken.jpg": b"never an image",
        "flaky.png": b"not yet an image",
        **{f"i{n}.png": encoded((40 + n, 40), (30 * n, 0, 0), "PNG") for n in range(5)},
    })
    shard = write_shard(root / "in.tar", [
        {"__key__": f"{n:06d}", "jpg": encoded((40, 40 + n), (0, 30 * n, 0), "JPEG"), "json": {"n": n}}
        for n in range(3)
    ])
    out = root / "shards"
    args = caprl_args(tiny_model, folder, shard, "-o", out, "--format", "webdataset", "--shard-size", str(SHARD_SIZE))
    keys = {*map(member_key, files), "000000", "000001", "000002"}
    found: dict[str, Any] = {"out": out, "folder": folder, "keys": keys}
    for step, extra in (("first", ("--limit", "4")), ("second", ()), ("third", ())):
        found[step] = run_caprl(*args, *extra), snapshot(out)
    fixed = encoded((50, 50), (1, 2, 3), "PNG")
    (folder / "flaky.png").write_bytes(fixed)
    found["fixed"] = fixed
    found["retry"] = run_caprl(*args, "--retry-errors"), snapshot(out)
    return found


def samples_of(snap: dict[str, tuple[bytes, int]]) -> list[tuple[str, str, Members]]:
    return shard_samples({name: data for name, (data, _) in snap.items()})


def test_first_run_with_limit_publishes_four(resume_runs) -> None:
    result, snap = resume_runs["first"]
    assert result.returncode == 0, result.stderr
    assert list(snap) == ["000000.tar", "000001.tar"]
    assert len(samples_of(snap)) == 4
    assert "remaining" in result.stderr


def test_resume_adds_shards_and_leaves_earlier_ones_untouched(resume_runs) -> None:
    (_, first), (result, second) = resume_runs["first"], resume_runs["second"]
    assert result.returncode == 0, result.stderr
    assert list(second) == [f"{n:06d}.tar" for n in range(len(second))]
    assert len(second) > len(first)
    for name, (data, mtime) in first.items():
        assert second[name] == (data, mtime), f"{name} was rewritten"
    keys = [key for _, key, _ in samples_of(second)]
    assert len(keys) == len(set(keys)) and set(keys) == resume_runs["keys"]
    assert all(len(tar_samples(data)) <= SHARD_SIZE for data, _ in second.values())


def test_third_run_has_nothing_to_do(resume_runs) -> None:
    (_, second), (result, third) = resume_runs["second"], resume_runs["third"]
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert third == second


def test_retry_errors_replaces_the_error_sample(resume_runs) -> None:
    (_, before), (result, after) = resume_runs["third"], resume_runs["retry"]
    assert result.returncode == 0, result.stderr
    samples = samples_of(after)
    keys = [key for _, key, _ in samples]
    assert len(keys) == len(set(keys)) and set(keys) == resume_runs["keys"]
    by_key = {key: members for _, key, members in samples}
    flaky = by_key[member_key("flaky.png")]
    assert row_of(flaky)["status"] == "ok"
    assert image_member(flaky)[1] == resume_runs["fixed"]
    assert flaky["txt"].decode("utf-8") == row_of(flaky)["caption"]
    assert set(by_key[member_key("broken.jpg")]) == {"json"}  # still broken: retried, still one sample
    # Only shards that held a retried sample were rewritten; the others are the same files.
    retried = {member_key("flaky.png"), member_key("broken.jpg")}
    for name, (data, mtime) in before.items():
        if not retried & {key for key, _ in tar_samples(data)}:
            assert after[name] == (data, mtime), name
    assert list(after) == [f"{n:06d}.tar" for n in range(len(after))]
    assert temporaries(resume_runs["out"]) == []
    summary = json.loads((resume_runs["out"] / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"images": 10, "ok": 9, "error": 1, "errors_by_kind": {"decode": 1}}


def test_shards_inside_the_input_folder_are_not_captioned_again(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_files(folder, {"a.png": encoded((40, 40), (9, 9, 9), "PNG"), "b.jpg": encoded((40, 44), (9, 0, 9), "JPEG")})
    args = caprl_args(tiny_model, folder, "-o", folder / "captions", "--format", "webdataset")
    first = run_caprl(*args)
    assert first.returncode == 0, first.stderr
    before = snapshot(folder / "captions")
    second = run_caprl(*args)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert snapshot(folder / "captions") == before


# -- 7: sidecar .txt files -------------------------------------------------------------------------


def sidecars(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*.txt")) if ".caprl" not in path.parts
    }


def state_captions(folder: Path) -> dict[str, str | None]:
    captions: dict[str, str | None] = {}
    for part in sorted((folder / ".caprl" / "parts").glob("part-*.parquet")):
        for row in pq.read_table(part, columns=["key", "caption"]).to_pylist():
            captions[row["key"]] = row["caption"]
    return captions


@pytest.fixture(scope="module")
def sidecar_runs(run_caprl, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("sidecar") / "images"
    write_files(folder, {
        "keep.png": encoded((50, 40), (1, 2, 3), "PNG"),
        "keep.txt": b"written by hand",
        "a.jpg": encoded((40, 50), (100, 2, 3), "JPEG"),
        "sub/b.c.png": encoded((40, 50), (100, 2, 90), "PNG"),
        "broken.jpg": b"nope",
        "twin.jpg": encoded((44, 40), (10, 200, 3), "JPEG"),  # twin.jpg and twin.png would share twin.txt
        "twin.png": encoded((40, 44), (10, 2, 200), "PNG"),
    })
    args = caprl_args(tiny_model, folder, "--format", "sidecar")
    found: dict[str, Any] = {"folder": folder}
    steps = (("first", ()), ("second", ()), ("overwrite", ("--overwrite",)), ("replace", ("--replace-sidecars",)))
    for step, extra in steps:
        found[step] = run_caprl(*args, *extra), sidecars(folder), state_captions(folder)
    return found


def test_sidecar_txt_beside_each_captioned_image(sidecar_runs) -> None:
    result, txt, captions = sidecar_runs["first"]
    assert result.returncode == 0, result.stderr
    assert set(captions) == {"keep.png", "a.jpg", "sub/b.c.png", "broken.jpg", "twin.jpg", "twin.png"}
    assert captions["broken.jpg"] is None
    assert set(txt) == {"a.txt", "sub/b.c.txt", "keep.txt", "twin.jpg.txt", "twin.png.txt"}  # no broken.txt
    pairs = (("a.jpg", "a.txt"), ("sub/b.c.png", "sub/b.c.txt"), ("twin.jpg", "twin.jpg.txt"), ("twin.png", "twin.png.txt"))
    assert "twin.jpg and twin.png" in result.stderr  # the collision is named
    for image, sidecar in pairs:
        assert captions[image] and txt[sidecar][0].decode("utf-8") == captions[image]
    assert txt["keep.txt"][0] == b"written by hand"
    assert "kept 1 existing .txt" in result.stderr
    assert (sidecar_runs["folder"] / ".caprl" / "summary.json").is_file()


def test_sidecar_second_run_changes_nothing(sidecar_runs) -> None:
    (_, first, _), (result, second, _) = sidecar_runs["first"], sidecar_runs["second"]
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert second == first


def test_sidecar_overwrite_starts_over_but_keeps_a_different_txt(sidecar_runs) -> None:
    """--overwrite only forgets the state: a .txt written by hand is still kept."""
    (_, first, _), (result, txt, captions) = sidecar_runs["first"], sidecar_runs["overwrite"]
    assert result.returncode == 0, result.stderr
    assert "nothing to do" not in result.stderr and set(captions) == set(sidecar_runs["first"][2])
    assert txt["keep.txt"][0] == b"written by hand"
    assert "--replace-sidecars" in result.stderr


def test_sidecar_replace_replaces_a_different_txt(sidecar_runs) -> None:
    (_, first, _), (result, txt, captions) = sidecar_runs["first"], sidecar_runs["replace"]
    assert result.returncode == 0, result.stderr
    assert txt["keep.txt"][0].decode("utf-8") == captions["keep.png"] != "written by hand"
    assert {name: data for name, (data, _) in txt.items() if name != "keep.txt"} == {
        name: data for name, (data, _) in first.items() if name != "keep.txt"
    }
    assert temporaries(sidecar_runs["folder"]) == []


# -- 8: remote outputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "images"
    write_files(folder, {
        "a.png": encoded((40, 40), (9, 9, 9), "PNG"),
        "b.jpg": encoded((40, 44), (9, 0, 9), "JPEG"),
        "sub/c.png": encoded((44, 40), (0, 90, 9), "PNG"),
        "broken.jpg": b"nope",
    })
    return folder


def in_process(tiny_model: Path, folder: Path, **options: Any) -> Any:
    from caprl_cli.settings import CaptionSettings

    return CaptionSettings(
        inputs=(str(folder),), model=str(tiny_model), engine="transformers", dtype="float32", max_tokens=8,
        progress=False, workers=1, **options,
    )


def memory_listing(fs: Any) -> list[str]:
    return list(fs.find("/", withdirs=True))


def test_memory_parquet_output(memory_fs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path,
                               small_folder: Path) -> None:
    from caprl_cli.runner import run_caption

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = in_process(tiny_model, small_folder, output="memory://out/caps.parquet", output_format="parquet")
    report = run_caption(settings)
    assert report.stop_reason is None and report.totals["images"] == 4 and report.totals["error"] == 1
    with memory_fs.open("/out/caps.parquet", "rb") as handle:
        table = pq.read_table(handle)
    assert tuple(table.column_names) == COLUMNS
    assert sorted(table["key"].to_pylist()) == ["a.png", "b.jpg", "broken.jpg", "sub/c.png"]
    assert Counter(table["status"].to_pylist()) == {"ok": 3, "error": 1}
    with memory_fs.open("/out/caps.parquet.summary.json", "rb") as handle:
        assert json.load(handle)["counts"]["images"] == 4
    assert not [path for path in memory_listing(memory_fs) if ".tmp" in path]
    states = list((tmp_path / "cache" / "caprl" / "state").iterdir())
    assert len(states) == 1 and (states[0] / "fingerprint.json").is_file()
    published = memory_fs.cat("/out/caps.parquet")
    again = run_caption(settings)
    assert again.plan.handed_out == 0 and again.totals["images"] == 4
    assert memory_fs.cat("/out/caps.parquet") == published


def test_memory_webdataset_output_and_retry(memory_fs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            tiny_model: Path) -> None:
    from caprl_cli.runner import run_caption

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    files = write_files(folder, {
        "a.png": encoded((40, 40), (9, 9, 9), "PNG"),
        "b.jpg": encoded((40, 44), (9, 0, 9), "JPEG"),
        "flaky.png": b"not yet",
    })
    settings = in_process(
        tiny_model, folder, output="memory://out/shards/", output_format="webdataset", shard_size=2,
        state_dir=tmp_path / "state",
    )

    def published() -> dict[str, bytes]:
        shards = {}
        for path in memory_fs.find("/out/shards"):
            if path.endswith(".tar"):
                with memory_fs.open(path, "rb") as handle:
                    shards[path.rsplit("/", 1)[-1]] = handle.read()
        return shards

    report = run_caption(settings)
    assert report.stop_reason is None
    assert (report.totals["images"], report.totals["ok"], report.totals["error"]) == (3, 2, 1)
    first = published()
    assert list(first) == ["000000.tar", "000001.tar"]
    samples = shard_samples(first)
    assert sorted(key for _, key, _ in samples) == sorted(member_key(key) for key in files)
    for _, key, members in samples:
        row = row_of(members)
        if row["status"] == "ok":
            assert image_member(members)[1] == files[row["key"]]
    assert memory_fs.exists("/out/shards/summary.json")

    fixed = encoded((48, 40), (1, 2, 3), "PNG")
    (folder / "flaky.png").write_bytes(fixed)
    retried = run_caption(dataclasses.replace(settings, retry_errors=True))
    assert retried.plan.handed_out == 1 and retried.totals["error"] == 0
    samples = shard_samples(published())
    keys = [key for _, key, _ in samples]
    assert sorted(keys) == sorted(member_key(key) for key in files)
    flaky = next(members for _, key, members in samples if key == member_key("flaky.png"))
    assert row_of(flaky)["status"] == "ok" and image_member(flaky)[1] == fixed
    assert not [path for path in memory_listing(memory_fs) if ".tmp" in path]
    assert (tmp_path / "state" / "fingerprint.json").is_file()
    assert not (tmp_path / "cache").exists()  # --state-dir wins over the cache


def test_file_url_output_via_cli(run_caprl, tiny_model: Path, small_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "caps.parquet"
    result = run_caprl(*caprl_args(tiny_model, small_folder, "-o", f"file://{output}"))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(output)
    assert sorted(table["key"].to_pylist()) == ["a.png", "b.jpg", "broken.jpg", "sub/c.png"]
    assert (tmp_path / "caps.parquet.caprl" / "fingerprint.json").is_file()
    assert json.loads((tmp_path / "caps.parquet.summary.json").read_text(encoding="utf-8"))["counts"]["images"] == 4
    assert temporaries(tmp_path) == []
