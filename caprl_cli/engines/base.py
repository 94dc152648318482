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
from typing import Any

from PIL import Image

from caprl_cli.defaults import DEFAULT_CONCURRENCY, DEFAULT_RETRIES
from caprl_cli.engines.repetition import FINISH_REPETITION, RepetitionRule


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by every engine."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    # Captions per image, caption i sampled with `request_seed(seed, key, i)`.
    num_captions: int = 1


@dataclass(frozen=True)
class ServerSpec:
    """Where an HTTP engine finds its model: an OpenAI-compatible server (see engines/openai_engine.py).

    `api_key_env` names the environment variable holding the key; the key itself is never stored."""

    base_url: str
    model: str  # what --model names: the served model id (or root) to find on the server
    api_key_env: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    prompt: str = ""  # the user instruction and system turn, as chat messages carry them
    system_prompt: str | None = None


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
    # Stop a caption whose tail loops (finish_reason `repetition`); None: never.
    repetition: RepetitionRule | None = None
    # What the model's processor takes per image (from the model's profile); None: the Qwen-VL
    # pixel bounds from min_pixels/max_pixels.
    image_kwargs: dict[str, Any] | None = None
    # --engine openai: the server to caption through; None for the engines that load the model here.
    server: ServerSpec | None = None

    def processor_image_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the processor's image side: the same in every engine."""
        if self.image_kwargs is not None:
            return dict(self.image_kwargs)
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


@dataclass(frozen=True)
class ImageRequest:
    """One image to caption: its key (which also seeds its sampling) and the pixels the model sees."""

    key: str
    image: Image.Image
    # The original was JPEG-compressed: an engine that must encode the pixels again (to send them over
    # HTTP) may use a high-quality JPEG without losing anything the source had; otherwise lossless PNG.
    lossy_source: bool = False


@dataclass(frozen=True)
class Caption:
    """One engine result; `error` is set (and the text empty) when this one request failed.

    With `num_captions` N > 1 the result of an image is its first caption with the other N-1 in
    `extra`, in index order (`all` gives the N of them)."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    output_tokens: int | None
    error: str | None = None
    extra: tuple[Caption, ...] = ()
    # The failure may pass (a server that was down or overloaded through every retry): the row is
    # `unavailable`, which the next plain run tries again, rather than a final `engine` row.
    transient: bool = False

    @property
    def all(self) -> tuple[Caption, ...]:
        """Every caption of the image, caption 0 first."""
        return (self, *self.extra)

    @classmethod
    def failed(cls, message: str, prompt_tokens: int | None = None) -> Caption:
        """The engine could not caption this one image; it becomes an `engine` error row."""
        return cls(None, None, prompt_tokens, None, error=" ".join(message.split()) or "unknown failure")

    @classmethod
    def unavailable(cls, message: str) -> Caption:
        """The engine could not reach its model for this image (transiently): an `unavailable` row."""
        return cls(None, None, None, None, error=" ".join(message.split()) or "unknown failure", transient=True)


def combine_captions(captions: list[Caption]) -> Caption:
    """The result of one image from its captions in index order: the first failure if any failed
    (one failed sample fails the image's row, which a later run retries), else caption 0 carrying the
    others in `extra`."""
    failed = next((caption for caption in captions if caption.error is not None), None)
    if failed is not None:
        return failed
    first = captions[0]
    return Caption(first.text, first.finish_reason, first.prompt_tokens, first.output_tokens, extra=tuple(captions[1:]))


class Engine(ABC):
    """A loaded model that captions prepared images."""

    name: str = "engine"
    # Requests the engine takes in before its first result comes out: what an executor keeps in its
    # hands, so the engine never waits on the executor (vLLM: its batch and a queue beside it).
    max_in_flight: int = 8
    # How the prompt reached the model, when the engine does not feed `spec.prompt_text` itself (an
    # HTTP server's template); recorded in provenance. None: the rendered CapRL prompt was used.
    prompt_sent: dict[str, Any] | None = None

    @property
    @abstractmethod
    def version(self) -> str:
        """Version of the library doing the inference, for provenance."""

    @abstractmethod
    def caption(
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        """Caption every request, yielding `(key, caption)` as each finishes; keys are unique per call.
        With `spec.sampling.num_captions` N > 1, one result per key holds all N (`combine_captions`).

        When `should_stop()` turns true, return soon: unfinished requests are dropped, never yielded
        half-done (their images are simply captioned by a later run).
        """

    def close(self) -> None:
        """Release the model and devices."""


def finish_reason_of(stopped: bool, looping: bool = False) -> str:
    """`stop` when the model ended the caption itself, `repetition` when caprl stopped a caption that
    kept repeating itself, `length` when max_tokens cut it off."""
    if stopped:
        return "stop"
    return FINISH_REPETITION if looping else "length"
