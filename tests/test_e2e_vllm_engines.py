"""vLLM the way GPUs run it, on the CPU build: the engine core in a process of its own
(`VLLM_ENABLE_V1_MULTIPROCESSING=1`), a SIGTERM drain that aborts requests in flight, two vLLM engines
on one queue, and no process of a run left behind when its parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from executors import committed_parts, rows_by_key, summary_of, wait_until
from PIL import Image

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]
IMAGES = 40
VLLM_ARGS = ("--engine", "vllm", "--dtype", "float32", "--max-tokens", "24", "--no-progress")
# Two sequences at a time keep most images waiting in the engine, so a stop has requests to abort and
# one engine cannot take a whole small run before the other is ready.
SMALL_BATCHES = ("--batch-size", "2")
ENGINE_CORE_IN_A_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
KEYS = [f"img{number:02d}.jpg" for number in range(IMAGES)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-engines-images")
    for number in range(IMAGES):
        Image.new("RGB", (40 + number, 36), (number * 6 % 256, 90, 160)).save(root / f"img{number:02d}.jpg")
    return root


@pytest.fixture
def start_caprl() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start the real CLI in the background; a run still going when the test ends is killed."""
    started: list[subprocess.Popen] = []

    def start(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "caprl_cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- processes, through /proc -----------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """Every process below `root`: pid -> (name, start time; the start time tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: dict[int, tuple[str, str]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is not None:
            found[pid] = (_comm(pid), stat[2])
            todo.extend(children.get(pid, []))
    return found


def still_running(processes: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Those of `processes` that still run (a zombie, dead but not yet reaped, holds nothing)."""
    alive = {}
    for pid, (name, started) in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[1] not in ("Z", "X"):
            alive[pid] = name
    return alive


def named(processes: dict[int, tuple[str, str]], prefix: str) -> list[int]:
    return [pid for pid, (name, _) in processes.items() if name.startswith(prefix)]


# -- runs -------------------------------------------------------------------------------------------


def test_sigterm_drains_the_multiprocess_engine_core_and_two_engines_finish_the_run(
    folder: Path, tiny_model: Path, tmp_path: Path, start_caprl, run_caprl
) -> None:
    output = tmp_path / "out.parquet"
    ready = tmp_path / "paused"
    process = start_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *VLLM_ARGS, *SMALL_BATCHES, "--workers", "1",
        "--flush-every", "1",
        # Held at its first row (engine core busy, requests queued) until the test has sent SIGTERM; the
        # engine is fed slowly, so it cannot finish all images while the driver waits there.
        env={
            **ENGINE_CORE_IN_A_PROCESS, "CAPRL_PAUSE_AT": "rows.first", "CAPRL_PAUSE_FILE": str(ready),
            "CAPRL_TEST_ENGINE_DELAY": "*:0.5",
        },
    )
    wait_until(ready.exists, process)
    tree = descendants(process.pid)
    assert named(tree, "VLLM::EngineCor"), f"no separate engine core process: {tree}"
    process.send_signal(signal.SIGTERM)
    ready.unlink()
    _, stderr = process.communicate(timeout=600)

    assert process.returncode == 143, stderr
    rows = rows_by_key(output)
    drained = len(rows)
    assert 1 <= drained < IMAGES  # drained: the requests still in the engine were aborted, not waited for
    assert all(len(found) == 1 and found[0]["status"] == "ok" for found in rows.values())
    assert summary_of(output)["run"]["stopped_by"] == "sigterm"
    assert still_running(tree) == {}  # engine core, its worker and the decode worker ended with the run

    # The same command with two vLLM engines (engine cores in this process) finishes the run.
    rerun = run_caprl("caption", folder, "-o", output, "--model", tiny_model, *VLLM_ARGS, *SMALL_BATCHES,
                      "--num-engines", "2", "--workers", "0", env={"CAPRL_TEST_ENGINE_DELAY": "*:0.3"})
    assert rerun.returncode == 0, rerun.stderr
    rows = rows_by_key(output)
    assert sorted(rows) == KEYS
    assert all(len(found) == 1 and found[0]["status"] == "ok" for found in rows.values())
    run = summary_of(output)["run"]
    assert [engine["engine"] for engine in run["engines"]] == [0, 1]
    assert all(engine["images"] > 0 for engine in run["engines"]), run["engines"]
    assert sum(engine["images"] for engine in run["engines"]) == run["images"] == IMAGES - drained


def test_no_process_outlives_a_killed_parent(folder: Path, tiny_model: Path, tmp_path: Path, start_caprl) -> None:
    """kill -9 of the parent of two vLLM engines (engine cores in processes of their own, as on GPUs):
    every engine worker, engine core and decode worker goes with it; none is left holding the model."""
    output = tmp_path / "out.parquet"
    process = start_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *VLLM_ARGS, *SMALL_BATCHES, "--num-engines", "2",
        "--workers", "2", "--flush-every", "1",
        env={**ENGINE_CORE_IN_A_PROCESS, "CAPRL_TEST_ENGINE_DELAY": "*:0.3"},
    )

    def both_engines_captioning() -> dict[int, tuple[str, str]] | None:
        tree = descendants(process.pid)
        loaded = len(named(tree, "caprl engine")) == 2 and len(named(tree, "VLLM::EngineCor")) == 2
        return tree if loaded and committed_parts(output) else None

    wait_until(both_engines_captioning, process)
    tree = descendants(process.pid)
    assert len(named(tree, "caprl decode")) >= 2, tree
    assert_all_end_with(process, tree)


def test_no_process_outlives_a_killed_parent_of_one_engine(
    folder: Path, tiny_model: Path, tmp_path: Path, start_caprl
) -> None:
    """kill -9 of a run with one vLLM engine whose engine core is a process of its own (the GPU default):
    the engine runs in a worker for that reason, and its engine core goes with the parent."""
    output = tmp_path / "out.parquet"
    process = start_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *VLLM_ARGS, *SMALL_BATCHES,
        "--workers", "1", "--flush-every", "1",
        env={**ENGINE_CORE_IN_A_PROCESS, "CAPRL_TEST_ENGINE_DELAY": "*:0.3"},
    )

    def captioning() -> dict[int, tuple[str, str]] | None:
        tree = descendants(process.pid)
        loaded = len(named(tree, "caprl engine")) == 1 and len(named(tree, "VLLM::EngineCor")) == 1
        return tree if loaded and committed_parts(output) else None

    wait_until(captioning, process)
    assert_all_end_with(process, descendants(process.pid))


def assert_all_end_with(process: subprocess.Popen, tree: dict[int, tuple[str, str]]) -> None:
    """SIGKILL the run's parent; every process of `tree` must end soon after."""
    process.kill()
    process.wait()  # not communicate(): a survivor would hold its output pipes open
    try:
        deadline = time.monotonic() + 120
        while still_running(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert still_running(tree) == {}
    finally:
        for pid in still_running(tree):  # never leave a failed test's orphans behind
            os.kill(pid, signal.SIGKILL)
