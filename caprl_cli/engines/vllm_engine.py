"""Offline vLLM: the default engine, fed continuously so its batch never runs dry.

Requests are added to vLLM's engine as prepared images arrive and results are taken as they finish,
rather than one `generate` call per image or per chunk (which would drain the batch at every chunk
end). Each request carries its own seed, so a caption does not depend on what it was batched with.
Prepared images reach the engine through a `Feeder`, so waiting for one never pauses the batch.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from caprl_cli.engines.base import Caption, Engine, EngineSpec, ImageRequest
from caprl_cli.engines.feeding import Ended, Feeder
from caprl_cli.engines.seeding import request_seed

log = logging.getLogger("caprl")

# Requests kept waiting beyond what the scheduler runs at once, so finished slots refill at once.
_QUEUE_HEADROOM = 16
# With no request running, how long to wait for input before looking at the stop flag again.
_INPUT_WAIT_S = 0.1


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

    def __init__(self, spec: EngineSpec) -> None:
        on_cpu = _prefer_in_process_engine_on_cpu()
        from vllm import LLM

        self.spec = spec
        options: dict[str, Any] = {
            "model": spec.model_path,
            "dtype": spec.dtype,
            "max_model_len": spec.max_model_len,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "mm_processor_kwargs": {
                "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
            },
            # Every image is new: caching processed images only costs memory and hashing.
            "mm_processor_cache_gb": 0,
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

    @property
    def version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}"

    def _sampling_params(self, key: str) -> Any:
        from vllm import SamplingParams

        sampling = self.spec.sampling
        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=1.0,
            seed=request_seed(sampling.seed, key),
        )

    def caption(
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        engine = self._llm.llm_engine
        # Requests come from a thread of their own, so a slow image (a large file, a slow URL) never
        # stops the engine from stepping the sequences it already runs.
        feeder: Feeder[ImageRequest] = Feeder(items, _QUEUE_HEADROOM, name="caprl-vllm-feeder")
        pending: dict[str, ImageRequest] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    # With requests running, take only what is ready; with none, wait a little.
                    item = feeder.take(None if pending else _INPUT_WAIT_S)
                    if isinstance(item, Ended):
                        exhausted = True
                    if not isinstance(item, ImageRequest):
                        break
                    request_id = str(next(self._request_ids))
                    try:
                        engine.add_request(
                            request_id,
                            {"prompt": self.spec.prompt_text, "multi_modal_data": {"image": item.image}},
                            self._sampling_params(item.key),
                        )
                    except Exception as exc:  # refused by vLLM's input processing: one error row
                        yield item.key, Caption.failed(f"{type(exc).__name__}: {exc}")
                        continue
                    pending[request_id] = item
                if should_stop():
                    return
                if not pending:
                    if exhausted:
                        return
                    continue
                for output in engine.step():
                    if output.finished:
                        yield pending.pop(output.request_id).key, _caption_of(output)
        finally:
            if pending:  # stopped, or the caller stopped reading: nothing may linger in the engine
                try:
                    engine.abort_request(list(pending))
                except Exception:  # the engine itself failed: the error on its way out says why
                    log.debug("could not abort %d requests", len(pending), exc_info=True)
            feeder.close()

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            self._llm = None


def _caption_of(output: Any) -> Caption:
    completion = output.outputs[0]
    prompt_tokens = len(output.prompt_token_ids or [])
    if completion.finish_reason not in ("stop", "length"):
        message = f"request ended with finish reason {completion.finish_reason!r}"
        return Caption.failed(message, prompt_tokens)
    return Caption(
        text=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=prompt_tokens,
        output_tokens=len(completion.token_ids),
    )
