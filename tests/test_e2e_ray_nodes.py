"""A Ray cluster of several real nodes on this machine loses one mid-run: the real CLI as the driver,
joining by address a token-authenticated cluster whose head runs no work, and a real SIGKILL of every
process of the node that hosts an engine actor (its raylet, agents and actors), as a lost machine.

The run gets that actor's work back as soon as Ray reports the actor dead, captions it on the node
that is left, and ends by itself with exit 0, each key committed once, long before the stall timeout.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from executors import StartRun, TaggedRun, committed_keys, wait_until
from PIL import Image
from ray_nodes import RayNode, RayNodes, command_line
from ray_nodes import ray_nodes as cluster_of_nodes

pytest.importorskip("ray")

IMAGES = 24
ENGINE_ARGS = (
    "--engine", "transformers", "--max-tokens", "6", "--no-progress", "--batch-size", "2", "--workers", "0",
    "--executor", "ray", "--num-engines", "2", "--flush-every", "1",
)  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayNodes]:
    """A head that runs no work (no CPU: every actor lands on a worker node) and two worker nodes of
    one CPU each (room for both engine actors on either). Health checks every second, so a lost node is
    noticed in seconds rather than Ray's default quarter of a minute."""
    with cluster_of_nodes(health_check_period_ms=1000) as nodes:
        nodes.start(num_cpus=0)
        nodes.add_node(num_cpus=1)
        nodes.add_node(num_cpus=1)
        yield nodes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("node-loss-images")
    for number in range(IMAGES):
        Image.new("RGB", (40 + number, 36), (number * 9 % 256, 90, 160)).save(root / f"img{number:02d}.jpg")
    return root


def actor_nodes(cluster: RayNodes) -> dict[int, RayNode]:
    """Engine actor pid -> the node it runs on."""
    return {
        pid: node
        for node in cluster.nodes
        if not node.killed
        for pid in node.processes()
        if command_line(pid).startswith("ray::EngineActor")
    }


def test_a_lost_node_gives_its_work_back_and_the_run_completes(
    cluster: RayNodes, folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, run_caprl
) -> None:
    output = tmp_path / "out.parquet"
    run: TaggedRun = tagged_runs(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--ray-address", cluster.address,
        **cluster.client_env(), CAPRL_TEST_ENGINE_DELAY="*:0.5",
    )
    wait_until(lambda: len(actor_nodes(cluster)) == 2, run.process)
    wait_until(lambda: committed_keys(output), run.process)  # both engines are captioning
    lost = next(iter(actor_nodes(cluster).values()))
    cluster.kill_node(lost)
    code, stderr = run.finish()
    assert code == 0, stderr
    assert "died" in stderr and "no progress" not in stderr  # given back on its death, not by the stall watchdog
    rows = pq.read_table(output).to_pylist()
    keys = [row["key"] for row in rows]
    assert sorted(keys) == [f"img{number:02d}.jpg" for number in range(IMAGES)]
    assert all(row["status"] == "ok" for row in rows)
    engines = json.loads(Path(f"{output}.summary.json").read_text())["run"]["engines"]
    assert sum(engine["restarts"] for engine in engines) >= 1
    assert sum(engine["images"] for engine in engines) == IMAGES
    assert all(node.node_id for node in cluster.nodes if not node.killed)
    assert run.left_behind() == []
    status = run_caprl("status", output, folder, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["done"] == IMAGES


def test_sigterm_on_a_remote_cluster_drains_and_leaves_no_actor(
    cluster: RayNodes, folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun
) -> None:
    """On a cluster the run only joined, a drain ends the run's own actors (the cluster stays)."""
    output = tmp_path / "out.parquet"
    run = tagged_runs(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--ray-address", cluster.address,
        pause_at="rows.first", **cluster.client_env(), CAPRL_TEST_ENGINE_DELAY="*:0.5",
    )
    run.wait_paused()
    run.process.send_signal(signal.SIGTERM)
    run.release()
    code, stderr = run.finish()
    assert code == 143, stderr
    done = committed_keys(output)
    assert 1 <= len(done) == len(set(done)) < IMAGES
    deadline = time.monotonic() + 60
    while actor_nodes(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert actor_nodes(cluster) == {}
