"""Engines a program adds by `module:factory` name (the seam bench/executor.py uses), and where the
transformers engine says its weights are."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from caprl_cli.engines import load_engine
from caprl_cli.engines.base import Caption, Engine, EngineSpec, Sampling


class FixedEngine(Engine):
    name = "fixed"

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    @property
    def version(self) -> str:
        return "fixed 1"

    def caption(self, items, should_stop=lambda: False) -> Iterator[tuple[str, Caption]]:
        for item in items:
            yield item.key, Caption("fixed", "stop", 1, 1)

    def close(self) -> None:
        pass


SPEC = EngineSpec("/nowhere", "prompt", Sampling(4, 1.0, 1.0, 0), 3136, 3136)


def test_an_added_engine_is_loaded_by_its_module_and_factory() -> None:
    engine = load_engine(f"{__name__}:FixedEngine", SPEC)
    assert type(engine).__name__ == "FixedEngine" and engine.spec is SPEC


def test_an_unknown_engine_is_still_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine("fixed", SPEC)
    with pytest.raises(AttributeError):
        load_engine(f"{__name__}:NoSuchEngine", SPEC)


def test_the_transformers_engine_names_the_device_its_weights_are_on() -> None:
    torch = pytest.importorskip("torch")
    from caprl_cli.engines.transformers_engine import _device_of

    assert _device_of(torch, torch.nn.Linear(2, 2)) == "cpu"
