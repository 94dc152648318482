"""Engines turn prepared images into captions behind one small interface (see `base.Engine`)."""

from __future__ import annotations

from collections.abc import Callable

from caprl_cli.engines.base import Engine, EngineSpec
from caprl_cli.errors import CaprlError, EngineStartError

# Engines beyond the built-in ones, by name: not reachable from the CLI (whose --engine choices are
# fixed), but a program driving `runner.run_caption` can add one, e.g. the stand-in engine with which
# bench/executor.py measures the executor alone. An engine worker process must register it too.
EXTRA_ENGINES: dict[str, Callable[[EngineSpec], Engine]] = {}


def load_engine(name: str, spec: EngineSpec) -> Engine:
    """Start the engine called `name`; heavy imports happen only here."""
    if name in EXTRA_ENGINES:
        return EXTRA_ENGINES[name](spec)
    if name == "vllm":
        from caprl_cli.engines.vllm_engine import VllmEngine

        return VllmEngine(spec)
    if name == "transformers":
        from caprl_cli.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec)
    if name == "openai":
        from caprl_cli.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(spec)
    raise ValueError(f"unknown engine {name!r}")


def start_engine(name: str, spec: EngineSpec) -> Engine:
    """Load the engine, turning any failure into one clear `EngineStartError` (wherever it runs: this
    process, an engine worker, a Ray actor)."""
    try:
        return load_engine(name, spec)
    except CaprlError:  # already one clear line (the openai engine's server checks)
        raise
    except ImportError as exc:
        hint = ' (install it with: pip install "caprl-cli[vllm]")' if name == "vllm" else ""
        raise EngineStartError(f"cannot import the {name} engine: {exc}{hint}") from exc
    except Exception as exc:
        raise EngineStartError(f"cannot start the {name} engine: {type(exc).__name__}: {exc}") from exc
