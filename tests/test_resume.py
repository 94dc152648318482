"""Crash-safe, resumable runs, tested on real processes: kill -9, SIGTERM, overlapping runs, changed
settings, --retry-errors, growing folders, --max-runtime, status. Uses the transformers engine on the
tiny model (fast to start); the vLLM engine's resume is covered in test_e2e_vllm."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from contract import read_rows
from PIL import Image

FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "2", "--no-progress")
# Long random captions one at a time: a run that lasts long enough to be interrupted on any machine.
SLOW = ("--engine", "transformers", "--max-tokens", "256", "--batch-size", "1", "--flush-every", "1",
        "--no-progress")
# The same settings (batch size is not part of the fingerprint), batched to finish quickly.
FINISH = (*SLOW, "--batch-size", "8")


def caption_command(inputs: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "caprl_cli", "caption", str(inputs), "-o", str(output), "--model", str(model),
            *extra]


def start(inputs: Path, output: Path, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(caption_command(inputs, output, model, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy())


def state_of(output: Path) -> Path:
    return output.with_name(output.name + ".caprl")


def committed_parts(output: Path) -> list[Path]:
    return sorted((state_of(output) / "parts").glob("part-*.parquet"))


def committed_keys(output: Path) -> list[str]:
    """Keys of every committed part: each part must read cleanly."""
    keys: list[str] = []
    for part in committed_parts(output):
        keys += pq.read_table(part, columns=["key"])["key"].to_pylist()
    return keys


def wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def blocked_on_a_lock(pid: int) -> bool:
    """Whether process `pid` is waiting for a flock another process holds (a `->` line of /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[5] == str(pid):
            return True
    return False


def summary(output: Path) -> dict:
    return json.loads(output.with_name(output.name + ".summary.json").read_text())


def tree_digest(*paths: Path) -> dict[str, str]:
    found = {}
    for path in paths:
        for item in sorted([path] if path.is_file() else path.rglob("*")):
            if item.is_file():
                found[str(item)] = hashlib.sha256(item.read_bytes()).hexdigest()
    return found


def make_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (96 + 8 * index, 64), (index * 40 % 256, 90, 160)).save(folder / name)


def test_kill9_at_random_moments_then_resume(corpus, tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    """Five kill -9s at random instants (model load, captioning, merge): nothing lost, nothing twice."""
    root, expected = corpus
    output = tmp_path / "out.parquet"
    moments = random.Random(7).sample([x / 2 for x in range(3, 22)], 5)
    for moment in moments:
        process = start(root, output, tiny_model, *FAST, "--flush-every", "2")
        try:
            process.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            process.kill()
        process.communicate(timeout=60)
        keys = committed_keys(output)
        assert len(keys) == len(set(keys)), "an image was committed twice"
        assert set(keys) <= set(expected)
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, *FAST, "--flush-every", "2")
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == sorted(expected)
    keys = committed_keys(output)
    assert sorted(keys) == sorted(expected)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGTERM, 143, "sigterm"), (signal.SIGINT, 130, "sigint")])
def test_signal_drains_then_resume(
    corpus, tiny_model: Path, tmp_path: Path, run_caprl, signum: int, code: int, name: str
) -> None:
    """The first signal commits what is finished, merges and writes the summary; the same command resumes."""
    root, expected = corpus
    output = tmp_path / "out.parquet"
    process = start(root, output, tiny_model, *SLOW)
    wait_for(lambda: len(committed_parts(output)) >= 2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    done = {row["key"] for row in read_rows(output)}
    assert done == set(committed_keys(output)) and 2 <= len(done) < len(expected)
    assert summary(output)["run"]["stopped_by"] == name
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, *FINISH)
    assert result.returncode == 0, result.stderr
    assert sorted(row["key"] for row in read_rows(output)) == sorted(expected)
    assert summary(output)["run"]["images"] == len(expected) - len(done)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks to see a process wait for a lock")
def test_overlapping_run_gets_75_or_waits(corpus, tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    root, expected = corpus
    output = tmp_path / "out.parquet"
    first = start(root, output, tiny_model, *SLOW)
    try:
        wait_for(lambda: len(committed_parts(output)) >= 1)
        second = run_caprl("caption", root, "-o", output, "--model", tiny_model, *SLOW)
        assert second.returncode == 75, second.stderr
        assert len([line for line in second.stderr.splitlines() if line.strip()]) == 1
        waiting = start(root, output, tiny_model, *FINISH, "--wait")
        wait_for(lambda: waiting.poll() is not None or blocked_on_a_lock(waiting.pid))
        assert waiting.poll() is None, "--wait must wait for the lock"
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
        _, stderr = waiting.communicate(timeout=600)
        assert waiting.returncode == 0, stderr
    finally:
        first.kill()
    assert sorted(row["key"] for row in read_rows(output)) == sorted(expected)


@pytest.fixture(scope="module")
def finished(corpus, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, run_caprl) -> Path:
    root, _ = corpus
    output = tmp_path_factory.mktemp("finished") / "out.jsonl"
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr
    return output


def test_finished_run_does_nothing(finished: Path, corpus, tiny_model: Path, run_caprl) -> None:
    root, expected = corpus
    before = tree_digest(finished, state_of(finished))
    mtime = finished.stat().st_mtime_ns
    result = run_caprl("caption", root, "-o", finished, "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert " images with " not in result.stderr  # no model was loaded ("captioning N images with MODEL on ...")
    assert finished.stat().st_mtime_ns == mtime
    assert tree_digest(finished) == {k: v for k, v in before.items() if k == str(finished)}


@pytest.mark.parametrize(
    "change", [("--prompt", "Name every object."), ("--seed", "5"), ("--max-pixels", "200704"), ("--engine", "vllm")]
)
def test_changed_settings_are_refused(finished: Path, corpus, tiny_model: Path, run_caprl, change) -> None:
    root, _ = corpus
    before = tree_digest(finished, state_of(finished))
    fast = [arg for arg in FAST if arg not in ("--engine", "transformers")]
    result = run_caprl("caption", root, "-o", finished, "--model", tiny_model, *fast, *change)
    assert result.returncode == 2, result.stderr
    assert change[0] in result.stderr
    assert tree_digest(finished, state_of(finished)) == before


def test_status(finished: Path, corpus, run_caprl) -> None:
    root, expected = corpus
    result = run_caprl("status", finished, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["done"] == len(expected)
    assert status["errors"] == sum(kind is not None for kind in expected.values())
    assert status["remaining"] is None
    with_inputs = json.loads(run_caprl("status", finished, root, "--json").stdout)
    assert with_inputs["remaining"] == 0
    assert run_caprl("status", finished, root).returncode == 0
    missing = run_caprl("status", finished.with_name("never.parquet"))
    assert missing.returncode == 2


def test_retry_errors(tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    """An error row stays until --retry-errors, which captions it again and replaces it."""
    images = tmp_path / "images"
    make_images(images, ["good.png"])
    noise = random.Random(3).randbytes(160 * 120 * 3)
    Image.frombytes("RGB", (160, 120), noise).save(images / "big.png")  # noise: many more bytes
    output = tmp_path / "out.parquet"
    capped = ("--max-image-bytes", str((images / "good.png").stat().st_size))
    assert run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST, *capped).returncode == 0
    rows = {r["key"]: r for r in read_rows(output)}
    assert rows["good.png"]["status"] == "ok"
    assert rows["big.png"]["status"] == "error" and rows["big.png"]["error"].startswith("too_large")
    again = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert read_rows(output) == list(rows.values())
    retried = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST, "--retry-errors")
    assert retried.returncode == 0, retried.stderr
    assert {r["key"]: r["status"] for r in read_rows(output)} == {"good.png": "ok", "big.png": "ok"}
    assert summary(output)["run"]["images"] == sum(row["status"] == "error" for row in rows.values())


def test_an_image_fixed_in_place_is_captioned_again(tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    """The same file, changed since its row was made (a broken image replaced by a good one), is
    captioned again by a plain run and its row replaced."""
    images = tmp_path / "images"
    make_images(images, ["good.png"])
    (images / "bad.png").write_bytes(b"")
    output = tmp_path / "out.parquet"
    assert run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST).returncode == 0
    make_images(images, ["bad.png"])  # the file is fixed
    again = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST)
    assert again.returncode == 0, again.stderr
    assert {r["key"]: r["status"] for r in read_rows(output)} == {"good.png": "ok", "bad.png": "ok"}
    assert summary(output)["run"]["images"] == 1


def test_growing_folder_and_limit(tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    """Cron over a growing folder: each run captions only what is new; --limit caps a run."""
    images = tmp_path / "images"
    make_images(images, ["a.png", "b.png", "c.png"])
    output = tmp_path / "out.jsonl"
    first = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST, "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert len(read_rows(output)) == 2
    make_images(images / "new", ["d.png", "e.png"])
    second = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST)
    assert second.returncode == 0, second.stderr
    assert summary(output)["run"]["images"] == 3
    keys = [row["key"] for row in read_rows(output)]
    assert sorted(keys) == ["a.png", "b.png", "c.png", "new/d.png", "new/e.png"]


def test_max_runtime_exits_3_then_completes(tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    images = tmp_path / "images"
    # 150 captions of 256 tokens each, one at a time, with no loop stopping: far more than 15 s of work
    # even on a quiet machine where the tiny model makes over a thousand tokens a second.
    names = [f"img{index:03d}.png" for index in range(150)]
    make_images(images, names)
    output = tmp_path / "out.parquet"
    partial = run_caprl(
        "caption", images, "-o", output, "--model", tiny_model, *SLOW, "--max-repeats", "0", "--max-runtime", "15s"
    )
    assert partial.returncode == 3, partial.stderr
    assert summary(output)["run"]["stopped_by"] == "deadline"
    status = json.loads(run_caprl("status", output, images, "--json").stdout)
    assert status["remaining"] > 0 and status["done"] + status["remaining"] == len(names)
    rest = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FINISH, "--max-repeats", "0")
    assert rest.returncode == 0, rest.stderr
    assert sorted(row["key"] for row in read_rows(output)) == names


def test_overwrite_starts_over(tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    images = tmp_path / "images"
    make_images(images, ["a.png", "b.png"])
    output = tmp_path / "out.parquet"
    assert run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST).returncode == 0
    (images / "b.png").unlink()
    result = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST, "--seed", "9", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert [row["key"] for row in read_rows(output)] == ["a.png"]
    assert summary(output)["sampling"]["seed"] == 9


def test_existing_foreign_output_is_refused(tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    images = tmp_path / "images"
    make_images(images, ["a.png"])
    output = tmp_path / "out.parquet"
    output.write_bytes(b"precious")
    result = run_caprl("caption", images, "-o", output, "--model", tiny_model, *FAST)
    assert result.returncode == 2
    assert output.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.parquet"]


def test_failed_first_run_does_not_pin_its_settings(corpus, tiny_model: Path, tmp_path: Path, run_caprl) -> None:
    """A first run that fails before committing anything (here: a model that cannot be found) leaves no
    state behind, so the corrected command simply runs."""
    root, _ = corpus
    output = tmp_path / "out.parquet"
    failed = run_caprl("caption", root, "-o", output, "--model", "nobody/no-such-model", *FAST,
                       env={"HF_HUB_OFFLINE": "1"})
    assert failed.returncode == 1, failed.stderr  # a failed download may work later: not a usage error
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    fixed = run_caprl("caption", root, "-o", output, "--model", tiny_model, *FAST, "--limit", "2")
    assert fixed.returncode == 0, fixed.stderr
