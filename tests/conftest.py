"""Shared fixtures: a tiny random Qwen2.5-VL built here (no hub), the edge-case image corpus, and a
helper that runs the real `caprl` command in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from corpus import build_corpus  # noqa: E402

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
