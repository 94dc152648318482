"""`--executor ray` end to end: the real CLI on a local Ray cluster the run starts itself, with real
actors killed with SIGKILL, a real SIGTERM to the driver, and a real SIGKILL of the driver.

Every run is tagged with an environment variable of its own (`CAPRL_TEST_RAY_TAG`), which every Ray
process it starts inherits, and a temporary folder of its own (TMPDIR, where its Ray cluster keeps its
files and logs; Ray's Python processes rename themselves, which hides their environment, but keep
their logs there open), so "no Ray process of the run is left" is checked for that run alone and never
confused by other tests' processes. A moment mid-run is found by a pause point (`rows.first`,
the driver's first row), never by sleeping.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, write_shard
from contract import read_rows
from PIL import Image

from caprl_cli.execute.ray_transport import place_engines
from caprl_cli.execute.ray_reaper import MARKER_ENV, cluster_processes, sweep
from caprl_cli.errors import UsageError

pytest.importorskip("ray")

FAST = ("--engine", "transformers", "--max-tokens", "6", "--batch-size", "1", "--no-progress", "--executor", "ray")
IMAGES = 10
BOUND_S = 300.0  # generous bound on any wait for an event; never an assertion on speed
TAG = "CAPRL_TEST_RAY_TAG"


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


def _opened_under(entry: Path, folder: str) -> bool:
    try:
        return any(os.readlink(fd).startswith(folder + "/") for fd in (entry / "fd").iterdir())
    except OSError:
        return False


def tagged_processes(tag: str, folder: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process started with CAPRL_TEST_RAY_TAG=<tag> or holding a
    file open under `folder`."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0") and not _opened_under(entry, folder):
                continue
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append((int(entry.name), command))
    return found


def ray_processes_left(run: RayRun) -> list[tuple[int, str]]:
    """Processes of the run other than its driver (gone or not), after a grace for exits under way."""
    deadline = time.monotonic() + 30
    while True:
        left = [(pid, command) for pid, command in run.processes() if pid != run.process.pid]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class RayRun:
    """A tagged `caprl caption --executor ray` process, optionally held at a pause point."""

    def __init__(self, args: list[str | Path], tmp_path: Path, pause_at: str | None = None, **env: str) -> None:
        self.tag = uuid.uuid4().hex
        self.ready = tmp_path / f"ready-{self.tag}"
        self.tmp = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # short: Ray's socket paths must fit
        extra = {TAG: self.tag, "TMPDIR": self.tmp, **env}
        if pause_at:
            extra.update(CAPRL_PAUSE_AT=pause_at, CAPRL_PAUSE_FILE=str(self.ready))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caprl_cli", "caption", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **extra},
        )

    def processes(self) -> list[tuple[int, str]]:
        return tagged_processes(self.tag, self.tmp)

    def wait_paused(self) -> None:
        deadline = time.monotonic() + BOUND_S
        while not self.ready.exists():
            assert self.process.poll() is None, f"the run ended before its pause point: {self.process.communicate()}"
            assert time.monotonic() < deadline, "the run never reached its pause point"
            time.sleep(0.05)

    def release(self) -> None:
        self.ready.unlink()

    def finish(self) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=BOUND_S)
        return self.process.returncode, stderr

    def cleanup(self) -> None:
        """Whatever happened, leave no process of this run behind."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        for pid, _ in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def ray_runs(tmp_path: Path):
    started: list[RayRun] = []

    def start(*args: str | Path, pause_at: str | None = None, **env: str) -> RayRun:
        run = RayRun(list(args), tmp_path, pause_at, **env)
        started.append(run)
        return run

    yield start
    for run in started:
        run.cleanup()


def engine_actor(run: RayRun) -> int:
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


def test_sigterm_drains_then_a_resume_on_ray_completes(tiny_model: Path, tmp_path: Path, ray_runs, run_caprl) -> None:
    """A folder on a local Ray: SIGTERM to the driver mid-run commits what was finished and exits
    143 leaving no Ray process; the same command then completes with every key once."""
    names = make_images(tmp_path / "images")
    output = tmp_path / "out.parquet"
    args = [tmp_path / "images", "-o", output, "--model", tiny_model, *FAST]
    run = ray_runs(*args, pause_at="rows.first", CAPRL_TEST_ENGINE_DELAY="*:0.3")
    run.wait_paused()
    run.process.send_signal(signal.SIGTERM)
    run.release()
    code, stderr = run.finish()
    assert code == 143, stderr
    assert "Traceback" not in stderr
    done = [row["key"] for row in read_rows(output)]
    assert 1 <= len(done) < len(names) and len(set(done)) == len(done)
    assert ray_processes_left(run) == []

    rest = ray_runs(*args)
    code, stderr = rest.finish()
    assert code == 0, stderr
    rows = keys_once(read_rows(output))
    assert sorted(rows) == names
    assert all(row["status"] == "ok" for row in rows.values())
    assert ray_processes_left(rest) == []
    status = run_caprl("status", output, tmp_path / "images", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == len(names)


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
