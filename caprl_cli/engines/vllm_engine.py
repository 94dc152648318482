"""Offline vLLM: the default engine, fed continuously so its batch never runs dry.

Requests are added to vLLM's engine as prepared images arrive and results are taken as they finish,
rather than one `generate` call per image or per chunk (which would drain the batch at every chunk
end). Each request carries its own seed, so a caption does not depend on what it was batched with.
Prepared images reach the engine through a `Feeder`, so waiting for one never pauses the batch, and
the feeder's thread also renders them for vLLM (its processor's work), off the thread that drives the
engine. vLLM is asked for token ids only; each caption is decoded once when it ends.

With `num_captions` N > 1 each image is N requests, request i seeded from (seed, key, i) (vLLM's `n`
seeds its samples seed, seed + 1, ..., so caption i of one image would share its seed with caption 0 of
the image whose seed is one higher). The N requests share their image's work (see `_SharedImage`): the
image is rendered once (vLLM's processor: rescale, normalise, patchify), and the N - 1 siblings are
added only once the first request has been prefilled, so prefix caching serves them the image's
encoder output and prompt KV instead of computing both N times. With loop detection on, requests stream
their new tokens every step (`RequestOutputKind.DELTA`) into a `RepetitionTracker`, and a request whose
tail loops is aborted and kept as a caption with finish_reason `repetition`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from caprl_cli.engines.base import Caption, Engine, EngineSpec, ImageRequest, combine_captions
from caprl_cli.engines.feeding import Ended, Feeder
from caprl_cli.engines.repetition import FINISH_REPETITION, RepetitionRule, RepetitionTracker
from caprl_cli.engines.seeding import request_seed

log = logging.getLogger("caprl")
Decode = Callable[[list[int]], str]

# Requests kept waiting beyond what the scheduler runs at once, so finished slots refill at once.
_QUEUE_HEADROOM = 16
# With no request running, how long to wait for input before looking at the stop flag again.
_INPUT_WAIT_S = 0.1


@dataclass
class _Running:
    """One request in the engine: which caption of which image, and (with loop detection) its text
    and tokens so far."""

    key: str
    index: int
    tracker: RepetitionTracker | None = None
    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    streamed: bool = False  # outputs come in pieces (loop detection, or a first caption with siblings held)
    tokens: list[int] = field(default_factory=list)  # a streamed request's tokens, without a tracker


class _Image:
    """The captions of one image, gathered until all `count` are done."""

    def __init__(self, count: int) -> None:
        self.captions: list[Caption | None] = [None] * count
        self.request_ids: list[str] = []
        # Siblings held back until the first caption's prompt is prefilled, with the rendered prompt
        # they are added with (see `_SharedImage`); empty when they went in with the first.
        self.held: list[int] = []
        self.rendered: Any = None

    def done(self, index: int, caption: Caption) -> Caption | None:
        """Record caption `index`; the image's result once every caption is in."""
        self.captions[index] = caption
        if any(caption is None for caption in self.captions):
            return None
        return combine_captions([caption for caption in self.captions if caption is not None])


def _prefer_in_process_engine_on_cpu() -> bool:
    """On a machine without GPUs, run vLLM's engine in this process; return True if on CPU.

    vLLM's default multiprocess mode reserves a core for its front-end, which on a CPU-only machine
    takes a large share of the cores that would otherwise run the model. A value already in the
    environment wins (`VLLM_ENABLE_V1_MULTIPROCESSING=1` runs the separate engine-core process GPUs use).
    """
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return on_cpu


class VllmEngine(Engine):
    """CapRL captioning on `vllm.LLM`."""

    name = "vllm"
    # vLLM detokenizes every running request incrementally at every step, on the thread that drives
    # the engine (10-25 µs per token here: 5-13 ms per 512-token caption, a third to two thirds of that
    # thread's time per image). caprl asks for token ids only and decodes each caption once when it
    # ends (the same text: vLLM's detokenizer skips special tokens as this does). True: vLLM's text.
    detokenize_in_vllm = False
    # Render each image (vLLM's processor) on the feeder's thread, ahead of the engine; False: inside
    # `add_request`, on the engine's thread (the code before; kept for bench/input_thread.py).
    render_ahead = True

    def __init__(
        self, spec: EngineSpec, share_captions: bool | None = None, prefix_caching: bool | None = None
    ) -> None:
        """`share_captions` (default: on when `num_captions` > 1) lets the captions of one image share
        its rendering and (with `prefix_caching`) its encoder output and prompt prefill; off, each
        caption is a request of its own. `prefix_caching` defaults to `share_captions` on a GPU and to
        off on the CPU build: there a sibling whose cached prefix ends inside the image may be
        scheduled in part when the step's encoder budget runs out, and the CPU worker cannot rewind a
        seeded request's generator after a partial prefill (it raises)."""
        on_cpu = _prefer_in_process_engine_on_cpu()
        from vllm import LLM

        self.spec = spec
        self.share_captions = spec.sampling.num_captions > 1 if share_captions is None else share_captions
        if prefix_caching is None:
            prefix_caching = self.share_captions and not on_cpu
        # Siblings wait for their first caption's prefill only when the prefix cache can serve them
        # then; without it the wait buys nothing and costs a step (measured: 0.74x on the CPU build).
        self._hold_siblings = prefix_caching
        options: dict[str, Any] = {
            "model": spec.model_path,
            "dtype": spec.dtype,
            "max_model_len": spec.max_model_len,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "mm_processor_kwargs": spec.processor_image_kwargs(),
            # Every image is new: caching processed images only costs memory and hashing.
            "mm_processor_cache_gb": 0,
            # With one caption per image, prompts share only a few tokens before the image (less than
            # one KV block), so prefix caching never hits; with it and the processor cache both off,
            # vLLM also skips hashing every image's pixels on the thread that prepares inputs (0.7 ms
            # per 448x448 image, 2 ms at 1008x1008), the thread that limits a fast GPU. With several
            # captions sharing their image it hits, and caprl names each image (multi_modal_uuids),
            # so the pixels are never hashed either way.
            "enable_prefix_caching": prefix_caching,
            "disable_log_stats": True,
            "use_tqdm_on_load": False,
            "seed": spec.sampling.seed,
            "enforce_eager": on_cpu,
        }
        if on_cpu:
            # vLLM's CPU worker cannot rewind a per-request seeded generator after a partial
            # prefill; scheduling whole prompts only keeps seeded sampling working there.
            options["enable_chunked_prefill"] = False
        if spec.batch_size is not None:
            options["max_num_seqs"] = spec.batch_size
        if spec.tensor_parallel_size > 1:
            options["tensor_parallel_size"] = spec.tensor_parallel_size
        self._llm = LLM(**options)
        scheduler = self._llm.llm_engine.vllm_config.scheduler_config
        self.max_in_flight = scheduler.max_num_seqs + _QUEUE_HEADROOM
        self._request_ids = itertools.count()  # unique across calls: an aborted request's id is never reused
        self._image_ids = itertools.count()  # names each shared image for vLLM's caches, never reused
        self._watch = watched_rule(spec)
        self._decode: Decode | None = None

    @property
    def version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}"

    def _sampling_params(self, key: str, index: int, streamed: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = self.spec.sampling
        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=1.0,
            seed=request_seed(sampling.seed, key, index),
            detokenize=self.detokenize_in_vllm,
            # Loop detection needs each step's new tokens (and a held-back sibling needs the first
            # token of its image's first caption); otherwise only the finished caption.
            output_kind=RequestOutputKind.DELTA if self._watch or streamed else RequestOutputKind.FINAL_ONLY,
        )

    def _rendered(self, engine: Any, items: Iterable[ImageRequest]) -> Iterator[_Prepared]:
        """Each image with vLLM's engine input for it, rendered here, on the feeder's thread: the
        processor's work (rescale, normalise, patchify, field packing: 5-15 ms per image here) then
        overlaps the engine's steps instead of taking turns with them on the thread that drives it.
        A refusal of the processor travels with its image; an error of `items` itself propagates."""
        for item in items:
            try:
                rendered = _SharedImage.render(engine, self._prompt(item), f"caprl-image-{next(self._image_ids)}")
            except Exception as exc:  # refused by vLLM's input processing: that image's error row
                yield _Prepared(item, None, exc)
            else:
                yield _Prepared(item, rendered, None)

    def _prompt(self, item: ImageRequest) -> dict[str, Any]:
        return {"prompt": self.spec.prompt_text, "multi_modal_data": {"image": item.image}}

    def _add_image(self, engine: Any, prepared: _Prepared, pending: dict[str, _Running]) -> _Image:
        """Add the requests of an image's captions (with sharing: the first only, its siblings held for
        `_release_siblings`); on a refusal, those already added are taken back and it propagates."""
        item = prepared.item
        if prepared.error is not None:
            raise prepared.error
        count = self.spec.sampling.num_captions
        image = _Image(count)
        prompt: Any = prepared.rendered
        if prompt is None:  # rendered by vLLM inside `add_request` (render_ahead off)
            prompt = self._prompt(item)
        first = range(count)
        if self.share_captions and count > 1:
            if prepared.rendered is None:
                prompt = _SharedImage.render(engine, prompt, f"caprl-image-{next(self._image_ids)}")
            if self._hold_siblings:
                image.rendered = prompt
                first, image.held = range(1), list(range(1, count))
        try:
            for index in first:
                self._add_request(engine, item.key, index, prompt, image, pending, streamed=bool(image.held))
        except Exception:
            self._take_back(engine, image, pending)
            raise
        return image

    def _add_request(
        self, engine: Any, key: str, index: int, prompt: Any, image: _Image, pending: dict[str, _Running],
        streamed: bool = False,
    ) -> None:
        rule = self._watch
        request_id = str(next(self._request_ids))
        engine.add_request(request_id, prompt, self._sampling_params(key, index, streamed))
        image.request_ids.append(request_id)
        pending[request_id] = _Running(
            key, index, RepetitionTracker(rule) if rule else None, streamed=streamed or rule is not None
        )

    def _release_siblings(self, engine: Any, key: str, image: _Image, pending: dict[str, _Running]) -> None:
        """Add the held captions of an image whose first caption has been prefilled: their prompt's
        full KV blocks (the image's among them) are now in the prefix cache."""
        held, image.held = image.held, []
        try:
            for index in held:
                self._add_request(engine, key, index, image.rendered, image, pending)
        finally:
            image.rendered = None  # the processed pixels are not kept beyond their last request

    @staticmethod
    def _take_back(engine: Any, image: _Image, pending: dict[str, _Running]) -> None:
        if image.request_ids:
            engine.abort_request(image.request_ids)
            for request_id in image.request_ids:
                pending.pop(request_id, None)

    def caption(
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        engine = self._llm.llm_engine
        decode = None if self.detokenize_in_vllm else self._decoder()
        # Requests come from a thread of their own, so a slow image (a large file, a slow URL) never
        # stops the engine from stepping the sequences it already runs.
        prepared = self._rendered(engine, items) if self.render_ahead else (_Prepared(i, None, None) for i in items)
        feeder: Feeder[_Prepared] = Feeder(prepared, _QUEUE_HEADROOM, name="caprl-vllm-feeder")
        pending: dict[str, _Running] = {}
        images: dict[str, _Image] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) + _held(images) < self.max_in_flight:
                    # With requests running, take only what is ready; with none, wait a little.
                    item = feeder.take(None if pending else _INPUT_WAIT_S)
                    if isinstance(item, Ended):
                        exhausted = True
                    if not isinstance(item, _Prepared):
                        break
                    try:
                        images[item.item.key] = self._add_image(engine, item, pending)
                    except Exception as exc:  # refused by vLLM's input processing: one error row
                        yield item.item.key, Caption.failed(f"{type(exc).__name__}: {exc}")
                if should_stop():
                    return
                if not pending:
                    if exhausted:
                        return
                    continue
                for output in engine.step():
                    running = pending.get(output.request_id)  # None: aborted after this step's output
                    if running is None:
                        continue
                    image = images[running.key]
                    if image.held:  # its first caption has a token: its prompt is prefilled
                        try:
                            self._release_siblings(engine, running.key, image, pending)
                        except Exception as exc:  # refused: the image is one error row
                            self._take_back(engine, image, pending)
                            del images[running.key]
                            yield running.key, Caption.failed(f"{type(exc).__name__}: {exc}")
                            continue
                    caption = _progress_of(running, output, decode)
                    if caption is None:
                        continue
                    del pending[output.request_id]
                    if not output.finished:  # stopped for looping: the engine must not go on with it
                        engine.abort_request([output.request_id])
                    result = image.done(running.index, caption)
                    if result is not None:
                        del images[running.key]
                        yield running.key, result
        finally:
            if pending:  # stopped, or the caller stopped reading: nothing may linger in the engine
                try:
                    engine.abort_request(list(pending))
                except Exception:  # the engine itself failed: the error on its way out says why
                    log.debug("could not abort %d requests", len(pending), exc_info=True)
            feeder.close()

    def _decoder(self) -> Decode:
        """The engine's decoder, made on first use (copying a tokenizer takes a moment)."""
        if self._decode is None:
            self._decode = self._make_decoder()
        return self._decode

    def _make_decoder(self) -> Decode:
        """Token ids to caption text, as vLLM's detokenizer would give it (special tokens skipped).

        A copy of vLLM's tokenizer: the feeder's thread renders (and so tokenizes) prompts with the
        original while this decodes on the engine's thread, and a fast tokenizer's Rust object refuses
        to be borrowed by two threads at once while one of them changes its settings."""
        tokenizer = self._llm.get_tokenizer()
        try:
            tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # a tokenizer that cannot be copied is shared, as vLLM itself shares it
            log.debug("vLLM's tokenizer could not be copied; decoding with it", exc_info=True)

        def decode(tokens: list[int]) -> str:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            end = len(tokens)
            # vLLM's incremental detokenizer holds back tokens whose text ends in an incomplete
            # character (U+FFFD) until a later token completes it; a caption that ends there never
            # shows them. Dropping the same tail tokens gives the same text.
            while end and text.endswith("\ufffd"):
                end -= 1
                text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
            return text

        return decode

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            self._llm = None


@dataclass(frozen=True)
class _Prepared:
    """An image as the feeder hands it over: rendered for vLLM, or the processor's refusal of it (both
    None: to be rendered by `add_request`)."""

    item: ImageRequest
    rendered: Any
    error: Exception | None


class _SharedImage:
    """How the captions of one image share its work in vLLM.

    Each request of an image would run vLLM's processor on it again, and whether requests added
    together share their prefill depends on how the scheduler places them in a step. So the image is
    rendered once into vLLM's engine input, named by a caprl id (vLLM's `multi_modal_uuids`, so its
    pixels are never hashed for the caches), and the siblings are added with that input once the first
    caption has its first token: by then its prompt's full KV blocks are in the prefix cache, the
    image's placeholder tokens with them. Each request keeps its own seed, so the tokens are those of
    N independent requests, seed for seed.
    """

    @staticmethod
    def render(engine: Any, prompt: dict[str, Any], name: str) -> Any:
        """vLLM's engine input for `prompt` (what `add_request` would make of it), made once."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = engine.renderer
        parsed = parse_model_prompt(engine.model_config, {**prompt, "multi_modal_uuids": {"image": [name]}})
        (rendered,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
        return rendered


def _held(images: dict[str, _Image]) -> int:
    """Captions held back for their image's first one: they count against the requests in flight."""
    return sum(len(image.held) for image in images.values())


def watched_rule(spec: EngineSpec) -> RepetitionRule | None:
    """The loop rule to watch tokens for, or None when no caption could ever meet it: a rule needs at
    least `min_tokens` tokens, so with a smaller `max_tokens` streaming every step's tokens (a
    `RequestOutput` per running request per step, built on the thread that drives the engine) would
    cost throughput and never stop anything."""
    rule = spec.repetition
    if rule is None or spec.sampling.max_tokens < rule.min_tokens:
        return None
    return rule


def _progress_of(running: _Running, output: Any, decode: Decode | None) -> Caption | None:
    """The caption of a request once it is finished or loops; None while it goes on. `decode` turns
    token ids into text (None: vLLM detokenized them)."""
    if not running.streamed:  # whole captions only
        return _caption_of(output, decode) if output.finished else None
    completion = output.outputs[0]
    running.text.append(completion.text)  # empty pieces when caprl decodes the tokens itself
    running.prompt_tokens = running.prompt_tokens or len(output.prompt_token_ids or [])
    looping = False
    if running.tracker is None:  # streamed only so that its siblings could start: no loop watch
        running.tokens.extend(completion.token_ids)
        tokens = running.tokens
    else:
        looping = running.tracker.extend(completion.token_ids)
        tokens = running.tracker.tokens
    if output.finished:
        return _caption_of(output, decode, tokens, running.prompt_tokens, "".join(running.text))
    if not looping:
        return None
    return Caption(
        text=decode(tokens) if decode else "".join(running.text),
        finish_reason=FINISH_REPETITION,
        prompt_tokens=running.prompt_tokens,
        output_tokens=len(tokens),
    )


def _caption_of(
    output: Any, decode: Decode | None, tokens: list[int] | None = None, prompt_tokens: int | None = None,
    streamed_text: str | None = None,
) -> Caption:
    """A finished request's caption; `tokens`, the counts and the text when the outputs came in pieces."""
    completion = output.outputs[0]
    if prompt_tokens is None:
        prompt_tokens = len(output.prompt_token_ids or [])
    if completion.finish_reason not in ("stop", "length"):
        message = f"request ended with finish reason {completion.finish_reason!r}"
        return Caption.failed(message, prompt_tokens)
    ids = list(completion.token_ids) if tokens is None else tokens
    if decode is not None:
        text = decode(ids)
    else:
        text = completion.text if streamed_text is None else streamed_text
    return Caption(text=text, finish_reason=completion.finish_reason, prompt_tokens=prompt_tokens,
                   output_tokens=len(ids))
