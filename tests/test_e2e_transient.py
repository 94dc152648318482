"""Transient is not permanent, end to end through the real CLI against an HTTP server on 127.0.0.1
that answers 503 when told to and counts the requests for each path: a shard or image that failed
for a moment is an `unavailable` row the next plain run replaces; `--retries` gets past a short
outage within one run; a 404 stays a final `shard` row; `--retry-errors` opens only the shards that
had error rows."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

from conftest import write_shard
from contract import read_rows
from flaky_http import flaky_server  # noqa: F401 - a fixture
from PIL import Image

FAST = ("--engine", "transformers", "--max-tokens", "4", "--batch-size", "4", "--no-progress", "--workers", "1")


def image_bytes(index: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56 + 8 * index, 48 + 4 * index), (index * 60 % 256, 100, 180)).save(buffer, fmt)
    return buffer.getvalue()


def shard_of(path: Path, prefix: str, count: int) -> Path:
    return write_shard(path, [{"__key__": f"{prefix}{i:03d}", "jpg": image_bytes(i)} for i in range(count)])


def error_kind(row: dict) -> str | None:
    return row["error"].split(":", 1)[0] if row.get("error") else None


def webdataset_rows(folder: Path) -> list[dict]:
    """Every row the published WebDataset shards hold (their .json members)."""
    rows = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    rows.append(json.loads(tar.extractfile(member).read()))
    return rows


def test_shard_unavailable_then_read_by_a_plain_rerun(
    run_caprl, flaky_server, tiny_model: Path, tmp_path: Path
) -> None:
    """Run 1: the shard answers 503 (tried again, still 503) -> an `unavailable` row `<shard>@0`,
    exit 3 (a plain rerun has work: a scheduler must not take it for done), the shard not recorded
    finished. Run 2, server healthy: the shard is read, each sample is
    captioned once, and the `@0` placeholder is gone from the published WebDataset shards."""
    flaky, folder, base = flaky_server
    shard_of(folder / "s-000.tar", "s", 3)
    url = f"{base}/s-000.tar"
    output = tmp_path / "out"
    flaky.failing.add("/s-000.tar")
    first = run_caprl("caption", url, "-o", f"{output}/", "--model", tiny_model, *FAST, "--retries", "1")
    assert first.returncode == 3, first.stderr
    assert "run the same command again" in first.stderr.strip().splitlines()[-1]
    rows = webdataset_rows(output)
    assert [(row["key"], row["status"], error_kind(row)) for row in rows] == [(f"{url}@0", "error", "unavailable")]
    assert flaky.requests["/s-000.tar"] >= 2  # tried again before giving up

    flaky.failing.clear()
    second = run_caprl("caption", url, "-o", f"{output}/", "--model", tiny_model, *FAST, "--retries", "1")
    assert second.returncode == 0, second.stderr
    rows = webdataset_rows(output)
    assert sorted(row["key"] for row in rows) == ["s000", "s001", "s002"]
    assert all(row["status"] == "ok" for row in rows)
    assert not any(row["status"] == "withdrawn" for row in rows)

    requests = flaky.requests["/s-000.tar"]
    third = run_caprl("caption", url, "-o", f"{output}/", "--model", tiny_model, *FAST)
    assert third.returncode == 0, third.stderr
    assert flaky.requests["/s-000.tar"] == requests  # finished now: not opened again
    assert sorted(row["key"] for row in webdataset_rows(output)) == ["s000", "s001", "s002"]


def test_image_url_unavailable_then_replaced(run_caprl, flaky_server, tiny_model: Path, tmp_path: Path) -> None:
    """An image URL from a file list that answers 503 is an `unavailable` row; a plain rerun reads
    only that image again and its caption replaces the row."""
    flaky, folder, base = flaky_server
    for i in range(2):
        (folder / f"p{i}.png").write_bytes(image_bytes(i, "PNG"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{base}/p0.png\n{base}/p1.png\n")
    output = tmp_path / "images.jsonl"
    flaky.failing.add("/p0.png")
    first = run_caprl("caption", f"@{listing}", "-o", output, "--model", tiny_model, *FAST, "--retries", "0")
    assert first.returncode == 3, first.stderr  # the unavailable row is work for a plain rerun
    assert {row["key"]: error_kind(row) for row in read_rows(output)} == {
        f"{base}/p0.png": "unavailable", f"{base}/p1.png": None}

    flaky.failing.clear()
    p1_requests = flaky.requests["/p1.png"]
    second = run_caprl("caption", f"@{listing}", "-o", output, "--model", tiny_model, *FAST)
    assert second.returncode == 0, second.stderr
    rows = read_rows(output)
    assert sorted((row["key"], row["status"]) for row in rows) == [(f"{base}/p0.png", "ok"), (f"{base}/p1.png", "ok")]
    assert flaky.requests["/p1.png"] == p1_requests  # the captioned image was not read again


def test_retries_get_past_a_short_outage(run_caprl, flaky_server, tiny_model: Path, tmp_path: Path) -> None:
    """With --retries 2, a shard whose first two requests answer 503 is captioned in one run."""
    flaky, folder, base = flaky_server
    shard_of(folder / "r-000.tar", "r", 2)
    flaky.fail_first["/r-000.tar"] = 2
    output = tmp_path / "retried.parquet"
    result = run_caprl("caption", f"{base}/r-000.tar", "-o", output, "--model", tiny_model, *FAST, "--retries", "2")
    assert result.returncode == 0, result.stderr
    assert sorted((row["key"], row["status"]) for row in read_rows(output)) == [("r000", "ok"), ("r001", "ok")]
    assert flaky.requests["/r-000.tar"] > 2  # the two failures, then the reads that worked


def test_404_is_final_and_retry_errors_opens_only_shards_with_errors(
    run_caprl, flaky_server, tiny_model: Path, tmp_path: Path
) -> None:
    """A 404 shard is a final `shard` row: a plain rerun does not ask for it again. `--retry-errors`
    opens the shards whose record says they had error rows (the 404 one, one with a sample lacking an
    image) and not the shard that was captioned whole."""
    flaky, folder, base = flaky_server
    shard_of(folder / "good.tar", "g", 2)
    no_image = {"__key__": "b001", "txt": "no image"}
    write_shard(folder / "bad.tar", [{"__key__": "b000", "jpg": image_bytes(0)}, no_image])
    spec = f"{base}/good.tar::{base}/bad.tar::{base}/missing.tar"
    output = tmp_path / "mixed.jsonl"
    first = run_caprl("caption", spec, "-o", output, "--model", tiny_model, *FAST)
    assert first.returncode == 0, first.stderr
    kinds = {row["key"]: error_kind(row) for row in read_rows(output)}
    assert kinds == {"g000": None, "g001": None, "b000": None, "b001": "shard", f"{base}/missing.tar@0": "shard"}

    before = Counter(flaky.requests)
    plain = run_caprl("caption", spec, "-o", output, "--model", tiny_model, *FAST)
    assert plain.returncode == 0, plain.stderr
    assert flaky.requests == before  # nothing opened: the 404 is final, the others finished
    assert {row["key"]: error_kind(row) for row in read_rows(output)} == kinds

    retry = run_caprl("caption", spec, "-o", output, "--model", tiny_model, *FAST, "--retry-errors")
    assert retry.returncode == 0, retry.stderr
    opened = {path for path in flaky.requests if flaky.requests[path] > before[path]}
    assert opened == {"/bad.tar", "/missing.tar"}
    assert {row["key"]: error_kind(row) for row in read_rows(output)} == kinds


def test_manifest_failing_midway_is_an_error_row_and_the_run_goes_on(
    run_caprl, tiny_model: Path, tmp_path: Path
) -> None:
    """A local .jsonl.gz that turns corrupt two thirds in, after a folder whose image was captioned:
    the records before the damage are captioned, the damage is one `manifest` row keyed
    `<name>@<line>`, and the run exits 0 (not 2 after parts were committed)."""
    import gzip
    import random

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "f.jpg").write_bytes(image_bytes(1))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes(2))
    lines = "".join(json.dumps({"image": "img/a.jpg", "pad": random.Random(i).random()}) + "\n" for i in range(60_000))
    packed = gzip.compress(lines.encode())
    manifest = tmp_path / "m.jsonl.gz"
    manifest.write_bytes(packed[: len(packed) * 2 // 3] + b"\x00" * 64)
    output = tmp_path / "mixed.parquet"
    result = run_caprl("caption", tmp_path / "folder", manifest, "-o", output, "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr
    kinds = {row["key"]: error_kind(row) for row in read_rows(output)}
    damage = [key for key in kinds if key.startswith("m.jsonl.gz@")]
    assert len(damage) == 1 and kinds.pop(damage[0]) == "manifest" and int(damage[0].split("@")[1]) > 1000
    assert kinds == {"f.jpg": None, "img/a.jpg": None}
