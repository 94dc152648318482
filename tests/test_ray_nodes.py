"""The multi-node Ray cluster of `ray_nodes`: nodes join with their own CPUs and resources, a driver
reaches it by address with the fixture's environment, `kill_node` takes one node's processes (its
actors included) down with SIGKILL and the head marks it dead, and shutting down leaves no process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from ray_nodes import RayNode, RayNodes, command_line, live_processes
from ray_nodes import ray_nodes as cluster_of_nodes

pytest.importorskip("ray")

# A driver that starts one actor per resource named on its command line, prints where each runs, then
# (with --pending) leaves a call outstanding on the last one and prints how that call ended.
DRIVER = r"""
import json, os, sys, time
import ray

ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)

@ray.remote(num_cpus=0.1, max_restarts=0)
class Probe:
    def where(self):
        import caprl_cli
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "caprl": caprl_cli.__file__}
    def wait(self):
        time.sleep(3600)

resources = [name for name in sys.argv[1:] if not name.startswith("--")]
probes = [Probe.options(resources={name: 1}).remote() for name in resources]
print(json.dumps([ray.get(probe.where.remote(), timeout=120) for probe in probes]), flush=True)
if "--pending" in sys.argv:
    pending = probes[-1].wait.remote()
    try:
        ray.get(pending, timeout=300)
        print("returned", flush=True)
    except ray.exceptions.RayActorError as exc:
        print(type(exc).__name__, flush=True)
"""


def driver(cluster: RayNodes, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **cluster.client_env()}, cwd="/",
    )  # fmt: skip


def test_nodes_join_with_their_own_resources(ray_nodes: RayNodes) -> None:
    """Each node is alive on the head, takes the actors asking for its resource, runs this tree's
    caprl_cli, and its actors are among its own processes."""
    node = ray_nodes.add_node(num_cpus=2, name="join")
    assert node.resource == "node_join"
    states = ray_nodes.node_states()
    assert states[ray_nodes.head.node_id] == "ALIVE" and states[node.node_id] == "ALIVE"
    run = driver(ray_nodes, ray_nodes.head.resource, node.resource)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    placed = json.loads(stdout.splitlines()[-1])
    assert [probe["node"] for probe in placed] == [ray_nodes.head.node_id, node.node_id]
    assert all(Path(probe["caprl"]).is_relative_to(ROOT) for probe in placed)
    assert placed[1]["pid"] not in ray_nodes.head.processes()
    ray_nodes.kill_node(node)  # a module's later tests get the cluster they expect


def test_kill_node_takes_only_that_node_down(ray_nodes: RayNodes) -> None:
    """SIGKILL of a node ends all of its processes, its actor first among them; the other nodes keep
    theirs; the head marks it dead, and a call pending on its actor fails."""
    keep = ray_nodes.add_node(num_cpus=1, name="keep")
    lost = ray_nodes.add_node(num_cpus=1, name="lost")
    run = driver(ray_nodes, lost.resource, "--pending")
    assert run.stdout is not None
    actor = json.loads(run.stdout.readline())[0]["pid"]
    assert actor in lost.processes()
    daemons = {node.name: _daemons(node) for node in (ray_nodes.head, keep)}
    assert len(daemons["head"]) == 2 and len(daemons["keep"]) == 1

    ray_nodes.kill_node(lost)

    assert lost.processes() == [] and not _alive(actor)
    assert all(_alive(pid) for pids in daemons.values() for pid in pids)
    ray_nodes.wait_state(lost, "DEAD")
    assert ray_nodes.node_states()[keep.node_id] == "ALIVE"
    stdout, stderr = run.communicate(timeout=300)
    assert stdout.splitlines()[-1] in ("ActorUnavailableError", "ActorDiedError"), stderr  # Ray says which, by timing


def _daemons(node: RayNode) -> list[int]:
    """The node's own long-lived processes (the raylet and, on the head, the GCS)."""
    return [pid for pid in node.processes() if Path(command_line(pid).split(" ")[0]).name in ("raylet", "gcs_server")]


def test_shutdown_leaves_no_process() -> None:
    """Shutting a cluster down, with a driver still attached, leaves no process of it."""
    with cluster_of_nodes(auth=False) as cluster:
        cluster.start(num_cpus=1)
        node = cluster.add_node(num_cpus=1)
        run = driver(cluster, node.resource, "--pending")
        assert run.stdout is not None
        json.loads(run.stdout.readline())
        started = cluster.processes()
        assert run.pid in started and set(node.processes()) <= set(started)
        sessions = {each.session for each in cluster.nodes}
    run.wait(timeout=60)
    assert live_processes(sessions, [str(cluster.root)], drivers=True) == []
    assert not any(_alive(pid) for pid in started)
    assert not cluster.root.exists()


def _alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie (a killed process waits a moment to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
