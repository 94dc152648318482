"""How fast caprl reads WebDataset shards, side by side with webdataset's own reader and a bare tarfile loop.

Reading shards happens on a background thread while the engine captions, so it must stay far ahead
of any GPU; this measures the three readers over the same shards in one run (no image decoding, which
the preprocessing pool does for all of them alike) and reports samples/s and ratios.

    .venv/bin/python bench/shard_read.py                      # 8 shards x 1,000 samples of ~60 KB
    .venv/bin/python bench/shard_read.py --shards 4 --samples 2000 --gzip --repeat 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from caprl_cli.inputs.shards import read_shard


def make_shards(folder: Path, shards: int, samples: int, image_bytes: int, gzip: bool) -> list[Path]:
    """Shards of `samples` samples each: a random "jpg" member plus small .json and .txt members."""
    rng = random.Random(0)
    payload = rng.randbytes(image_bytes * 2)
    paths = []
    for number in range(shards):
        path = folder / f"shard-{number:05d}.tar{'.gz' if gzip else ''}"
        with tarfile.open(path, "w:gz" if gzip else "w") as tar:
            for index in range(samples):
                key = f"{number:05d}{index:06d}"
                start = rng.randrange(image_bytes)
                members = {
                    "jpg": payload[start : start + image_bytes],
                    "json": json.dumps({"url": f"https://example.invalid/{key}.jpg", "width": 640}).encode(),
                    "txt": b"an alt text of a few words",
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def caprl_reader(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        with open(path, "rb") as stream:
            for sample in read_shard(str(path), stream):
                assert sample.data is not None
                count += 1
    return count


def webdataset_reader(paths: list[Path]) -> int:
    import webdataset as wds

    dataset = wds.WebDataset([str(path) for path in paths], shardshuffle=False, empty_check=False)
    return sum(1 for sample in dataset if sample["jpg"])


def tarfile_reader(paths: list[Path]) -> int:
    """The floor: every member's bytes read in stream mode, no grouping, no checks."""
    count = 0
    for path in paths:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                handle = tar.extractfile(member)
                if handle is not None and handle.read() and member.name.endswith(".jpg"):
                    count += 1
    return count


READERS: dict[str, Callable[[list[Path]], int]] = {
    "tarfile (floor)": tarfile_reader,
    "webdataset.WebDataset": webdataset_reader,
    "caprl read_shard": caprl_reader,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000, help="samples per shard")
    parser.add_argument("--image-bytes", type=int, default=60_000)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs per reader; the median is reported")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_shards(Path(tmp), args.shards, args.samples, args.image_bytes, args.gzip)
        total_mib = sum(os.path.getsize(path) for path in paths) / 2**20
        expected = args.shards * args.samples
        results = {}
        for _ in range(args.repeat):  # interleaved, so machine noise hits every reader alike
            for name, reader in READERS.items():
                started = time.perf_counter()
                count = reader(paths)
                results.setdefault(name, []).append(time.perf_counter() - started)
                assert count == expected, f"{name} read {count} samples, expected {expected}"
    print(f"{expected:,} samples in {args.shards} shards, {total_mib:.0f} MiB{' (gzip)' if args.gzip else ''}")
    baseline = statistics.median(results["webdataset.WebDataset"])
    report = {}
    print(f"{'reader':24} {'seconds':>8} {'samples/s':>11} {'MiB/s':>8} {'vs webdataset':>14}")
    for name, times in results.items():
        seconds = statistics.median(times)
        report[name] = {"seconds": seconds, "samples_per_s": expected / seconds, "speedup_vs_webdataset": baseline / seconds}
        print(f"{name:24} {seconds:8.3f} {expected / seconds:11,.0f} {total_mib / seconds:8.0f} {baseline / seconds:13.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
