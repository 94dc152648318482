"""The real vLLM engine (CPU build, tiny model) keeps stepping while its input waits on a slow image."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from caprl_cli.engines.base import ImageRequest
from caprl_cli.execute.job import engine_spec, load_model
from caprl_cli.settings import CaptionSettings

pytestmark = pytest.mark.vllm
EARLY = 3
_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[object]:
    from caprl_cli.engines.vllm_engine import VllmEngine

    settings = CaptionSettings(
        inputs=(), output=None, output_format="jsonl", model=str(tiny_model), engine="vllm", dtype="float32",
        max_tokens=8,
    )
    source, profile = load_model(settings)
    saved = os.environ.get(_MULTIPROCESSING)
    with _application_context():
        engine = VllmEngine(engine_spec(settings, source, profile))
    try:
        yield engine
    finally:
        engine.close()
        if saved is None:  # the engine's CPU default must not leak into later subprocess runs
            os.environ.pop(_MULTIPROCESSING, None)
        else:
            os.environ[_MULTIPROCESSING] = saved


def _application_context() -> contextlib.AbstractContextManager[object]:
    """vLLM's CPU start-up probes every loaded module's attributes with hasattr; once moto's server (the
    S3 tests, earlier in this pytest process) has imported Flask, its `current_app` and `request` proxies raise outside
    an application and request context. The caprl command never imports Flask; this in-process engine gives the
    probe an application and a request to find."""
    flask = sys.modules.get("flask")
    return flask.Flask(__name__).test_request_context() if flask is not None else contextlib.nullcontext()


def request(key: str, shade: int) -> ImageRequest:
    return ImageRequest(key, Image.new("RGB", (56, 56), (shade, 80, 200)))


class BlockedInput:
    """Requests: EARLY images at once, then one more only after `release` (a slow decode)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waited_in_vain = False

    def __iter__(self) -> Iterator[ImageRequest]:
        for number in range(EARLY):
            yield request(f"early{number}", number * 40)
        if not self.release.wait(timeout=300):
            self.waited_in_vain = True
        yield request("late", 250)


def test_captions_come_out_while_the_next_image_is_not_ready(engine) -> None:
    source = BlockedInput()
    finished: list[tuple[str, bool]] = []  # key, and whether the late image had been released then
    for key, caption in engine.caption(source):
        assert caption.error is None, caption.error
        finished.append((key, source.release.is_set()))
        if len(finished) == EARLY:
            source.release.set()  # only now can the last image come
    assert not source.waited_in_vain, "the engine waited on the blocked image before captioning the others"
    assert sorted(key for key, _ in finished[:EARLY]) == [f"early{number}" for number in range(EARLY)]
    assert not any(released for _, released in finished[:EARLY])
    assert finished[EARLY:] == [("late", True)]


def test_a_stop_is_honoured_while_waiting_for_input(engine) -> None:
    source = BlockedInput()
    done: list[str] = []
    captions = engine.caption(source, should_stop=lambda: len(done) == EARLY)
    for key, _ in captions:
        done.append(key)
    blocked_at_the_end = not source.release.is_set()
    source.release.set()
    assert blocked_at_the_end and not source.waited_in_vain
    assert sorted(done) == [f"early{number}" for number in range(EARLY)]


def test_an_error_of_the_input_reaches_the_caller(engine) -> None:
    def failing() -> Iterator[ImageRequest]:
        yield request("fine", 10)
        raise OSError("the listing broke")

    with pytest.raises(OSError, match="the listing broke"):
        list(engine.caption(failing()))
    # The engine is left clean: the next call captions normally.
    assert [key for key, _ in engine.caption([request("after", 20)])] == ["after"]


def test_images_are_not_hashed_for_caches_that_never_hit(engine) -> None:
    """Neither the processor cache nor prefix caching is on (prompts share less than one KV block
    before the image), so vLLM's input thread skips hashing every image's pixels."""
    config = engine._llm.llm_engine.vllm_config
    assert config.cache_config.enable_prefix_caching is False
    assert config.model_config.multimodal_config.mm_processor_cache_gb == 0
