"""A damaged state, end to end with the real CLI and the transformers engine: the run stops before
anything changes, `status` reports and writes nothing, `caprl repair` rebuilds from the published output,
and the next run has nothing to do. Structure only, never caption words."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from PIL import Image

ENGINE_ARGS = ("--engine", "transformers", "--max-tokens", "4", "--no-progress")
SAMPLES = 10


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32 + i, 28), (20 * i, 40, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `folder` with its mtime and (for files) content."""
    return {
        str(path.relative_to(folder)): (path.lstat().st_mtime_ns, path.read_bytes() if path.is_file() else b"")
        for path in sorted(folder.rglob("*"))
    }


def _published(output: Path, fmt: str) -> dict[str, bytes]:
    if fmt == "webdataset":
        return {path.name: path.read_bytes() for path in sorted(output.glob("*.tar"))}
    return {output.name: output.read_bytes()}


def _keys(output: Path, fmt: str) -> Counter[str]:
    """How often each key appears in the published output."""
    if fmt == "parquet":
        return Counter(pq.read_table(output)["key"].to_pylist())
    found: Counter[str] = Counter()
    for shard in sorted(output.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found.update(name[: -len(".json")] for name in tar.getnames() if name.endswith(".json"))
    return found


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_damaged_part_stops_status_reports_repair_rebuilds(run_caprl, tiny_model: Path, tmp_path: Path, fmt: str) -> None:
    shard = write_shard(
        tmp_path / "in" / "input-000000.tar",
        [{"__key__": f"{i:06d}", "jpg": _jpeg(i), "json": {"i": i}} for i in range(SAMPLES)],
    )
    work = tmp_path / "work"
    work.mkdir()
    output = work / ("shards" if fmt == "webdataset" else "caps.parquet")
    target = [str(output) + "/", "--format", "webdataset"] if fmt == "webdataset" else [str(output)]
    caption = ("caption", shard, "-o", *target, "--model", tiny_model, *ENGINE_ARGS)
    where = ["--format", "webdataset"] if fmt == "webdataset" else []

    first = run_caprl(*caption)
    assert first.returncode == 0, first.stderr
    expected = Counter({f"{i:06d}": 1 for i in range(SAMPLES)})
    assert _keys(output, fmt) == expected
    state = output / ".caprl" if fmt == "webdataset" else work / "caps.parquet.caprl"
    parts = sorted((state / "parts").glob("part-*.parquet"))
    assert fmt == "parquet" or len(parts) == 1  # WebDataset: the single compacted part
    part = parts[0]
    part.write_bytes(b"\x00 a disk error left garbage here \x00" * 20)
    published = _published(output, fmt)

    # The next run stops before anything changes: exit 1, one line naming the part, output untouched.
    refused = run_caprl(*caption)
    assert refused.returncode == 1, refused.stderr
    naming = [line for line in refused.stderr.splitlines() if part.name in line]
    assert len(naming) == 1 and "caprl repair" in naming[0] and naming[0].startswith("caprl: error:")
    assert _published(output, fmt) == published
    assert _keys(output, fmt) == expected

    # Status reports the damage, exits 1 and writes nothing anywhere.
    before = _snapshot(tmp_path)
    status = run_caprl("status", str(output) + ("/" if fmt == "webdataset" else ""), *where)
    assert status.returncode == 1, status.stderr
    assert part.name in status.stdout and "caprl repair" in status.stdout
    assert _snapshot(tmp_path) == before

    repaired = run_caprl("repair", str(output) + ("/" if fmt == "webdataset" else ""), *where)
    assert repaired.returncode == 0, repaired.stderr
    assert len(repaired.stderr.strip().splitlines()) == 1
    assert (state / "unreadable" / part.name).exists()

    again = run_caprl(*caption)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert _published(output, fmt) == published
    assert _keys(output, fmt) == expected
    healthy = run_caprl("status", str(output) + ("/" if fmt == "webdataset" else ""), *where)
    assert healthy.returncode == 0, healthy.stderr
