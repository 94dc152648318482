"""Engines turn prepared images into captions behind one small interface (see `base.Engine`)."""

from __future__ import annotations

import importlib

from caprl_cli.engines.base import Engine, EngineSpec
from caprl_cli.errors import CaprlError, EngineStartError


def load_engine(name: str, spec: EngineSpec) -> Engine:
    """Start the engine called `name`; heavy imports happen only here.

    Besides the built-in engines, `name` may be `module:factory` (a callable taking the spec): an engine
    a program driving `runner.run_caption` adds, such as the stand-in engines with which
    bench/executor.py measures the executor alone. It is imported by name where the engine runs (this
    process, an engine worker, a Ray actor on another node), so it reaches every transport alike. The
    CLI's --engine choices never name one.
    """
    if ":" in name:
        module, _, factory = name.partition(":")
        return getattr(importlib.import_module(module), factory)(spec)
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
