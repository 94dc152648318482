"""Node shares end to end, and `caprl merge`: the real CLI with the transformers engine and the tiny model.

Two shares (`--num-shards 2`) of one input set holding a folder, tar shards and a manifest are disjoint
and together complete; the same share with the inputs listed in another order captions the same keys.
`caprl merge` joins the shares into Parquet, JSONL and WebDataset outputs that pandas, DuckDB,
`datasets` and `webdataset` read with every key once; an ok row beats an error row; outputs captioned
with other settings are refused (nothing written) unless --force. Three caption runs serve every test.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from contract import read_rows
from PIL import Image

from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.row_writers import PROVENANCE_KEY, ParquetRowWriter
from caprl_cli.outputs.rows import error_row

FAST = ("--engine", "transformers", "--max-tokens", "4", "--batch-size", "8", "--no-progress", "--workers", "1")


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32 + 4 * i, 28), (i * 40 % 256, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A folder (with one broken image), four tar shards and a manifest; every key they hold."""
    root = tmp_path_factory.mktemp("share-corpus")
    (root / "pics" / "sub").mkdir(parents=True)
    folder_keys = []
    for i in range(6):
        key = f"{'sub/' if i % 2 else ''}p{i}.jpg"
        (root / "pics" / key).write_bytes(jpeg(i))
        folder_keys.append(key)
    (root / "pics" / "broken.jpg").write_bytes(b"not a jpeg")
    folder_keys.append("broken.jpg")
    shards = [
        write_shard(root / "shards" / f"s-{n:02d}.tar", [{"__key__": f"t{n}-{j}", "jpg": jpeg(n + j)} for j in range(2)])
        for n in range(4)
    ]
    (root / "listed").mkdir()
    lines = []
    for i in range(4):
        (root / "listed" / f"m{i}.png").write_bytes(jpeg(10 + i))
        lines.append(json.dumps({"image": f"m{i}.png", "n": i}))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    keys = {*folder_keys, *(f"t{n}-{j}" for n in range(4) for j in range(2)), *(f"m{i}.png" for i in range(4))}
    return {"root": root, "shards": shards, "keys": keys}


@pytest.fixture(scope="module")
def shares(corpus, run_caprl, tiny_model: Path) -> dict[str, Path]:
    """Share 0 and 1 into Parquet (inputs in one order), share 0 again into WebDataset with the inputs
    listed in another order; `{shard_index}` in -o names each share's output."""
    root: Path = corpus["root"]  # type: ignore[assignment]
    shards: list[Path] = corpus["shards"]  # type: ignore[assignment]
    image_root = ("--image-root", str(root / "listed"))
    first = [str(root / "pics"), *map(str, shards), str(root / "a.jsonl")]
    for index in (0, 1):
        result = run_caprl(
            "caption", *first, "-o", root / "out" / "share-{shard_index}.parquet", "--num-shards", "2",
            "--shard-index", str(index), *image_root, "--model", tiny_model, *FAST,
        )
        assert result.returncode == 0, result.stderr
        assert f"share {index} of 2" in result.stderr
    other_order = [str(root / "b.jsonl"), *map(str, reversed(shards)), str(root / "pics")]
    result = run_caprl(
        "caption", *other_order, "-o", f"{root / 'out' / 'wds-0'}/", "--num-shards", "2", "--shard-index", "0",
        *image_root, "--model", tiny_model, *FAST,
    )
    assert result.returncode == 0, result.stderr
    return {"0": root / "out" / "share-0.parquet", "1": root / "out" / "share-1.parquet", "wds0": root / "out" / "wds-0"}


def keys_of(path: Path) -> list[str]:
    return [row["key"] for row in read_rows(path)]


def wds_keys(folder: Path) -> list[str]:
    import webdataset as wds

    urls = [str(path) for path in sorted(folder.glob("*.tar"))]
    return [json.loads(sample["json"])["key"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def test_shares_are_disjoint_complete_and_order_free(corpus, shares) -> None:
    first, second = keys_of(shares["0"]), keys_of(shares["1"])
    assert first and second
    assert not set(first) & set(second)
    assert set(first) | set(second) == corpus["keys"]
    assert len(first) + len(second) == len(corpus["keys"])
    assert sorted(wds_keys(shares["wds0"])) == sorted(first)


def test_status_and_summary_name_the_share(shares, run_caprl) -> None:
    result = run_caprl("status", shares["1"])
    assert result.returncode == 0, result.stderr
    assert "share 1 of 2" in result.stdout
    summary = json.loads(Path(str(shares["1"]) + ".summary.json").read_text())
    assert summary["share"] == {"index": 1, "count": 2}


def test_another_share_into_a_share_output_is_refused(corpus, shares, run_caprl, tiny_model: Path) -> None:
    before = shares["0"].read_bytes()
    result = run_caprl(
        "caption", str(corpus["root"] / "pics"), "-o", shares["0"], "--num-shards", "2", "--shard-index", "1",
        "--model", tiny_model, *FAST,
    )
    assert result.returncode == 2
    assert "--num-shards/--shard-index" in result.stderr
    assert shares["0"].read_bytes() == before


@pytest.fixture(scope="module")
def merged(shares, run_caprl, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("merged")
    found = {"parquet": out / "all.parquet", "jsonl": out / "all.jsonl", "webdataset": out / "all-wds"}
    for fmt, path in found.items():
        target = f"{path}/" if fmt == "webdataset" else str(path)
        result = run_caprl("merge", shares["0"], shares["1"], "-o", target, "--shard-size", "5")
        assert result.returncode == 0, result.stderr
    return found


def test_merged_outputs_hold_every_key_once(corpus, merged) -> None:
    expected = sorted(corpus["keys"])
    assert sorted(keys_of(merged["parquet"])) == expected
    assert sorted(keys_of(merged["jsonl"])) == expected
    assert sorted(wds_keys(merged["webdataset"])) == expected
    assert len(list(merged["webdataset"].glob("*.tar"))) > 1  # --shard-size 5


def test_readers_accept_the_merged_outputs(corpus, merged, tmp_path: Path) -> None:
    import datasets
    import duckdb
    import pandas as pd

    expected = sorted(corpus["keys"])
    assert sorted(pd.read_parquet(merged["parquet"])["key"]) == expected
    assert sorted(pd.read_json(merged["jsonl"], lines=True)["key"]) == expected
    for reader, path in (("read_parquet", merged["parquet"]), ("read_json_auto", merged["jsonl"])):
        keys = [row[0] for row in duckdb.sql(f"select key from {reader}('{path}')").fetchall()]
        assert sorted(keys) == expected
    for builder, path in (("parquet", merged["parquet"]), ("json", merged["jsonl"])):
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(tmp_path / builder))
        assert sorted(loaded["key"]) == expected
    urls = [str(path) for path in sorted(merged["webdataset"].glob("*.tar"))]
    features = datasets.Features({"json": datasets.Json(), "txt": datasets.Value("string")})
    loaded = datasets.load_dataset(
        "webdataset", data_files={"train": urls}, split="train", features=features, cache_dir=str(tmp_path / "wds")
    )
    assert sorted(row["key"] for row in loaded["json"]) == expected


def test_merged_provenance_lists_each_input(merged, shares) -> None:
    metadata = pq.read_metadata(merged["parquet"]).metadata
    provenance = json.loads(metadata[PROVENANCE_KEY.encode()])
    inputs = provenance["merge"]["inputs"]
    assert [item["provenance"]["share"] for item in inputs] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    assert provenance["share"] is None
    assert provenance["counts"]["images"] == sum(item["rows"] for item in inputs)
    summary = json.loads(Path(str(merged["webdataset"]) + "/summary.json").read_text())
    assert summary["merge"]["inputs"][0]["location"] == str(shares["0"])


def copy_with(source: Path, target: Path, extra_rows: list[dict], **changes: object) -> Path:
    """`source`'s rows plus `extra_rows`, with its provenance changed as `changes` say."""
    parquet = pq.ParquetFile(source)
    provenance = {**json.loads(parquet.metadata.metadata[PROVENANCE_KEY.encode()]), **changes}
    writer = ParquetRowWriter(target)
    writer.write_table(parquet.read())
    writer.write(extra_rows)
    writer.commit(provenance)
    return target


def test_an_ok_row_wins_over_an_error_row(shares, run_caprl, tmp_path: Path) -> None:
    taken = next(row for row in read_rows(shares["1"]) if row["status"] == "ok")
    failed = error_row(key=taken["key"], source=taken["source"], model=taken["model"], kind=ErrorKind.DECODE, message="x")
    run = json.loads(pq.read_metadata(shares["0"]).metadata[PROVENANCE_KEY.encode()])["run"]
    later = {**run, "finished_at": "2999-01-01T00:00:00+00:00"}  # the error is the latest row: ok still wins
    with_error = copy_with(shares["0"], tmp_path / "with-error.parquet", [failed], run=later)
    for order in ((with_error, shares["1"]), (shares["1"], with_error)):
        result = run_caprl("merge", *order, "-o", tmp_path / "m.jsonl")
        assert result.returncode == 0, result.stderr
        rows = [row for row in read_rows(tmp_path / "m.jsonl") if row["key"] == taken["key"]]
        assert [row["status"] for row in rows] == ["ok"]


def test_other_settings_are_refused_unless_forced(shares, run_caprl, tmp_path: Path) -> None:
    other = copy_with(shares["1"], tmp_path / "other.parquet", [], prompt="Name the colours.")
    target = tmp_path / "m.parquet"
    result = run_caprl("merge", shares["0"], other, "-o", target)
    assert result.returncode == 2
    assert "--force" in result.stderr and "prompt" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other.parquet"]
    result = run_caprl("merge", shares["0"], other, "-o", target, "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads(pq.read_metadata(target).metadata[PROVENANCE_KEY.encode()])["merge"]["forced"] is True


def test_webdataset_shares_merge_with_their_images(corpus, shares, merged, run_caprl, tmp_path: Path) -> None:
    """Share 0 as WebDataset with images, share 1 converted to WebDataset: every key once, the
    captioned samples of share 0 keep their image members."""
    converted = tmp_path / "wds-1"
    result = run_caprl("merge", shares["1"], "-o", f"{converted}/")
    assert result.returncode == 0, result.stderr
    result = run_caprl("merge", shares["wds0"], converted, "-o", f"{tmp_path / 'all-wds'}/")
    assert result.returncode == 0, result.stderr
    assert sorted(wds_keys(tmp_path / "all-wds")) == sorted(corpus["keys"])
    with tarfile.open(next((tmp_path / "all-wds").glob("*.tar"))) as tar:
        names = tar.getnames()
    share0_ok = [row["key"] for row in read_rows(shares["0"]) if row["status"] == "ok"]
    assert any(name.endswith(".jpg") or name.endswith(".png") for name in names)
    assert share0_ok


@pytest.mark.parametrize(
    "case", ["missing", "mixed", "output_is_input", "twice"]
)
def test_user_mistakes_are_one_line_and_exit_2(case: str, shares, merged, run_caprl, tmp_path: Path) -> None:
    args = {
        "missing": [tmp_path / "nope.parquet", shares["1"], "-o", tmp_path / "m.parquet"],
        "mixed": [shares["0"], merged["jsonl"], "-o", tmp_path / "m.parquet"],
        "output_is_input": [shares["0"], shares["1"], "-o", shares["1"]],
        "twice": [shares["0"], shares["0"], "-o", tmp_path / "m.parquet"],
    }[case]
    before = shares["1"].read_bytes()
    result = run_caprl("merge", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "m.parquet").exists()
    assert shares["1"].read_bytes() == before


def test_merge_replaces_an_earlier_merge_atomically(shares, run_caprl, tmp_path: Path) -> None:
    target = tmp_path / "m.parquet"
    assert run_caprl("merge", shares["0"], "-o", target).returncode == 0
    assert sorted(keys_of(target)) == sorted(keys_of(shares["0"]))
    assert run_caprl("merge", shares["0"], shares["1"], "-o", target).returncode == 0
    assert sorted(keys_of(target)) == sorted(keys_of(shares["0"]) + keys_of(shares["1"]))
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
