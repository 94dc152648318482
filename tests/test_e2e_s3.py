"""Object storage end to end: an S3 API served by moto on 127.0.0.1, read and written by the real CLI
through s3fs exactly as a bucket on AWS or MinIO would be (`--storage-option endpoint_url=...`).
Shards named with brace expansion, a prefix walked like a folder, Parquet and WebDataset outputs
published into the bucket, and the access key given on the command line found nowhere afterwards."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from PIL import Image

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

KEY, SECRET = "AKIA-caprl-test-key", "s3-secret-never-logged"
FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "4", "--no-progress", "--workers", "1")


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56 + 8 * index, 56), (index * 60 % 256, 80, 140)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, str, Path]]:
    """A moto S3 server with bucket `corpus`: two shards and a folder of images; yields the s3fs
    filesystem, the endpoint and a folder for local state."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=endpoint, use_listings_cache=False)
    fs.mkdir("corpus")
    local = tmp_path_factory.mktemp("s3")
    for number in range(2):
        shard = write_shard(local / f"train-{number}.tar", [
            {"__key__": f"s{number}{i:03d}", "jpg": jpeg(i), "json": {"i": i}} for i in range(3)
        ])
        fs.put_file(str(shard), f"corpus/shards/train-{number}.tar")
    fs.pipe("corpus/photos/a/one.jpg", jpeg(7))
    fs.pipe("corpus/photos/two.jpg", jpeg(8))
    yield fs, endpoint, local
    server.stop()


def options(endpoint: str) -> tuple[str, ...]:
    return ("--storage-option", f"endpoint_url={endpoint}", "--storage-option", f"key={KEY}",
            "--storage-option", f"secret={SECRET}")


def assert_no_secret(texts: list[str], folder: Path) -> None:
    texts = texts + [path.read_bytes().decode("utf-8", "replace") for path in folder.rglob("*") if path.is_file()]
    assert not any(SECRET in text or KEY in text for text in texts)


def test_shards_and_prefix_into_parquet_in_the_bucket(run_caprl, bucket, tiny_model: Path, tmp_path: Path) -> None:
    """Brace-expanded s3:// shards and an s3:// prefix in, an s3:// Parquet out; nothing temporary left."""
    fs, endpoint, _ = bucket
    state = tmp_path / "state"
    result = run_caprl("caption", "s3://corpus/shards/train-{0..1}.tar", "s3://corpus/photos/",
                       "-o", "s3://corpus/out/caps.parquet", "--state-dir", state, "--model", tiny_model,
                       *FAST, *options(endpoint), "-v")
    assert result.returncode == 0, result.stderr
    with fs.open("corpus/out/caps.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert sorted(row["key"] for row in rows) == ["a/one.jpg", "s0000", "s0001", "s0002", "s1000", "s1001",
                                                  "s1002", "two.jpg"]
    assert all(row["status"] == "ok" for row in rows)
    assert {row["source"] for row in rows if row["key"] == "s1001"} == {"s3://corpus/shards/train-1.tar"}
    summary = json.loads(fs.cat("corpus/out/caps.parquet.summary.json"))
    assert summary["counts"]["ok"] == 8
    assert not [name for name in fs.find("corpus") if name.endswith(".tmp")]
    assert_no_secret([result.stdout, result.stderr, json.dumps(summary)], tmp_path)
    again = run_caprl("caption", "s3://corpus/shards/train-{0..1}.tar", "s3://corpus/photos/",
                      "-o", "s3://corpus/out/caps.parquet", "--state-dir", state, "--model", tiny_model,
                      *FAST, *options(endpoint))
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_webdataset_output_in_the_bucket(run_caprl, bucket, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    """Caption-only WebDataset shards published into the bucket, keys one to one with the input."""
    fs, endpoint, _ = bucket
    result = run_caprl("caption", "s3://corpus/shards/", "-o", "s3://corpus/captions/", "--format", "webdataset",
                       "--no-images", "--shard-size", "4", "--model", tiny_model, *FAST, *options(endpoint),
                       env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    names = sorted(name.rsplit("/", 1)[1] for name in fs.ls("corpus/captions"))
    assert names == ["000000.tar", "000001.tar", "summary.json"]
    keys = []
    for name in names[:2]:
        with fs.open(f"corpus/captions/{name}", "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            members = [member.name for member in tar]
        assert all(member.endswith((".txt", ".json")) for member in members)
        keys += sorted({member.split(".", 1)[0] for member in members})
    assert keys == ["s0000", "s0001", "s0002", "s1000", "s1001", "s1002"]
    assert_no_secret([result.stdout, result.stderr], tmp_path)
