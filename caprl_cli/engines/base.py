"""The engine interface: image requests (a key and model-ready pixels) in, captions by key out.

Engines stream: they pull requests from an iterator as fast as they can use them and yield each
result as soon as it is done, in completion order. That lets vLLM keep its batch full and lets the
executor write rows while the engine works. Engines see only keys and pixels, never the decoding
pool's objects, so an engine can live in another process than the one that keeps the rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from PIL import Image


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
    tensor_parallel_size: int = 1  # GPUs one engine spreads over (vLLM)


@dataclass(frozen=True)
class ImageRequest:
    """One image to caption: its key (which also seeds its sampling) and the pixels the model sees."""

    key: str
    image: Image.Image


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
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        """Caption every request, yielding `(key, caption)` as each finishes; keys are unique per call.

        When `should_stop()` turns true, return soon: unfinished requests are dropped, never yielded
        half-done (their images are simply captioned by a later run).
        """

    def close(self) -> None:
        """Release the model and devices."""


def finish_reason_of(stopped: bool) -> str:
    """`stop` when the model ended the caption itself, `length` when max_tokens cut it off."""
    return "stop" if stopped else "length"
