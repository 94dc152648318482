"""`--executor ray` end to end, where Ray differs from the local executor: the real CLI on a local Ray
cluster the run starts itself, with shards, a real SIGKILL of an actor and of the driver, the vLLM
CPU engine in an actor, and the user mistakes. What every executor shares (killed and frozen engines,
decode faults, slow URLs, WebDataset, signals, --max-runtime) is in test_e2e_executors.py, under Ray
too; a cluster of several nodes that loses one is in test_e2e_ray_nodes.py.

Runs are tagged so that "no Ray process of the run is left" is checked for that run alone (see
`executors.py`). A moment mid-run is found by a pause point (`rows.first`, the driver's first row),
never by sleeping.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import write_shard
from contract import read_rows
from executors import BOUND_S, StartRun, TaggedRun
from PIL import Image

from caprl_cli.execute.ray_transport import place_engines
from caprl_cli.execute.ray_reaper import MARKER_ENV, cluster_processes, sweep
from caprl_cli.errors import UsageError

pytest.importorskip("ray")

FAST = ("--engine", "transformers", "--max-tokens", "6", "--batch-size", "1", "--no-progress", "--executor", "ray")
IMAGES = 10


def make_images(folder: Path, count: int = IMAGES) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{number:02d}.jpg" for number in range(count)]
    for number, name in enumerate(names):
        Image.new("RGB", (40 + number, 36), (number * 20 % 256, 90, 160)).save(folder / name)
    return names


def jpeg(number: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48 + number, 40), (number * 30 % 256, 60, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def ray_runs(tagged_runs: StartRun) -> StartRun:
    """Start tagged `caprl caption` runs (see `executors.py`)."""
    return lambda *args, **options: tagged_runs("caption", *args, **options)


def ray_processes_left(run: TaggedRun) -> list[tuple[int, str]]:
    return run.left_behind()


def engine_actor(run: TaggedRun) -> int:
    """The pid of the run's engine actor (Ray names its process `ray::EngineActor...`)."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        actors = [pid for pid, command in run.processes() if command.startswith("ray::EngineActor")]
        if actors:
            return actors[0]
        time.sleep(0.1)
    raise AssertionError("no engine actor found")


def keys_once(rows: list[dict]) -> dict[str, dict]:
    by_key: dict[str, dict] = {}
    for row in rows:
        assert row["key"] not in by_key, f"{row['key']} twice"
        by_key[row["key"]] = row
    return by_key


# -- end to end ---------------------------------------------------------------------------------------------


def test_shards_on_ray_survive_a_killed_engine_actor(tiny_model: Path, tmp_path: Path, ray_runs) -> None:
    """WebDataset shards (one sample's image is not an image) on a local Ray: the engine actor is
    killed with SIGKILL mid-run; it is started again, and every key is in the output once, with the
    right status; no Ray process of the run is left afterwards."""
    samples = [{"__key__": f"s{number:02d}", "jpg": jpeg(number), "txt": f"t{number}"} for number in range(IMAGES)]
    samples[3]["jpg"] = b"not an image"
    write_shard(tmp_path / "shards" / "a.tar", samples[:5])
    write_shard(tmp_path / "shards" / "b.tar", samples[5:])
    output = tmp_path / "out.parquet"
    run = ray_runs(
        f"{tmp_path / 'shards'}/{{a,b}}.tar", "-o", output, "--model", tiny_model, *FAST, "--flush-every", "1",
        pause_at="rows.first", CAPRL_TEST_ENGINE_DELAY="*:0.3",
    )
    run.wait_paused()
    os.kill(engine_actor(run), signal.SIGKILL)
    run.release()
    code, stderr = run.finish()
    assert code == 0, stderr
    assert "died" in stderr
    rows = keys_once(read_rows(output))
    assert sorted(rows) == [f"s{number:02d}" for number in range(IMAGES)]
    assert rows["s03"]["status"] == "error" and rows["s03"]["error"].startswith("decode")
    assert all(row["status"] == "ok" for key, row in rows.items() if key != "s03")
    engines = json.loads(Path(f"{output}.summary.json").read_text())["run"]["engines"]
    assert engines[0]["restarts"] >= 1
    assert ray_processes_left(run) == []


def test_a_killed_driver_leaves_no_ray_process(tiny_model: Path, tmp_path: Path, ray_runs) -> None:
    """SIGKILL to the driver once its engine actor exists: the run's reaper ends every Ray process the
    run started (GCS, raylet, agents, the actor loading its model)."""
    make_images(tmp_path / "images", 4)
    run = ray_runs(tmp_path / "images", "-o", tmp_path / "out.parquet", "--model", tiny_model, *FAST)
    engine_actor(run)
    assert [pid for pid, command in run.processes() if "raylet" in command]  # the cluster runs
    run.process.kill()
    run.process.communicate()
    assert ray_processes_left(run) == []


@pytest.mark.vllm
def test_vllm_cpu_engine_in_a_ray_actor(tiny_model: Path, tmp_path: Path, ray_runs) -> None:
    names = make_images(tmp_path / "images", 4)
    output = tmp_path / "out.parquet"
    run = ray_runs(
        tmp_path / "images", "-o", output, "--model", tiny_model, "--engine", "vllm", "--dtype", "float32",
        "--max-tokens", "12", "--no-progress", "--executor", "ray",
    )
    code, stderr = run.finish()
    assert code == 0, stderr
    rows = keys_once(read_rows(output))
    assert sorted(rows) == names
    assert all(row["status"] == "ok" and row["output_tokens"] >= 1 for row in rows.values())
    assert ray_processes_left(run) == []


# -- user mistakes ------------------------------------------------------------------------------------------


def test_ray_address_without_the_ray_executor_is_a_usage_error(tmp_path: Path, run_caprl) -> None:
    make_images(tmp_path / "images", 1)
    result = run_caprl("caption", tmp_path / "images", "-o", tmp_path / "out.parquet", "--ray-address", "auto")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["caprl: error: --ray-address applies to --executor ray only"]
    assert not (tmp_path / "out.parquet.caprl").exists()


def test_the_ray_executor_without_ray_installed_is_a_usage_error(tmp_path: Path, run_caprl) -> None:
    make_images(tmp_path / "images", 1)
    hidden = tmp_path / "no-ray" / "ray"  # an environment where `import ray` fails
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    result = run_caprl(
        "caption", tmp_path / "images", "-o", tmp_path / "out.parquet", "--executor", "ray",
        env={"PYTHONPATH": str(tmp_path / "no-ray")},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "caprl-cli[ray]" in lines[0], result.stderr
    assert not (tmp_path / "out.parquet.caprl").exists()


# -- the parts ----------------------------------------------------------------------------------------------


def test_engines_follow_the_cluster_gpus() -> None:
    assert place_engines(0, None, 1) == place_engines(0, 1, 1)
    assert place_engines(0, 3, 1).engines == 3 and place_engines(0, 3, 1).gpus_per_engine == 0
    assert place_engines(8, None, 2).engines == 4 and place_engines(8, None, 2).gpus_per_engine == 2
    assert place_engines(8, 3, 1).engines == 3
    with pytest.raises(UsageError):
        place_engines(2, 3, 1)
    with pytest.raises(UsageError):
        place_engines(0, None, 2)


def test_the_reaper_kills_only_the_clusters_processes(tmp_path: Path) -> None:
    """Marked by the environment, or holding a file open in the cluster's folder (as a renamed Ray
    process does): killed. Anything else: left alone."""
    marker = uuid.uuid4().hex
    folder = tmp_path / "cluster"
    (folder / "logs").mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import sys, time; handle = open(sys.argv[1], 'a'); time.sleep(600)"]
    marked = subprocess.Popen([*sleeper, str(tmp_path / "other.log")], env={**os.environ, MARKER_ENV: marker})
    logging = subprocess.Popen([*sleeper, str(folder / "logs" / "agent.out")], env={**os.environ, MARKER_ENV: "x"})
    other = subprocess.Popen([*sleeper, str(tmp_path / "other.log")], env={**os.environ, MARKER_ENV: "another-run"})
    try:
        deadline = time.monotonic() + 60
        while (folder / "logs" / "agent.out").exists() is False and time.monotonic() < deadline:
            time.sleep(0.05)
        while len(cluster_processes(marker, str(folder), set())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the second sleeper opens its file once its interpreter has started
        assert sorted(cluster_processes(marker, str(folder), set())) == sorted([marked.pid, logging.pid])
        assert sweep(marker, str(folder), set()) == 2
        assert marked.wait(timeout=60) == -signal.SIGKILL
        assert logging.wait(timeout=60) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for process in (marked, logging, other):
            process.kill()
            process.wait()
