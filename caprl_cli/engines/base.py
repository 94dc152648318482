"""The engine interface: prepared images in, captions with finish reason and token counts out.

Engines stream: they pull prepared images from an iterator as fast as they can use them and yield each
result as soon as it is done, in completion order. That lets vLLM keep its batch full and lets the
runner write rows while the engine works.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from caprl_cli.prepare.pool import Prepared


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by every engine."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class EngineSpec:
    """What an engine needs to start: model files, rendered prompt, limits and device settings."""

    model_path: str
    prompt_text: str
    sampling: Sampling
    min_pixels: int
    max_pixels: int
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    batch_size: int | None = None


@dataclass(frozen=True)
class Caption:
    """One engine result; `error` is set (and the text empty) when this one request failed."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    output_tokens: int | None
    error: str | None = None

    @classmethod
    def failed(cls, message: str, prompt_tokens: int | None = None) -> Caption:
        """The engine could not caption this one image; it becomes an `engine` error row."""
        return cls(None, None, prompt_tokens, None, error=" ".join(message.split()) or "unknown failure")


class Engine(ABC):
    """A loaded model that captions prepared images."""

    name: str = "engine"

    @property
    @abstractmethod
    def version(self) -> str:
        """Version of the library doing the inference, for provenance."""

    @abstractmethod
    def caption(
        self, items: Iterable[Prepared], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[Prepared, Caption]]:
        """Caption every item, yielding results as they finish.

        When `should_stop()` turns true, return soon: unfinished requests are dropped, never yielded
        half-done (their images are simply captioned by a later run).
        """

    def close(self) -> None:
        """Release the model and devices."""


def finish_reason_of(stopped: bool) -> str:
    """`stop` when the model ended the caption itself, `length` when max_tokens cut it off."""
    return "stop" if stopped else "length"
