"""Decoders that die, hang or meet a giant file, end to end through the real CLI (transformers engine,
tiny model): decode workers killed with SIGKILL at random moments, an image that kills its worker every
time, an image whose decode never returns, and a 3 GB sparse file. The run finishes with exit 0 and every
key exactly once; the subprocess timeouts below only guard against a hang, they measure nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from contract import read_rows
from PIL import Image

from caprl_cli.prepare.workers import CRASH_ENV, HANG_ENV, PROCESS_NAME

FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "2", "--no-progress", "--workers", "2")
HANG_GUARD_S = 600


def make_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{index:03d}.png" for index in range(count)]
    for index, name in enumerate(names):
        Image.new("RGB", (96 + 8 * index, 64 + 4 * index), (index * 40 % 256, 90, 160)).save(folder / name)
    return names


def decode_workers(parent: int) -> list[int]:
    """Pids of the decode workers of process `parent` (its children named `caprl decode`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and comm == PROCESS_NAME:
            found.append(int(entry.name))
    return found


def caption(folder: Path, output: Path, model: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "caprl_cli", "caption", str(folder), "-o", str(output), "--model", str(model),
               *FAST, *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decode_workers_killed_at_random_moments(tiny_model: Path, tmp_path: Path, seed: int) -> None:
    """Decode workers SIGKILLed at random moments (while starting, idle or decoding): the run goes on,
    exits 0, and every image has exactly one row (an image whose worker was killed twice under it may
    be a decode row; nothing else is lost)."""
    names = make_images(tmp_path / "images", 24)
    output = tmp_path / "out.parquet"
    rng = random.Random(seed)
    process = caption(tmp_path / "images", output, tiny_model, "--flush-every", "4")
    kills = 0
    try:
        for _ in range(3):
            pause = rng.uniform(0.0, 1.5)
            if process.poll() is not None:
                break
            time.sleep(pause)  # a random moment, not a measurement
            workers = decode_workers(process.pid)
            while not workers and process.poll() is None:  # between a death and its replacement
                time.sleep(0.05)
                workers = decode_workers(process.pid)
            if workers:
                try:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        _, stderr = process.communicate(timeout=HANG_GUARD_S)
    finally:
        process.kill()
    assert kills >= 1
    assert process.returncode == 0, stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == names
    for row in rows:
        assert row["status"] == "ok" or row["error"] == "decode: the image decoder crashed on this file", row


def test_crashing_hanging_and_giant_images_cost_one_row_each(tiny_model: Path, tmp_path: Path) -> None:
    """An image that kills its decoder every time is a `decode` row, one whose decode never returns is a
    `timeout` row after --decode-timeout, a 3 GB sparse file is `too_large` without being read; the
    other images are captioned and the run exits 0."""
    folder = tmp_path / "images"
    names = make_images(folder, 6)
    Image.new("RGB", (80, 80), "red").save(folder / "boom.png")
    Image.new("RGB", (80, 80), "blue").save(folder / "stuck.png")
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(3 << 30)
    output = tmp_path / "out.jsonl"
    process = caption(folder, output, tiny_model, "--decode-timeout", "2",
                      env={CRASH_ENV: "boom", HANG_ENV: "stuck"})
    try:
        _, stderr = process.communicate(timeout=HANG_GUARD_S)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    rows = {row["key"]: row for row in read_rows(output)}
    assert sorted(rows) == sorted([*names, "boom.png", "stuck.png", "huge.jpg"])
    assert rows.pop("boom.png")["error"] == "decode: the image decoder crashed on this file"
    assert rows.pop("stuck.png")["error"].startswith("timeout: ")
    assert rows.pop("huge.jpg")["error"].startswith("too_large: ")
    assert all(row["status"] == "ok" for row in rows.values()), rows
