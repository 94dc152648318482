"""Hugging Face transformers: batched `generate` for machines without vLLM.

Batched sampling in `generate` draws from one global random stream, so a caption would depend on its
batch. Instead a logits processor samples each row with its own generator, seeded from the run seed
and the image key, and hands `generate` a one-hot choice to take greedily: the same image gets the same
caption whatever it is batched with. With `num_captions` N > 1 each image is N rows of the batch, row i
seeded from (seed, key, i). A stopping criterion watches every row's tokens and ends a row whose tail
loops (see `repetition`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from caprl_cli.engines.base import Caption, Engine, EngineSpec, ImageRequest, combine_captions, finish_reason_of
from caprl_cli.engines.repetition import RepetitionRule, RepetitionTracker
from caprl_cli.engines.seeding import request_seed

DEFAULT_BATCH_SIZE = 8

log = logging.getLogger("caprl")


def seeded_sampler(seeds: list[int], temperature: float, top_p: float) -> Any:
    """A LogitsProcessor that samples every row from its own seeded generator (see module doc)."""
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            if top_p < 1.0:
                probs = _top_p_filter(torch, probs, top_p)
            probs = probs.cpu()
            choices = torch.stack(
                [torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(self.generators)]
            ).to(scores.device)
            forced = torch.full_like(scores, float("-inf"))
            return forced.scatter_(1, choices, 0.0)

    return SeededSampler()


def loop_stopper(rule: RepetitionRule, batch_size: int, eos_ids: set[int]) -> Any:
    """A StoppingCriteria that ends each row of the batch whose tail loops; `looped_at[row]` is then
    the number of tokens the row had when it was stopped (None for rows that did not loop)."""
    import torch
    from transformers import StoppingCriteria

    class LoopStopper(StoppingCriteria):
        def __init__(self) -> None:
            self.trackers = [RepetitionTracker(rule) for _ in range(batch_size)]
            self.ended = [False] * batch_size  # the row ended (eos or loop): later tokens are padding
            self.looped_at: list[int | None] = [None] * batch_size

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.ended[row]:
                    continue
                if token in eos_ids:
                    self.ended[row] = True
                elif self.trackers[row].push(token):
                    self.ended[row] = True
                    self.looped_at[row] = len(self.trackers[row].tokens)
            looped = [at is not None for at in self.looped_at]
            return torch.tensor(looped, dtype=torch.bool, device=input_ids.device)

    return LoopStopper()


def _device_of(torch: Any, model: Any) -> str:
    """Where the weights really are, e.g. `cuda:0 (NVIDIA H200)` or `cpu`: what -v shows, so a run
    that was meant for a GPU and fell back to the CPU is plain to see."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _top_p_filter(torch: Any, probs: Any, top_p: float) -> Any:
    """Keep the smallest set of tokens whose probability reaches top_p, renormalised."""
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    drop_sorted = (cumulative - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop_sorted, 0.0)
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


class TransformersEngine(Engine):
    """CapRL captioning with `AutoModelForImageTextToText.generate`."""

    name = "transformers"

    def __init__(self, spec: EngineSpec) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # caprl shows its own progress

        self.spec = spec
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.batch_size = spec.batch_size or DEFAULT_BATCH_SIZE
        self.max_in_flight = self.batch_size
        self.processor = AutoProcessor.from_pretrained(spec.model_path)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            spec.model_path, dtype=self._torch_dtype(torch, spec.dtype)
        ).to(self.device)
        self.model.eval()
        log.debug("transformers engine on %s", _device_of(torch, self.model))
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(token) for token in eos_ids if token is not None}
        self.pad_id = self.processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos_ids))

    def _torch_dtype(self, torch: Any, dtype: str) -> Any:
        if dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return getattr(torch, dtype)

    @property
    def version(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}"

    def caption(
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        count = self.spec.sampling.num_captions
        # Each image is `count` samples (image, index); a batch holds `batch_size` samples, and an
        # image is yielded once all its samples are done (they may span two batches).
        samples = ((item, index) for item in items for index in range(count))
        done: dict[str, list[Caption]] = {}
        while not should_stop() and (batch := list(islice(samples, self.batch_size))):
            for (item, _), caption in self._caption_batch(batch, should_stop):
                captions = done.setdefault(item.key, [])
                captions.append(caption)
                if len(captions) == count:
                    yield item.key, combine_captions(done.pop(item.key))

    def _caption_batch(
        self, batch: list[tuple[ImageRequest, int]], should_stop: Callable[[], bool]
    ) -> Iterator[tuple[tuple[ImageRequest, int], Caption]]:
        try:
            captions = self._generate(batch, should_stop)
        except Exception as exc:
            if len(batch) > 1:  # find the one request that fails, caption the rest
                for sample in batch:
                    yield from self._caption_batch([sample], should_stop)
                return
            captions = [Caption.failed(f"{type(exc).__name__}: {exc}")]
        if should_stop():
            return  # generation was cut short: these captions are incomplete
        yield from zip(batch, captions, strict=True)

    def _generate(self, batch: list[tuple[ImageRequest, int]], should_stop: Callable[[], bool]) -> list[Caption]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        class StopRequested(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

        spec = self.spec
        inputs = self.processor(
            text=[spec.prompt_text] * len(batch),
            images=[item.image for item, _ in batch],
            **spec.processor_image_kwargs(),
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        sampling = spec.sampling
        processors = LogitsProcessorList()
        if sampling.temperature > 0:
            seeds = [request_seed(sampling.seed, item.key, index) for item, index in batch]
            processors.append(seeded_sampler(seeds, sampling.temperature, sampling.top_p))
        stoppers: list[Any] = [StopRequested()]
        loops = loop_stopper(spec.repetition, len(batch), self.eos_ids) if spec.repetition else None
        if loops is not None:
            stoppers.append(loops)
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs,
                max_new_tokens=sampling.max_tokens,
                do_sample=False,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList(stoppers),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1]:].tolist()
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        looped_at = loops.looped_at if loops is not None else [None] * len(batch)
        return [
            self._caption_of(tokens, int(length), looped)
            for tokens, length, looped in zip(new_tokens, prompt_lengths, looped_at, strict=True)
        ]

    def _caption_of(self, tokens: list[int], prompt_tokens: int, looped_at: int | None = None) -> Caption:
        """The caption in a row of `generate`'s output: up to its eos, or up to where it was stopped
        for looping (what follows is padding), or all of it when max_tokens cut it off."""
        if looped_at is not None:
            tokens = tokens[:looped_at]
        stop_at = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens if stop_at is None else tokens[: stop_at + 1]
        text = self.processor.tokenizer.decode(
            kept if stop_at is None else kept[:-1], skip_special_tokens=True
        )
        return Caption(
            text=text,
            finish_reason=finish_reason_of(stop_at is not None, looping=looped_at is not None),
            prompt_tokens=prompt_tokens,
            output_tokens=len(kept),
        )

    def close(self) -> None:
        self.model = None
