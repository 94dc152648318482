"""Corpora where they live, end to end through the real CLI: WebDataset shards (local, gzip, truncated,
hostile, over HTTP with brace expansion and `::` lists), manifests, file lists, memory:// folders,
credentials that must never leak, and a kill -9 in the middle of a shard. The transformers engine
runs these; one test runs the real vLLM engine on shards served over HTTP into WebDataset output."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, _QuietHandler, write_shard
from contract import read_rows
from corpus import bomb_png_bytes
from PIL import Image

from caprl_cli.runner import run_caption
from caprl_cli.settings import CaptionSettings

FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "4", "--no-progress", "--workers", "1")


def image_bytes(index: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64 + 8 * index, 48 + 4 * index), (index * 50 % 256, 120, 200)).save(buffer, fmt)
    return buffer.getvalue()


def add_member(
    tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """A folder of shards of every kind, and per expected row key its error kind (None: captioned)."""
    root = tmp_path_factory.mktemp("shards")
    expected: dict[str, str | None] = {}
    write_shard(root / "good-000.tar", [
        {"__key__": f"a{i:05d}", "jpg": image_bytes(i), "json": {"n": i}, "txt": f"old caption {i}"} for i in range(3)
    ])
    expected.update({f"a{i:05d}": None for i in range(3)})
    (root / "nested").mkdir()
    with tarfile.open(root / "nested" / "good-001.tar.gz", "w:gz") as tar:
        for i in range(2):
            add_member(tar, f"b{i:05d}.png", image_bytes(i + 3, "PNG"))
            add_member(tar, f"b{i:05d}.cls", str(i).encode())
    expected.update({f"b{i:05d}": None for i in range(2)})
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for i in range(4):
            add_member(tar, f"c{i:05d}.jpg", image_bytes(i + 5))
    data = full.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmember("c00002.jpg")
    (root / "cut-002.tar").write_bytes(data[: third.offset_data + third.size // 2])  # inside the third image
    expected.update({"c00000": None, "c00001": None})
    with tarfile.open(root / "hostile-003.tar", "w") as tar:
        add_member(tar, "d00000.jpg", image_bytes(9))
        add_member(tar, "../escape.jpg", image_bytes(1))
        add_member(tar, "/abs/path.jpg", image_bytes(1))
        add_member(tar, "linked.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tar, "fifo.jpg", kind=tarfile.FIFOTYPE)
        add_member(tar, "noimage.json", b"{}")
        add_member(tar, "twice.jpg", image_bytes(2))
        add_member(tar, "twice.jpg", image_bytes(3))
        add_member(tar, "junk.jpg", b"not a jpeg at all")
        add_member(tar, "bomb.png", bomb_png_bytes(30000, 30000))  # pixel caps apply inside shards too
        add_member(tar, "d00001.jpg", image_bytes(10))
    expected.update({
        "d00000": None, "../escape": "unsafe", "/abs/path": "unsafe", "linked": "unsafe", "fifo": "unsafe",
        "noimage": "shard", "twice": "shard", "junk": "decode", "bomb": "too_large", "d00001": None,
    })
    return root, expected


def kinds_of(rows: list[dict]) -> dict[str, str | None]:
    return {row["key"]: (row["error"].split(":", 1)[0] if row["error"] else None) for row in rows}


@pytest.fixture(scope="module")
def folder_run(run_caprl, shards, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root, _ = shards
    output = tmp_path_factory.mktemp("out") / "caps.parquet"
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, *FAST)
    return result, output


def test_folder_of_shards_gives_one_row_per_sample(folder_run, shards) -> None:
    """Every sample of every shard gets one row: good ones captions, broken and hostile ones error
    rows of the right kind, and the cut shard one `shard` row naming the byte offset."""
    result, output = folder_run
    assert result.returncode == 0, result.stderr
    root, expected = shards
    rows = read_rows(output)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys))
    found = kinds_of(rows)
    damage = [key for key in found if key.startswith(str(root / "cut-002.tar") + "@")]
    assert len(damage) == 1 and found[damage[0]] == "shard"
    assert int(damage[0].rsplit("@", 1)[1]) > 0
    del found[damage[0]]
    assert found == expected
    by_key = {row["key"]: row for row in rows}
    assert by_key["a00001"]["source"] == str(root / "good-000.tar")
    assert json.loads(by_key["a00001"]["meta"]) == {"json": {"n": 1}, "txt": "old caption 1"}
    assert json.loads(by_key["b00001"]["meta"]) == {"cls": "1"}
    assert by_key["a00002"]["output_tokens"] > 0 and by_key["a00002"]["width"] == 64 + 16


def test_finished_shards_are_not_read_again(folder_run, run_caprl, shards, tiny_model: Path, tmp_path: Path) -> None:
    """A second run skips shards a run finished without opening them: replacing one with garbage
    changes nothing; the output says nothing to do and exits 0."""
    _, output = folder_run
    root, _ = shards
    copy = tmp_path / "copy"
    copy.mkdir()
    for shard in root.rglob("*.tar*"):
        target = copy / shard.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shard.read_bytes())
    copied_output = tmp_path / "caps.parquet"
    first = run_caprl("caption", copy, "-o", copied_output, "--model", tiny_model, *FAST)
    assert first.returncode == 0, first.stderr
    before = read_rows(copied_output)
    records = list((tmp_path / "caps.parquet.caprl" / "shards").glob("*.json"))
    assert len(records) == 1 and len(json.loads(records[0].read_text())) == 4
    (copy / "good-000.tar").write_bytes(b"garbage" * 100)
    second = run_caprl("caption", copy, "-o", copied_output, "--model", tiny_model, *FAST)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert read_rows(copied_output) == before
    status = run_caprl("status", copied_output, copy, "--json")
    assert json.loads(status.stdout)["remaining"] == 0


def test_http_shards_with_braces_and_lists(run_caprl, shards, serve_folder, tiny_model: Path, tmp_path: Path) -> None:
    """Shards streamed over HTTP, named by brace expansion and a `::` list, with no local copy; a
    file:// shard beside them; --no-keep-meta leaves side members out."""
    root, _ = shards
    base = serve_folder(root)
    spec = f"{base}/good-{{000..000}}.tar::{base}/nested/good-001.tar.gz::{base}/missing-{{7..8}}.tar"
    output = tmp_path / "http.jsonl"
    result = run_caprl("caption", spec, f"file://{root}/cut-002.tar", "-o", output, "--model", tiny_model, *FAST,
                       "--no-keep-meta")
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    found = kinds_of(rows)
    assert {key: kind for key, kind in found.items() if kind is None} == {
        "a00000": None, "a00001": None, "a00002": None, "b00000": None, "b00001": None, "c00000": None,
        "c00001": None}
    broken = {key for key, kind in found.items() if kind == "shard"}
    assert {key for key in broken if key.startswith(base)} == {f"{base}/missing-7.tar@0", f"{base}/missing-8.tar@0"}
    assert len(broken) == 3 and any(key.startswith(f"{root}/cut-002.tar@") for key in broken)
    assert {row["source"] for row in rows if row["key"] == "b00000"} == {f"{base}/nested/good-001.tar.gz"}
    assert all(row["meta"] is None for row in rows)


def test_caprl2m_style_manifest(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    """A CapRL-2M-style JSONL (captions plus image paths) is re-captioned in one command; other
    columns ride along in meta, lines without an image become manifest error rows."""
    images = tmp_path / "images"
    (images / "sam").mkdir(parents=True)
    for i in range(3):
        (images / "sam" / f"sa_{i}.jpg").write_bytes(image_bytes(i))
    lines = [json.dumps({"id": i, "image": f"sam/sa_{i}.jpg",
                         "conversations": [{"from": "gpt", "value": f"old {i}"}]}) for i in range(3)]
    lines += [json.dumps({"id": 9, "image": "sam/missing.jpg"}), json.dumps({"id": 10}), "{not json", ""]
    manifest = tmp_path / "meta" / "caprl2m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(lines) + "\n")
    output = tmp_path / "recaptioned.parquet"
    result = run_caprl("caption", manifest, "--image-root", images, "-o", output, "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr
    rows = {row["key"]: row for row in read_rows(output)}
    assert kinds_of(list(rows.values())) == {
        "sam/sa_0.jpg": None, "sam/sa_1.jpg": None, "sam/sa_2.jpg": None, "sam/missing.jpg": "read",
        "caprl2m.jsonl#5": "manifest", "caprl2m.jsonl#6": "manifest"}
    assert json.loads(rows["sam/sa_1.jpg"]["meta"])["conversations"][0]["value"] == "old 1"
    assert rows["sam/sa_1.jpg"]["source"] == str(images / "sam" / "sa_1.jpg")


def test_file_lists_from_a_file_and_stdin(run_caprl, serve_folder, tiny_model: Path, tmp_path: Path) -> None:
    """`@LIST` and `--files-from -` take local paths and URLs, keyed by the line as written; a listed
    file that is gone is a read error row, not a refusal."""
    (tmp_path / "pics").mkdir()
    for i in range(2):
        (tmp_path / "pics" / f"p{i}.png").write_bytes(image_bytes(i, "PNG"))
    base = serve_folder(tmp_path / "pics")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# local then remote\n{tmp_path}/pics/p0.png\n\n{base}/p1.png\r\n{tmp_path}/gone.png\n")
    output = tmp_path / "from-list.jsonl"
    result = run_caprl("caption", f"@{listing}", "-o", output, "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr
    assert kinds_of(read_rows(output)) == {
        f"{tmp_path}/pics/p0.png": None, f"{base}/p1.png": None, f"{tmp_path}/gone.png": "read"}
    piped = tmp_path / "piped.jsonl"
    command = [sys.executable, "-m", "caprl_cli", "caption", "--files-from", "-", "-o", str(piped),
               "--model", str(tiny_model), *FAST]
    done = subprocess.run(command, input=f"{base}/p0.png\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [(row["key"], row["status"]) for row in read_rows(piped)] == [(f"{base}/p0.png", "ok")]


def test_memory_folder_in_process(memory_fs, tiny_model: Path, tmp_path: Path) -> None:
    """A remote folder (memory://, listed and walked like a local one) with images and a shard."""
    memory_fs.pipe("/bucket/photos/x/one.jpg", image_bytes(1))
    memory_fs.pipe("/bucket/photos/two.png", image_bytes(2, "PNG"))
    memory_fs.pipe("/bucket/photos/.hidden.jpg", image_bytes(3))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add_member(tar, "s0.jpg", image_bytes(4))
    memory_fs.pipe("/bucket/photos/shards/s.tar", buffer.getvalue())
    output = tmp_path / "mem.parquet"
    report = run_caption(CaptionSettings(
        inputs=("memory://bucket/photos/",), output=output, output_format="parquet", model=str(tiny_model),
        engine="transformers", max_tokens=8, workers=1, dtype="float32", progress=False,
    ))
    assert report.run.ok == 3 and report.run.errors == 0
    assert sorted(row["key"] for row in read_rows(output)) == ["s0", "two.png", "x/one.jpg"]


class _AuthHandler(_QuietHandler):
    """Serves files only to requests that carry the expected bearer token."""

    token = "Bearer tok-3x7-SECRET"

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.token:
            self.send_error(403)
            return
        super().do_GET()


def test_credentials_never_leak(run_caprl, shards, tiny_model: Path, tmp_path: Path) -> None:
    """A token given with --storage-option and secrets inside URLs appear in no output, state file,
    summary, log line or error row."""
    root, _ = shards
    import functools
    import threading

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_AuthHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        output = tmp_path / "out" / "caps.parquet"
        shard = f"http://127.0.0.1:{port}/good-000.tar?sig=SIG-s3cr3t"
        missing = f"http://user:pw-hunter2@127.0.0.1:{port}/nope.jpg?X-Amz-Signature=SIG-s3cr3t"
        headers = json.dumps({"Authorization": _AuthHandler.token})
        result = run_caprl("caption", shard, missing, "-o", output, "--model", tiny_model, *FAST,
                           "--storage-option", f"headers={headers}", "-v")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert sum(row["status"] == "ok" for row in rows) == 3
    assert [kinds_of(rows)[key] for key in kinds_of(rows) if "nope" in key] == ["read"]
    texts = [result.stdout, result.stderr] + [
        path.read_bytes().decode("utf-8", "replace") for path in tmp_path.rglob("*") if path.is_file()
    ]
    for secret in ("tok-3x7-SECRET", "hunter2", "s3cr3t"):
        assert not any(secret in text for text in texts), secret


def test_kill9_inside_a_shard_then_resume(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    """kill -9 while a shard is half captioned: the next run reads it again, skips what was committed,
    and every sample ends up exactly once; the shard is then recorded as finished."""
    shard = write_shard(tmp_path / "big-000.tar", [{"__key__": f"k{i:03d}", "jpg": image_bytes(i)} for i in range(10)])
    output = tmp_path / "out.jsonl"
    slow = ("--engine", "transformers", "--max-tokens", "256", "--batch-size", "1", "--flush-every", "1",
            "--no-progress", "--workers", "1")
    command = [sys.executable, "-m", "caprl_cli", "caption", str(shard), "-o", str(output), "--model", str(tiny_model)]
    process = subprocess.Popen([*command, *slow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    parts = tmp_path / "out.jsonl.caprl" / "parts"
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.parquet"))) < 2:
        assert time.monotonic() < deadline and process.poll() is None, "run ended before it could be killed"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "out.jsonl.caprl" / "shards").exists()
    result = run_caprl("caption", shard, "-o", output, "--model", tiny_model, *slow, "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    keys = [row["key"] for row in read_rows(output)]
    assert sorted(keys) == [f"k{i:03d}" for i in range(10)]
    assert len(list((tmp_path / "out.jsonl.caprl" / "shards").glob("*.json"))) == 1


@pytest.mark.vllm
def test_vllm_http_shards_into_webdataset(run_caprl, shards, serve_folder, tiny_model: Path, tmp_path: Path) -> None:
    """The real vLLM engine: shards streamed over HTTP, captions and original image bytes written as
    WebDataset shards that webdataset reads back with the input keys."""
    import webdataset as wds

    root, _ = shards
    base = serve_folder(root)
    output = tmp_path / "wds"
    result = run_caprl("caption", f"{base}/good-000.tar::{base}/nested/good-001.tar.gz", "-o", output,
                       "--format", "webdataset", "--shard-size", "2", "--model", tiny_model, "--engine", "vllm",
                       "--dtype", "float32", "--max-tokens", "12", "--no-progress")
    assert result.returncode == 0, result.stderr
    written = sorted(str(path) for path in output.glob("*.tar"))
    assert [Path(name).name for name in written] == ["000000.tar", "000001.tar", "000002.tar"]
    samples = list(wds.WebDataset(written, shardshuffle=False, empty_check=False))
    assert sorted(sample["__key__"] for sample in samples) == ["a00000", "a00001", "a00002", "b00000", "b00001"]
    originals = {}
    with tarfile.open(root / "good-000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg"):
                originals[member.name[:-4]] = tar.extractfile(member).read()
    for sample in samples:
        record = json.loads(sample["json"])
        assert record["status"] == "ok" and record["output_tokens"] > 0
        assert sample["txt"].decode() == record["caption"]
        if sample["__key__"] in originals:
            assert sample["jpg"] == originals[sample["__key__"]]
