"""JSONL and Parquet manifests become samples: paths resolved, meta kept, bad records as error samples."""

from __future__ import annotations

import datetime
import functools
import gzip
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.inputs.manifests import check_manifest, DEFAULT_IMAGE_COLUMNS, is_manifest_name, manifest_samples

CAPRL_RECORDS = [
    {"id": "sa_1", "image": "sam/images/sa_1.jpg", "conversations": [{"from": "human", "value": "<image>Describe."}]},
    {"id": "coco_2", "image": "coco/train2017/2.PNG", "conversations": [{"from": "gpt", "value": "Un chat é"}]},
]


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_manifest_names() -> None:
    for name in ["a.jsonl", "A.JSONL.GZ", "x/y.parquet", "s3://b/m.jsonl", "https://h/m.parquet?sig=1"]:
        assert is_manifest_name(name)
    for name in ["a.json", "a.jpg", "a.tar", "a.jsonl.bz2", "folder"]:
        assert not is_manifest_name(name)


# --- JSONL -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_caprl_jsonl_resolves_against_manifest_folder(tmp_path: Path, gz: bool) -> None:
    manifest = write_jsonl(tmp_path / ("m.jsonl.gz" if gz else "m.jsonl"), CAPRL_RECORDS, gz=gz)
    samples = list(manifest_samples(str(manifest)))
    assert [s.key for s in samples] == ["sam/images/sa_1.jpg", "coco/train2017/2.PNG"]
    assert samples[0].path == samples[0].source == str(tmp_path / "sam/images/sa_1.jpg")
    assert [s.ext for s in samples] == ["jpg", "png"]
    assert all(s.data is None and s.error_kind is None for s in samples)
    meta = json.loads(samples[1].meta)
    assert list(meta) == ["id", "conversations"] and meta["conversations"][0]["value"] == "Un chat é"
    assert "é" in samples[1].meta  # ensure_ascii=False


def test_image_root_overrides_manifest_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", CAPRL_RECORDS)
    (first, _) = manifest_samples(str(manifest), image_root="/datasets/caprl")
    assert first.key == "sam/images/sa_1.jpg" and first.path == "/datasets/caprl/sam/images/sa_1.jpg"
    (first, _) = manifest_samples(str(manifest), image_root="s3://bucket/caprl/")
    assert first.path == "s3://bucket/caprl/sam/images/sa_1.jpg"
    monkeypatch.chdir(tmp_path)
    (first, _) = manifest_samples("m.jsonl", image_root="imgs")
    assert first.path == str(tmp_path / "imgs" / "sam/images/sa_1.jpg")  # relative roots become absolute


def test_absolute_paths_and_urls_are_kept(tmp_path: Path) -> None:
    records = [{"image": "/abs/x.jpeg"}, {"image": "https://h/y.webp?sig=s3cret"}, {"image": "s3://b/z.gif"}]
    samples = list(manifest_samples(str(write_jsonl(tmp_path / "m.jsonl", records)), image_root="/root"))
    assert [s.path for s in samples] == ["/abs/x.jpeg", "https://h/y.webp?sig=s3cret", "s3://b/z.gif"]
    assert [s.ext for s in samples] == ["jpeg", "webp", "gif"]
    assert all("s3cret" not in s.source and "s3cret" not in s.key for s in samples)
    assert samples[0].meta is None  # no other columns


def test_default_column_detection_order(tmp_path: Path) -> None:
    record = {"file_name": "f.jpg", "url": "http://h/u.jpg", "path": "p.jpg", "image_path": "ip.jpg", "x": 1}
    manifest = write_jsonl(tmp_path / "m.jsonl", [record])
    expected = ["ip.jpg", "p.jpg", "http://h/u.jpg", "f.jpg"]
    for column, key in zip(DEFAULT_IMAGE_COLUMNS[1:], expected, strict=True):
        (sample,) = manifest_samples(str(manifest))
        assert sample.key == key
        meta = json.loads(sample.meta)
        assert column not in meta and list(meta)[-1] == "x"
        del record[column]
        write_jsonl(manifest, [record])


def test_image_column_override(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.jpg", "thumb": "t/a.png"}])
    (sample,) = manifest_samples(str(manifest), image_column="thumb")
    assert sample.key == "t/a.png" and json.loads(sample.meta) == {"image": "a.jpg"}


def test_missing_column_is_a_usage_error_before_work_listing_columns(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "caption": "c"}])
    with pytest.raises(UsageError) as caught:
        check_manifest(str(manifest))
    assert "m.jsonl" in str(caught.value) and "caption" in str(caught.value) and "id" in str(caught.value)
    with pytest.raises(UsageError, match="caption"):
        check_manifest(str(write_jsonl(manifest, [{"image": "a.jpg", "caption": "c"}])), image_column="img")


def test_missing_column_met_while_captioning_is_one_error_sample(tmp_path: Path) -> None:
    """Read during a run (after other inputs may have been captioned), a manifest without the image
    column is one `manifest` error sample, not a usage error after work started."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "caption": "c"}, {"id": 2}])
    (only,) = manifest_samples(str(manifest))
    assert only.key == "m.jsonl@1" and only.error_kind is ErrorKind.MANIFEST and "caption" in (only.error_message or "")


def test_bad_lines_become_manifest_error_samples(tmp_path: Path) -> None:
    lines = [
        "not json",
        {"image": "a.jpg"},
        "",
        "[1, 2]",
        {"other": 1},
        {"image": None},
        {"image": ""},
        {"image": 7},
        '{"image": "trunc',
        {"image": "b.jpg"},
    ]
    manifest = write_jsonl(tmp_path / "bad.jsonl", lines)
    samples = list(manifest_samples(str(manifest)))
    good = [s for s in samples if s.error_kind is None]
    bad = [s for s in samples if s.error_kind is not None]
    assert [s.key for s in good] == ["a.jpg", "b.jpg"]
    assert [s.key for s in bad] == [f"bad.jsonl#{n}" for n in (1, 4, 5, 6, 7, 8, 9)]  # line 3 blank: skipped
    assert all(s.error_kind is ErrorKind.MANIFEST and s.error_message for s in bad)
    assert all(s.source == str(manifest) and s.path is None and s.data is None for s in bad)


def test_invalid_utf8_line_is_an_error_sample(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"image": "a.jpg"}\n{"image": "\xff.jpg"}\n{"image": "c.jpg"}')  # no final newline
    samples = list(manifest_samples(str(manifest)))
    assert [s.key for s in samples] == ["a.jpg", "m.jsonl#2", "c.jpg"]


def test_duplicate_values_yield_duplicate_samples(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.jpg", "n": 1}, {"image": "a.jpg", "n": 2}])
    assert [s.key for s in manifest_samples(str(manifest))] == ["a.jpg", "a.jpg"]


def test_keep_meta_false(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", CAPRL_RECORDS)
    assert all(s.meta is None for s in manifest_samples(str(manifest), keep_meta=False))


def test_missing_manifest_is_a_usage_error_before_work(tmp_path: Path, memory_fs) -> None:
    with pytest.raises(UsageError, match="none.jsonl"):
        check_manifest(str(tmp_path / "none.jsonl"))
    with pytest.raises(UsageError) as caught:
        check_manifest("memory://user:pw@x/none.parquet?token=hunter2")
    assert "hunter2" not in str(caught.value) and "pw@" not in str(caught.value)


def test_corrupt_gzip_is_a_usage_error_before_work_and_an_error_row_during_it(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl.gz"
    manifest.write_bytes(b"not gzip at all")
    with pytest.raises(UsageError, match="m.jsonl.gz"):
        check_manifest(str(manifest))
    (only,) = manifest_samples(str(manifest))
    assert only.key == "m.jsonl.gz@0" and only.error_kind is ErrorKind.MANIFEST


def test_jsonl_on_memory_resolves_against_its_url_folder(memory_fs) -> None:
    memory_fs.pipe("/corpus/meta/m.jsonl", "".join(json.dumps(r) + "\n" for r in CAPRL_RECORDS).encode())
    samples = list(manifest_samples("memory://corpus/meta/m.jsonl"))
    assert samples[0].path == "memory://corpus/meta/sam/images/sa_1.jpg"
    assert samples[0].key == "sam/images/sa_1.jpg"


def test_jsonl_on_file_url(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "m.jsonl", CAPRL_RECORDS)
    (first, _) = manifest_samples(f"file://{tmp_path}/m.jsonl")
    assert first.path == f"file://{tmp_path}/sam/images/sa_1.jpg"


def test_jsonl_over_http_streams_in_order(http_dir: tuple[Path, str]) -> None:
    served, base = http_dir
    records = [{"image": f"img/{i:04d}.jpg", "i": i} for i in range(3000)]
    write_jsonl(served / "m.jsonl.gz", records, gz=True)
    samples = list(manifest_samples(f"{base}/m.jsonl.gz?token=secret"))
    assert [s.key for s in samples] == [r["image"] for r in records]
    assert samples[5].path == f"{base}/img/0005.jpg" and json.loads(samples[5].meta) == {"i": 5}
    with pytest.raises(UsageError, match="missing.jsonl"):
        check_manifest(f"{base}/missing.jsonl")


# --- Parquet -----------------------------------------------------------------------------------


def test_parquet_with_pyarrow(tmp_path: Path) -> None:
    when = datetime.datetime(2024, 5, 1, 12, 0)
    table = pa.table(
        {
            "id": [1, 2, 3, 4],
            "image_path": ["a/1.jpg", None, "/abs/3.png", "https://h/4.jpg"],
            "taken": [when] * 4,
            "blob": [b"\x00"] * 4,
            "score": [0.5, float("nan"), 1.0, 2.0],
        }
    )
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest, row_group_size=2)
    samples = list(manifest_samples(str(manifest)))
    assert [s.key for s in samples] == ["a/1.jpg", "m.parquet#2", "/abs/3.png", "https://h/4.jpg"]
    assert samples[0].path == str(tmp_path / "a/1.jpg")
    assert samples[1].error_kind is ErrorKind.MANIFEST
    assert json.loads(samples[0].meta) == {"id": 1, "taken": "2024-05-01T12:00:00", "score": 0.5}
    assert json.loads(samples[3].meta)["id"] == 4
    assert all(s.meta is None for s in manifest_samples(str(manifest), keep_meta=False))
    with pytest.raises(UsageError, match="blob"):
        check_manifest(str(manifest), image_column="picture")


def test_parquet_from_datasets_with_image_feature(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    Image.new("RGB", (4, 3), "red").save(tmp_path / "red.png")
    png = (tmp_path / "red.png").read_bytes()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": "red.png"}, {"bytes": png, "path": None}], "caption": ["a", "b"]},
        features=features,
    )
    manifest = tmp_path / "ds.parquet"
    dataset.to_parquet(str(manifest))
    samples = list(manifest_samples(str(manifest)))
    assert [s.key for s in samples] == ["red.png", "ds.parquet#2"]
    assert all(s.data == png and s.path is None for s in samples)
    assert samples[0].ext == "png" and samples[1].ext is None
    assert [json.loads(s.meta) for s in samples] == [{"caption": "a"}, {"caption": "b"}]


def test_parquet_image_struct_with_only_a_path(tmp_path: Path) -> None:
    table = pa.table({"image": [{"bytes": None, "path": "x/y.jpg"}, {"bytes": None, "path": None}]})
    pq.write_table(table, tmp_path / "m.parquet")
    samples = list(manifest_samples(str(tmp_path / "m.parquet")))
    assert samples[0].key == "x/y.jpg" and samples[0].path == str(tmp_path / "x/y.jpg") and samples[0].data is None
    assert samples[1].key == "m.parquet#2" and samples[1].error_kind is ErrorKind.MANIFEST


def test_parquet_on_memory_and_over_http(memory_fs, http_dir: tuple[Path, str]) -> None:
    served, base = http_dir
    table = pa.table({"url": ["a.jpg", "b.jpg"], "n": [1, 2]})
    pq.write_table(table, served / "m.parquet")
    memory_fs.pipe("/p/m.parquet", (served / "m.parquet").read_bytes())
    assert [s.path for s in manifest_samples("memory://p/m.parquet")] == ["memory://p/a.jpg", "memory://p/b.jpg"]
    assert [s.path for s in manifest_samples(f"{base}/m.parquet")] == [f"{base}/a.jpg", f"{base}/b.jpg"]


def test_unreadable_parquet_is_a_usage_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"PAR1 but not really")
    with pytest.raises(UsageError, match="m.parquet"):
        check_manifest(str(manifest))


def test_keys_and_signatures_of_manifest_samples(tmp_path: Path) -> None:
    """A URL value is keyed by its identity (a re-signed URL keeps its key, `?id=` tells objects apart)
    and recorded redacted; a local image path is signed by a stat; embedded bytes by a content hash."""
    (tmp_path / "a.jpg").write_bytes(b"12345")
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"image": "a.jpg"},
        {"image": "https://h/x.jpg?id=1&X-Amz-Signature=S3CRET"},
        {"image": "https://h/x.jpg?id=2&X-Amz-Signature=S3CRET"},
    ])
    local, first, second = manifest_samples(str(path))
    assert local.signature is not None and local.signature.startswith("5:")
    assert (first.key, second.key) == ("https://h/x.jpg?id=1", "https://h/x.jpg?id=2")
    assert "S3CRET" not in first.source and first.signature is None
    table = pa.table({"image": [{"bytes": b"png-1", "path": "p.png"}, {"bytes": b"png-2", "path": "q.png"}]})
    pq.write_table(table, tmp_path / "m.parquet")
    one, two = manifest_samples(str(tmp_path / "m.parquet"))
    assert one.signature and two.signature and one.signature != two.signature
