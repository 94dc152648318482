"""Running the real CLI under each executor, finding the processes of one run, and reading what it
committed.

Every run started here is tagged with an environment variable of its own (`CAPRL_TEST_RAY_TAG`), which
every process it starts inherits (engine workers, decode workers, a local Ray cluster and its actors),
and a temporary folder of its own (TMPDIR, where a local Ray cluster keeps its files and logs; Ray's
Python processes rename themselves, which can hide their environment, but keep their logs there open).
So "no process of the run is left" is checked for that run alone, never confused by other tests'
processes. A moment mid-run is found by an event (a pause point, a committed part), never by sleeping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG = "CAPRL_TEST_RAY_TAG"
BOUND_S = 300.0  # generous bound on any wait for an event; never an assertion on speed


@dataclass(frozen=True)
class Executor:
    """One way to run the engines, as the CLI is told to use it: engine worker processes on this
    machine, or Ray actors on a cluster the run joins by address (`cluster`, with the environment a
    driver needs to reach it)."""

    name: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cluster: Any = None  # a ray_nodes.RayNodes

    def engine_pids(self, run: TaggedRun) -> list[int]:
        """The run's live engine hosts: engine worker processes (in engine order), or Ray actors."""
        if self.cluster is not None:
            from ray_nodes import command_line

            return [pid for pid in self.cluster.processes() if command_line(pid).startswith("ray::EngineActor")]
        workers = engine_workers(run.process.pid)
        return [workers[name] for name in sorted(workers)]

    def left_behind(self, run: TaggedRun) -> list[tuple[int, str]]:
        """What is left of a run that ended: its own processes, and on a cluster its engine actors (the
        cluster itself stays: it is not the run's)."""
        left = run.left_behind()
        deadline = time.monotonic() + 30
        while self.cluster is not None and self.engine_pids(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left + [(pid, "ray::EngineActor") for pid in (self.engine_pids(run) if self.cluster else [])]


LOCAL = Executor("local")


def engine_workers(parent: int) -> dict[str, int]:
    """`caprl engine <n>` -> pid, among the children of `parent` (found through /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and comm.startswith("caprl engine"):
            found[comm] = int(entry.name)
    return found


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


def wait_until(condition: Callable[[], object], process: subprocess.Popen, timeout: float = BOUND_S) -> object:
    """Poll `condition` until it holds; fails if the run ends first (the event never came)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the run ended before the event: {process.communicate()[1]}"
        time.sleep(0.05)
    raise AssertionError("the event did not come")


class TaggedRun:
    """A tagged `caprl` process (see the module doc), optionally held at a pause point."""

    def __init__(self, args: list[str | Path], tmp_path: Path, pause_at: str | None = None, **env: str) -> None:
        self.tag = uuid.uuid4().hex
        self.ready = tmp_path / f"ready-{self.tag}"
        self.tmp = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # short: Ray's socket paths must fit
        extra = {TAG: self.tag, "TMPDIR": self.tmp, **env}
        if pause_at:
            extra.update(CAPRL_PAUSE_AT=pause_at, CAPRL_PAUSE_FILE=str(self.ready))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caprl_cli", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **extra},
        )

    def processes(self) -> list[tuple[int, str]]:
        return tagged_processes(self.tag, self.tmp)

    def wait_paused(self) -> None:
        wait_until(self.ready.exists, self.process)

    def release(self) -> None:
        self.ready.unlink()

    def finish(self) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=BOUND_S * 2)
        return self.process.returncode, stderr

    def left_behind(self) -> list[tuple[int, str]]:
        """Processes of the run other than its driver, once the run ended (after a grace for exits
        under way)."""
        deadline = time.monotonic() + 30
        while True:
            left = [(pid, command) for pid, command in self.processes() if pid != self.process.pid]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def cleanup(self) -> None:
        """Whatever happened, leave no process of this run behind."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        for pid, _ in self.processes():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


StartRun = Callable[..., TaggedRun]


@pytest.fixture
def tagged_runs(tmp_path: Path) -> Iterator[StartRun]:
    """Start tagged `caprl` runs: `start(*args, pause_at=None, **env)`; all are cleaned up afterwards."""
    started: list[TaggedRun] = []

    def start(*args: str | Path, pause_at: str | None = None, **env: str) -> TaggedRun:
        run = TaggedRun(list(args), tmp_path, pause_at, **env)
        started.append(run)
        return run

    yield start
    for run in started:
        run.cleanup()


# -- what a run committed -----------------------------------------------------------------------------------


def committed_parts(output: Path) -> list[Path]:
    """The committed part files of a Parquet output's state folder."""
    state = output.parent / f"{output.name}.caprl"
    return [path for path in state.rglob("*.parquet") if not path.name.startswith(".")]


def committed_keys(output: Path) -> list[str]:
    """Every key in the committed parts, as often as it was committed."""
    import pyarrow.parquet as pq

    return [key for part in committed_parts(output) for key in pq.read_table(part, columns=["key"])["key"].to_pylist()]


def rows_by_key(output: Path) -> dict[str, list[dict]]:
    """The rows of a published Parquet output, by key (a list, to catch a key written twice)."""
    import pyarrow.parquet as pq

    rows: dict[str, list[dict]] = {}
    for row in pq.read_table(output).to_pylist():
        rows.setdefault(row["key"], []).append(row)
    return rows


def summary_of(output: Path) -> dict:
    return json.loads(Path(f"{output}.summary.json").read_text())
