"""Engines turn prepared images into captions behind one small interface (see `base.Engine`)."""

from __future__ import annotations

from caprl_cli.engines.base import Engine, EngineSpec


def load_engine(name: str, spec: EngineSpec) -> Engine:
    """Start the engine called `name`; heavy imports happen only here."""
    if name == "vllm":
        from caprl_cli.engines.vllm_engine import VllmEngine

        return VllmEngine(spec)
    if name == "transformers":
        from caprl_cli.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec)
    raise ValueError(f"unknown engine {name!r}")
