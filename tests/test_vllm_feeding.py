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


def test_images_are_rendered_on_the_feeders_thread_once_each(engine, monkeypatch) -> None:
    recorded = Recorded(engine, monkeypatch)
    keys = [key for key, caption in engine.caption([request(f"r{n}", n * 30) for n in range(5)])]
    assert sorted(keys) == [f"r{n}" for n in range(5)]
    assert recorded.renders == 5 and recorded.render_threads == {"caprl-vllm-feeder"}


def test_an_image_the_processor_refuses_is_one_error_row(engine, monkeypatch) -> None:
    render = engine._llm.llm_engine.renderer.render_cmpl
    refused = {"id": None}

    def refusing(prompts, *args, **kwargs):
        if refused["id"] is None:
            refused["id"] = prompts[0]["multi_modal_uuids"]["image"][0]
            raise ValueError("image too odd")
        return render(prompts, *args, **kwargs)

    monkeypatch.setattr(engine._llm.llm_engine.renderer, "render_cmpl", refusing)
    results = dict(engine.caption([request("odd", 1), request("fine", 2)]))
    assert results["odd"].error == "ValueError: image too odd"
    assert results["fine"].error is None


def test_images_are_not_hashed_for_caches_that_never_hit(engine) -> None:
    """Neither the processor cache nor prefix caching is on (prompts share less than one KV block
    before the image), so vLLM's input thread skips hashing every image's pixels."""
    config = engine._llm.llm_engine.vllm_config
    assert config.cache_config.enable_prefix_caching is False
    assert config.model_config.multimodal_config.mm_processor_cache_gb == 0


# -- several captions of one image share its work (--num-captions N > 1) ---------------------------

CAPTIONS = 4
# 448x448 is 256 visual tokens: two full KV blocks of the CPU build's 128 tokens, so a shared prefix
# shows in `num_cached_tokens`.
SHARED_SIDE = 448


@pytest.fixture(scope="module")
def shared_engine(tiny_model: Path) -> Iterator[object]:
    from caprl_cli.engines.vllm_engine import VllmEngine

    settings = CaptionSettings(
        inputs=(), output=None, output_format="jsonl", model=str(tiny_model), engine="vllm", dtype="float32",
        max_tokens=8, num_captions=CAPTIONS,
    )
    source, profile = load_model(settings)
    saved = os.environ.get(_MULTIPROCESSING)
    with _application_context():
        # Prefix caching is off by default on the CPU build (see VllmEngine); on here, with few
        # images (well inside the encoder cache), to check the sharing a GPU gets.
        engine = VllmEngine(engine_spec(settings, source, profile), prefix_caching=True)
    try:
        yield engine
    finally:
        engine.close()
        if saved is None:
            os.environ.pop(_MULTIPROCESSING, None)
        else:
            os.environ[_MULTIPROCESSING] = saved


class Recorded:
    """What vLLM saw of one `caption` call: each request's seed, the tokens it produced and its prefix
    cache hits, and how often the renderer processed an image."""

    def __init__(self, engine: object, monkeypatch: pytest.MonkeyPatch) -> None:
        llm_engine = engine._llm.llm_engine
        self.seeds: dict[str, int] = {}  # request id -> seed, in the order requests were added
        self.tokens: dict[int, list[int]] = {}  # seed -> tokens
        self.cached: dict[int, int] = {}  # seed -> num_cached_tokens
        self.renders = 0
        self.render_threads: set[str] = set()
        self.steps = 0
        self.added_at: dict[int, int] = {}  # seed -> steps done when it was added
        self.first_output_at: dict[int, int] = {}  # seed -> the step that gave its first output
        add, step, render = llm_engine.add_request, llm_engine.step, llm_engine.renderer.render_cmpl

        def recording_add(request_id: str, prompt: object, params: object, *args: object, **kwargs: object) -> str:
            self.seeds[request_id] = params.seed
            self.added_at[params.seed] = self.steps
            return add(request_id, prompt, params, *args, **kwargs)

        def recording_step() -> list[object]:
            outputs = step()
            self.steps += 1
            for output in outputs:
                seed = self.seeds[output.request_id]
                self.first_output_at.setdefault(seed, self.steps)
                self.tokens.setdefault(seed, []).extend(output.outputs[0].token_ids)
                if output.num_cached_tokens is not None:
                    self.cached.setdefault(seed, output.num_cached_tokens)
            return outputs

        def counting_render(*args: object, **kwargs: object) -> object:
            self.renders += 1
            self.render_threads.add(threading.current_thread().name)
            return render(*args, **kwargs)

        monkeypatch.setattr(llm_engine, "add_request", recording_add)
        monkeypatch.setattr(llm_engine, "step", recording_step)
        monkeypatch.setattr(llm_engine.renderer, "render_cmpl", counting_render)


def shared_requests(count: int) -> list[ImageRequest]:
    import numpy as np

    rng = np.random.default_rng(7)
    side = SHARED_SIDE
    return [ImageRequest(f"img{n}", Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
            for n in range(count)]


def caption_run(engine: object, share: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Recorded]:
    images = shared_requests(3)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "share_captions", share)
        if not share:  # the code before: vLLM renders every caption's request inside add_request
            patch.setattr(engine, "render_ahead", False)
        recorded = Recorded(engine, patch)
        captions = dict(engine.caption(images))
    return captions, recorded


def test_several_captions_share_by_default_with_prefix_caching_only_on_a_gpu(shared_engine, monkeypatch) -> None:
    from caprl_cli.engines import vllm_engine

    assert shared_engine.share_captions is True
    assert shared_engine._llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True
    seen: dict[str, object] = {}

    class Recording:
        def __init__(self, **options: object) -> None:
            seen.update(options)
            raise RuntimeError("enough")

    monkeypatch.setattr("vllm.LLM", Recording)
    for on_cpu, expected in ((True, False), (False, True)):
        monkeypatch.setattr(vllm_engine, "_prefer_in_process_engine_on_cpu", lambda on_cpu=on_cpu: on_cpu)
        with pytest.raises(RuntimeError, match="enough"):
            vllm_engine.VllmEngine(shared_engine.spec)
        assert seen["enable_prefix_caching"] is expected


def test_siblings_reuse_the_first_captions_prefill_and_rendering(shared_engine, monkeypatch) -> None:
    from caprl_cli.engines.seeding import request_seed

    captions, recorded = caption_run(shared_engine, True, monkeypatch)
    assert sorted(captions) == ["img0", "img1", "img2"]
    assert all(caption.error is None and len(caption.all) == CAPTIONS for caption in captions.values())
    assert recorded.renders == 3  # the processor ran once per image, not once per caption
    assert recorded.render_threads == {"caprl-vllm-feeder"}  # off the thread that drives the engine
    block = shared_engine._llm.llm_engine.vllm_config.cache_config.block_size
    seeds = list(recorded.seeds.values())
    for key in captions:
        first, *siblings = (request_seed(0, key, index) for index in range(CAPTIONS))
        assert recorded.cached[first] == 0  # nothing to share before it
        # the image's tokens: (256 + the prompt's) // block full blocks come from the first's prefill
        assert all(recorded.cached[seed] == (SHARED_SIDE // 28) ** 2 // block * block for seed in siblings)
        # the siblings went in only after the step that gave the first caption its first token
        assert all(recorded.added_at[seed] >= recorded.first_output_at[first] for seed in siblings)
    assert len(set(seeds)) == 3 * CAPTIONS  # one seed per caption


def test_sharing_changes_no_token_seed_for_seed(shared_engine, monkeypatch) -> None:
    shared, with_sharing = caption_run(shared_engine, True, monkeypatch)
    alone, without = caption_run(shared_engine, False, monkeypatch)
    assert without.renders == 3 * CAPTIONS  # each caption its own request, rendered by vLLM
    assert without.render_threads == {threading.current_thread().name}
    assert set(with_sharing.tokens) == set(without.tokens)
    assert with_sharing.tokens == without.tokens
    assert {key: [(c.text, c.output_tokens) for c in caption.all] for key, caption in shared.items()} == {
        key: [(c.text, c.output_tokens) for c in caption.all] for key, caption in alone.items()
    }


# -- caprl decodes each caption once instead of vLLM detokenizing every step -------------------------


@pytest.mark.parametrize("fixture", ["engine", "shared_engine"])
def test_captions_decoded_once_read_as_vllms_own_detokenizer(fixture: str, request: pytest.FixtureRequest,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    engine = request.getfixturevalue(fixture)
    images = shared_requests(4) + [ImageRequest(f"flat{n}", Image.new("RGB", (56, 56), (n * 60, 90, 30)))
                                   for n in range(4)]
    assert engine._sampling_params("k", 0).detokenize is False  # vLLM's per-step detokenizing is off

    def texts(in_vllm: bool) -> dict[str, list[tuple[str, int | None]]]:
        with monkeypatch.context() as patch:
            patch.setattr(engine, "detokenize_in_vllm", in_vllm)
            return {key: [(c.text, c.output_tokens) for c in caption.all] for key, caption in engine.caption(images)}

    decoded, detokenized = texts(False), texts(True)
    assert decoded == detokenized
    assert sum(len(text) for captions in decoded.values() for text, _ in captions) > 0
