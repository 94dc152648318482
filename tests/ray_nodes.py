"""A real Ray cluster of several nodes on this machine, for tests of node loss and of remote clusters.

Each node is one `ray start` (the head with `--head`, the others with `--address`), started in a
session of its own and a temporary folder of its own, so that a node is a set of processes the
tests can name: its session (raylet, agents, workers and actors all stay in it; workers only make
process groups of their own), and whatever holds a file open under its folder. `kill_node` sends
SIGKILL to all of them, as a lost machine would; the head then marks the node dead once its health
checks fail (`wait_state(node, "DEAD")`). The cluster is reached by address
only, so it outlives any Ray client of the pytest process, and a `caprl` subprocess joins it with
`--ray-address` and the environment of `client_env()`.

By default the cluster uses token authentication (Ray's default once a token exists), with a token
file of its own (`RAY_AUTH_TOKEN_PATH`), and the nodes run with a HOME of their own: nothing here
reads or writes the real `~/.ray`. Ports are picked free on 127.0.0.1: the GCS port below 10000 (under
Ray's worker-port range), every other port of every node its own, so that several clusters (other
tests', other users') can run side by side on the machine.

Questions about the cluster (which nodes are alive) go through a short-lived Python subprocess with
the client environment, so that the pytest process never takes on Ray's process-wide authentication
settings.

Run as a script (`python ray_nodes.py nodes ADDRESS` / `wait ADDRESS NODE_ID STATE SECONDS`), this
module is that subprocess.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 120.0  # bound on any wait for an event (a node joining, dying, processes exiting)
GCS_PORTS = range(6400, 10000)  # below Ray's default worker ports (10002-19999)
RESOURCE_UNITS = 1000  # each node's own resource: actors ask for a fraction, e.g. {"node_w1": 1}


# -- processes ----------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[3])


def _files_under(pid: int, folder: str) -> list[str]:
    """The files under `folder` a process holds open."""
    found = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(folder + "/"):
                found.append(target)
    except OSError:
        pass
    return found


def _is_driver(files: list[str]) -> bool:
    """A driver (a `caprl` run, a script with `ray.init`) on this machine logs into the head's session
    folder as well, but belongs to no node."""
    return any(Path(name).name.startswith("python-core-driver-") for name in files)


def command_line(pid: int) -> str:
    """A process's command line (Ray's workers rename themselves: `ray::IDLE`, `ray::Actor.method`)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def live_processes(sessions: set[int], folders: list[str], drivers: bool = False) -> list[int]:
    """Live (not zombie) processes of these sessions, or holding a file open under one of these folders
    (drivers only with `drivers=True`). Every process of a node stays in the session its `ray start`
    began: workers and actors make process groups of their own, but not sessions."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me or (stat := _stat(int(entry.name))) is None:
            continue
        state, _, session = stat
        if state == "Z":
            continue
        if session in sessions:
            found.append(int(entry.name))
            continue
        files = [name for folder in folders for name in _files_under(int(entry.name), folder)]
        if files and (drivers or not _is_driver(files)):
            found.append(int(entry.name))
    return sorted(found)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -- ports --------------------------------------------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now (from the kernel's ephemeral range, above Ray's worker ports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_gcs_port() -> int:
    """A free port below 10000 for a head's GCS."""
    for port in random.sample(GCS_PORTS, 200):
        if _bindable(port):
            return port
    raise RuntimeError("no free port below 10000 for the GCS")


# -- the cluster --------------------------------------------------------------------------------------------


@dataclass
class RayNode:
    """One `ray start` of the cluster."""

    name: str
    num_cpus: int
    resource: str  # a custom resource only this node has (RESOURCE_UNITS of it)
    temp_dir: Path
    session: int  # the session `ray start` began (its pid): every process of the node stays in it
    head: bool
    node_id: str = ""  # Ray's node id (hex), read from the node's raylet
    killed: bool = False

    def processes(self) -> list[int]:
        """Live processes of this node: raylet, agents, workers and actors (and, on the head, GCS).
        A driver on this machine logs under the head's folder too, but is no part of the node."""
        return live_processes({self.session}, [str(self.temp_dir)])

    def raylet_pid(self) -> int | None:
        for pid in self.processes():
            if Path(command_line(pid).split(" ", 1)[0]).name == "raylet":
                return pid
        return None


@dataclass
class RayNodes:
    """A cluster of real Ray nodes on 127.0.0.1: `start()` the head, then `add_node()` the others.

    `health_check_period_ms`, when given, is the head's health-check period (Ray's default is 3000 ms,
    five missed checks mark a node dead: about 12-15 s after a kill). A test that only needs the
    cluster to notice sooner can shorten it; one that reports Ray's own timing leaves it alone."""

    root: Path  # short (Ray's Unix socket paths must fit in 107 bytes): each node's folder is below it
    auth: bool = True
    health_check_period_ms: int | None = None
    nodes: list[RayNode] = field(default_factory=list)
    port: int = 0
    token_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    def client_env(self, auth_mode: bool = True) -> dict[str, str]:
        """What a driver (a `caprl` subprocess) needs to reach the cluster: its address, this tree first
        on the Python path, and the token file of a token cluster with `RAY_AUTH_MODE=token`. With
        `auth_mode=False`, `RAY_AUTH_MODE` is left unset (a user who has only the token file; on a
        cluster without authentication, one whose HOME has an unrelated token)."""
        python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {"RAY_ADDRESS": self.address, "PYTHONPATH": python_path, "RAY_USAGE_STATS_ENABLED": "0"}
        if self.auth:
            assert self.token_path is not None
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        if auth_mode:
            env["RAY_AUTH_MODE"] = "token" if self.auth else "disabled"
        return env

    def node_env(self) -> dict[str, str]:
        """The environment of every node's processes: the client's (workers import `caprl_cli` from this
        tree), with the authentication mode always explicit and a HOME of the cluster's own."""
        env = {**os.environ, **self.client_env(auth_mode=True), "HOME": str(self.root / "home")}
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, num_cpus: int = 1, resource: str | None = None) -> RayNode:
        """Start the head node (it runs work too: `num_cpus` CPUs and a resource of its own)."""
        assert not self.nodes, "the head is already started"
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        if self.auth:
            self.token_path = self.root / "auth_token"
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        for _ in range(5):  # a port found free can be taken before the GCS binds it
            self.port = free_gcs_port()
            try:
                return self._start_node("head", num_cpus, resource, head=True)
            except PortTaken:
                continue
        raise RuntimeError("could not start a head node: no free GCS port")

    def add_node(self, num_cpus: int = 1, name: str | None = None, resource: str | None = None) -> RayNode:
        """Start one more node joining the head (resource `node_<name>` unless given); returns once the
        head lists it alive."""
        assert self.nodes, "start the head first"
        return self._start_node(name or f"w{len(self.nodes)}", num_cpus, resource, head=False)

    def _start_node(self, name: str, num_cpus: int, resource: str | None, head: bool) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=head)
        resource = resource or f"node_{name}"
        command = [
            str(Path(sys.executable).with_name("ray")), "start", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--resources", json.dumps({resource: RESOURCE_UNITS}), "--temp-dir", str(temp_dir),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--object-store-memory", str(80 * 1024 * 1024),
        ]  # fmt: skip
        env = self.node_env()
        if head:
            command += [
                "--head", "--port", str(self.port), "--include-dashboard", "false",
                "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
            ]  # fmt: skip
            if self.health_check_period_ms is not None:
                env["RAY_health_check_period_ms"] = str(self.health_check_period_ms)
                env["RAY_health_check_timeout_ms"] = str(self.health_check_period_ms)
        else:
            command += ["--address", self.address]
        starter = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        node = RayNode(name, num_cpus, resource, temp_dir, session=starter.pid, head=head)
        self.nodes.append(node)  # from here on, shutdown() ends whatever it started
        try:
            _, stderr = starter.communicate(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            starter.kill()
            _, stderr = starter.communicate()
        if starter.returncode != 0:
            self._end(node)
            if head and ("already in use" in stderr or "already running" in stderr):
                raise PortTaken(stderr)
            raise RuntimeError(f"ray start ({name}) failed: {stderr[-2000:]}")
        node.node_id = self._raylet_node_id(node)
        self.wait_state(node, "ALIVE")
        return node

    @staticmethod
    def _raylet_node_id(node: RayNode) -> str:
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            pid = node.raylet_pid()
            for argument in command_line(pid).split() if pid else []:
                if argument.startswith("--node_id="):
                    return argument.split("=", 1)[1]
            time.sleep(0.1)
        raise RuntimeError(f"no raylet found for node {node.name}")

    def kill_node(self, node: RayNode) -> float:
        """SIGKILL every process of the node (raylet, agents, workers, actors), as when its machine is
        lost; returns once none is left, with the monotonic time of the kill (the head notices later:
        `wait_state(node, "DEAD")`)."""
        killed_at = time.monotonic()
        self._end(node)
        node.killed = True
        return killed_at

    def _end(self, node: RayNode) -> None:
        deadline = time.monotonic() + BOUND_S
        while left := node.processes():  # again: a raylet can fork a worker between the scan and its kill
            _kill_all(left)
            assert time.monotonic() < deadline, f"processes of node {node.name} outlived SIGKILL: {left}"
            time.sleep(0.02)

    def node_states(self) -> dict[str, str]:
        """Node id -> "ALIVE" or "DEAD", as the head's GCS has it now."""
        return json.loads(self._ask("nodes", self.address))

    def wait_state(self, node: RayNode, state: str, bound_s: float = BOUND_S) -> None:
        """Wait until the head lists the node in `state` ("ALIVE" or "DEAD"); AssertionError after the bound."""
        answer = self._ask("wait", self.address, node.node_id, state, str(bound_s)).strip()
        assert answer == state, f"node {node.name} never became {state} (it is {answer})"

    def _ask(self, *arguments: str) -> str:
        done = subprocess.run(
            [sys.executable, __file__, *arguments],
            env={**os.environ, **self.client_env()}, capture_output=True, text=True, timeout=BOUND_S * 2,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"asking the cluster failed: {done.stderr[-2000:]}")
        return done.stdout

    def processes(self) -> list[int]:
        """Every live process of every node of the cluster, and any driver still attached to it."""
        return live_processes({node.session for node in self.nodes}, [str(self.root)], drivers=True)

    def shutdown(self) -> None:
        """SIGKILL every process of the cluster (and of a driver left attached to it) and wait until
        none is left; then remove the folders. RuntimeError if a process outlives that."""
        deadline = time.monotonic() + BOUND_S
        while left := self.processes():
            _kill_all(left)
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray processes outlived SIGKILL: {[(pid, command_line(pid)) for pid in left]}")
            time.sleep(0.02)
        shutil.rmtree(self.root, ignore_errors=True)


class PortTaken(RuntimeError):
    """The GCS port picked was taken before the head bound it."""


@contextmanager
def ray_nodes(auth: bool = True, health_check_period_ms: int | None = None) -> Iterator[RayNodes]:
    """An empty `RayNodes` in a short temporary folder of its own, shut down on the way out, whatever
    happened (for fixtures of any scope: `with ray_nodes() as cluster: cluster.start(); yield cluster`)."""
    cluster = RayNodes(
        Path(tempfile.mkdtemp(prefix="rn", dir="/tmp")), auth=auth, health_check_period_ms=health_check_period_ms
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


# -- the query subprocess -----------------------------------------------------------------------------------


def _states(client: object) -> dict[str, str]:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    return {
        node_id.hex(): GcsNodeInfo.GcsNodeState.Name(info.state)
        for node_id, info in client.get_all_node_info(timeout=30).items()  # type: ignore[attr-defined]
    }


def _main(arguments: list[str]) -> None:
    from ray._raylet import GcsClient

    client = GcsClient(address=arguments[1])
    if arguments[0] == "nodes":
        print(json.dumps(_states(client)))
        return
    node_id, state, bound_s = arguments[2], arguments[3], float(arguments[4])
    deadline = time.monotonic() + bound_s
    now = _states(client).get(node_id)
    while now != state and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _states(client).get(node_id)
    print(now)


if __name__ == "__main__":
    _main(sys.argv[1:])
