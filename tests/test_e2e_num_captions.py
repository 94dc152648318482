"""`--num-captions N`: the real CLI with the transformers engine writes N captions per image, one row per
key, in every output format; the same seed gives the same captions in fresh runs and in every format;
a rerun has nothing to do; a changed N is refused like any other changed setting."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from caprl_cli.outputs.rows import output_columns

N = 3
ARGS = ("--engine", "transformers", "--max-tokens", "4", "--num-captions", str(N), "--no-progress", "--seed", "7")
KEYS = ["a.png", "b.png", "sub/c.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, key in enumerate(KEYS):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 20 * i, 60), (40 * i, 200 - 30 * i, 90)).save(root / key)
    return root


@pytest.fixture(scope="module")
def runs(run_caprl, images: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fresh run per format, each followed by a rerun that must have nothing to do. Each fresh run
    starts from nothing with the same seed, so equal captions across formats are reproducible runs."""
    base = tmp_path_factory.mktemp("num-captions")
    sidecar_images = base / "sidecar-images"
    shutil.copytree(images, sidecar_images)
    targets = {
        "parquet": (images, ("-o", base / "first.parquet")),
        "jsonl": (images, ("-o", base / "out.jsonl")),
        "webdataset": (images, ("-o", base / "shards/", "--format", "webdataset")),
        "dataset": (images, ("-o", f"{base / 'dataset'}/", "--format", "parquet")),
        "sidecar": (sidecar_images, ("--format", "sidecar")),
    }
    found: dict[str, Path] = {}
    for name, (root, output_args) in targets.items():
        for attempt in ("fresh", "rerun"):
            result = run_caprl("caption", root, *output_args, "--model", tiny_model, *ARGS)
            assert result.returncode == 0, (name, attempt, result.stderr)
            if attempt == "rerun":
                assert "nothing to do" in result.stderr, (name, result.stderr)
        found[name] = sidecar_images if name == "sidecar" else Path(output_args[1])
    return found


def read_rows(path: Path) -> list[dict]:
    """Rows of a Parquet or JSONL output, read with the plain libraries; the list columns are there."""
    if path.is_dir():  # a Parquet dataset folder, read as one table
        table = pq.read_table(path)
        assert tuple(table.column_names) == output_columns(N)
        return table.to_pylist()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(tuple(row) == output_columns(N) for row in rows)
        return rows
    table = pq.read_table(path)
    assert tuple(table.column_names) == output_columns(N)
    return table.to_pylist()


def shard_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member)
                assert data is not None
                samples.setdefault(key, {})[ext] = data.read()
    return samples


def captions_by_key(rows: list[dict]) -> dict[str, list[str]]:
    assert sorted(row["key"] for row in rows) == KEYS  # each key exactly once
    return {row["key"]: list(row["captions"]) for row in rows}


def test_table_rows_hold_n_captions_the_first_in_caption(runs) -> None:
    for name in ("parquet", "jsonl", "dataset"):
        rows = read_rows(runs[name])
        for row in rows:
            assert row["status"] == "ok"
            assert len(row["captions"]) == N and row["captions"][0] == row["caption"]
            assert len(row["finish_reasons"]) == N and row["finish_reasons"][0] == row["finish_reason"]
            assert len(row["output_token_counts"]) == N and row["output_token_counts"][0] == row["output_tokens"]
            assert all(0 < count <= 4 for count in row["output_token_counts"])


def test_each_caption_is_sampled_with_its_own_seed(runs) -> None:
    """At temperature 1 the N captions of an image come from N seeds: they are not all one caption."""
    for captions in captions_by_key(read_rows(runs["parquet"])).values():
        assert len(set(captions)) > 1


def test_fresh_runs_and_every_format_give_the_same_captions(runs) -> None:
    expected = captions_by_key(read_rows(runs["parquet"]))
    assert captions_by_key(read_rows(runs["jsonl"])) == expected
    assert captions_by_key(read_rows(runs["dataset"])) == expected
    samples = shard_samples(runs["webdataset"])
    documents = [json.loads(sample["json"]) for sample in samples.values()]
    assert captions_by_key(documents) == expected
    for sample in samples.values():
        assert sample["txt"].decode() == json.loads(sample["json"])["captions"][0]
    sidecars = {}
    for key in KEYS:
        image = runs["sidecar"] / key
        listed = json.loads(image.with_name(image.stem + ".captions.json").read_text())
        assert image.with_suffix(".txt").read_text() == listed[0]
        sidecars[key] = listed
    assert sidecars == expected


def test_a_changed_number_of_captions_is_refused(runs, run_caprl, images: Path, tiny_model: Path) -> None:
    output = runs["parquet"]
    before = output.read_bytes()
    args = [arg if arg != str(N) else "2" for arg in ARGS]
    result = run_caprl("caption", images, "-o", output, "--model", tiny_model, *args)
    assert result.returncode == 2
    assert "--num-captions" in result.stderr
    assert output.read_bytes() == before
