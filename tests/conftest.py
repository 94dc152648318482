"""Shared fixtures: a tiny random Qwen2.5-VL built here (no hub), the edge-case image corpus, and a
helper that runs the real `caprl` command in a subprocess."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from corpus import build_corpus  # noqa: E402
from executors import tagged_runs  # noqa: E402,F401 (a fixture for every test module)
from ray_nodes import RayNodes  # noqa: E402
from ray_nodes import ray_nodes as cluster_of_nodes  # noqa: E402

# Engines on a CPU test machine: small KV cache, never reach for a hub.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load_tiny_model_builder():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "examples" / "make_tiny_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2.5-VL with CapRL-3B's processor and template, built once per session."""
    return _load_tiny_model_builder().build(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """The edge-case image folder and, per key, the expected error kind (None: captions fine)."""
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


RunCaprl = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def run_caprl() -> RunCaprl:
    """Run the installed `caprl` CLI; returns the completed process (text stdout/stderr)."""

    def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "caprl_cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=ROOT,
        )

    return run


@pytest.fixture
def serve_folder() -> Iterator[Callable[[Path], str]]:
    """Serve folders over HTTP on 127.0.0.1 (a port of its own each); returns the base URL, no slash."""
    servers: list[ThreadingHTTPServer] = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def memory_fs() -> Iterator[object]:
    """fsspec's process-global memory filesystem, emptied after the test."""
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


def write_shard(path: Path, samples: list[dict[str, object]]) -> Path:
    """A WebDataset shard written by webdataset's own TarWriter: each sample a dict with __key__ and
    one entry per member (bytes, text, or a dict for .json)."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen3-VL (CapRL-Qwen3VL's architecture: a 32-pixel grid), built once per session."""
    return _load_tiny_model_builder().build_qwen3_vl(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random transformers-native InternVL3.5 (CapRL-InternVL3.5's architecture: tiles), built once."""
    return _load_tiny_model_builder().build_internvl(tmp_path_factory.mktemp("models") / "tiny-internvl")


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayNodes]:
    """A real Ray cluster on this machine, shared by the tests of one module: a token-authenticated
    head with one CPU (`ray_nodes.RayNodes`); a test adds the nodes it needs (`add_node`, each with
    its own CPUs and resource) and may kill them (`kill_node`). Every process of it is gone afterwards."""
    pytest.importorskip("ray")
    with cluster_of_nodes() as cluster:
        cluster.start(num_cpus=1)
        yield cluster


# Fixtures that mean a test runs real parts end to end: the CLI in a subprocess, a model, a cluster.
END_TO_END_FIXTURES = {"tiny_model", "tiny_qwen3_vl", "tiny_internvl", "run_caprl", "tagged_runs", "ray_nodes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the end-to-end tests `e2e` (modules named test_e2e_* or test_ray_*, and any test that runs
    the CLI, a model or a cluster), so `pytest -m "not e2e"` (`make unit`) is the fast unit tier."""
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__ if module is not None else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if name.startswith(("test_e2e_", "test_ray_")) or END_TO_END_FIXTURES & fixtures:
            item.add_marker(pytest.mark.e2e)
