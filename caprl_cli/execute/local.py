"""The captioning loop of one engine in this process: samples in, committed rows out.

This is the executor seam: the runner plans and publishes, an executor turns the plan's samples into
rows through decode workers and an engine, and hands each row to a `RowSink` that counts it, shows
progress and commits it as part of a part file. Rows are keyed, and engines see only keys and pixels.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from caprl_cli.engines import load_engine
from caprl_cli.engines.base import Caption, Engine, EngineSpec, ImageRequest, Sampling, ServerSpec
from caprl_cli.errors import CaprlError, EngineStartError, ErrorKind
from caprl_cli.execute.progress import Progress
from caprl_cli.execute.stopping import Stopper
from caprl_cli.faults import pause_point
from caprl_cli.inputs.sample import Sample
from caprl_cli.model.profile import ModelProfile, load_processor, profile_from_processor
from caprl_cli.model.source import ModelSource, resolve_model
from caprl_cli.outputs.provenance import ModelFacts, RunCounts
from caprl_cli.engines.repetition import RepetitionRule
from caprl_cli.outputs.rows import SIGNATURE, Row, all_output_tokens, caption_row, error_kind_of, error_row
from caprl_cli.prepare.pool import Failed, Outcome, Prepared, Preprocessor
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.parts import PartWriter
from caprl_cli.state.plan import Plan

log = logging.getLogger("caprl")


@dataclass(frozen=True)
class RunOutcome:
    """What the captioning part of a run did, and what its model told us."""

    counts: RunCounts
    images_per_s: float
    facts: ModelFacts


class RowSink:
    """Counts each finished row, shows progress, and hands the row to the part writer. Thread-safe:
    an engine may read its requests on a thread of its own, which adds the rows of failed images."""

    def __init__(self, parts: PartWriter, progress: Progress, plan: Plan) -> None:
        self.parts = parts
        self.progress = progress
        self.plan = plan
        self.counts = RunCounts()
        self._lock = threading.Lock()

    def add(self, row: Row) -> None:
        with self._lock:
            self._add(row)

    def _add(self, row: Row) -> None:
        kind = error_kind_of(row)
        if kind is None:
            self.counts.ok += 1
            self.counts.output_tokens += all_output_tokens(row)
        else:
            self.counts.errors_by_kind[kind] += 1
        self.progress.update(tokens=all_output_tokens(row), error=kind is not None)
        self.parts.add(row)
        self.plan.row_done(row)
        if self.counts.images == 1:
            pause_point("rows.first")


def failed_row(failed: Failed, model: str) -> Row:
    """The error row of an image that never reached the engine (with its signature, for the state)."""
    sample = failed.sample
    row = error_row(
        key=sample.key,
        source=sample.source,
        model=model,
        kind=failed.kind,
        message=failed.message,
        width=failed.width,
        height=failed.height,
        meta=sample.meta,
    )
    row[SIGNATURE] = sample.signature
    return row


def result_row(item: Prepared, caption: Caption, model: str, keep_image: bool = False) -> Row:
    """The row of an image the engine handled: a caption, or an engine error, with the image's signature
    for the state. With `keep_image`, a captioned row also carries the original bytes, for WebDataset
    shards that hold the images."""
    sample = item.sample
    if caption.error is not None:
        kind = ErrorKind.UNAVAILABLE if caption.transient else ErrorKind.ENGINE
        return failed_row(Failed(sample, kind, caption.error, item.width, item.height), model)
    row = caption_row(
        key=sample.key,
        source=sample.source,
        model=model,
        caption=caption.text or "",
        finish_reason=caption.finish_reason,
        prompt_tokens=caption.prompt_tokens,
        output_tokens=caption.output_tokens,
        width=item.width,
        height=item.height,
        meta=sample.meta,
        more=[(more.text or "", more.finish_reason, more.output_tokens) for more in caption.extra],
    )
    row[SIGNATURE] = sample.signature
    if keep_image:
        row["image"], row["image_ext"] = sample.data, sample.ext
    return row


def engine_spec(settings: CaptionSettings, source: ModelSource, profile: ModelProfile) -> EngineSpec:
    """Engine settings; the context length is sized to one image and one caption unless given."""
    return EngineSpec(
        model_path=source.path,
        prompt_text=profile.prompt_text,
        sampling=Sampling(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            num_captions=settings.num_captions,
        ),
        min_pixels=profile.grid.min_pixels,
        max_pixels=profile.grid.max_pixels,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len or profile.context_length(settings.max_tokens),
        gpu_memory_utilization=settings.gpu_memory_utilization,
        batch_size=settings.batch_size,
        tensor_parallel_size=settings.tensor_parallel_size,
        repetition=RepetitionRule(min_repeats=settings.max_repeats) if settings.max_repeats else None,
        image_kwargs=profile.image_kwargs,
        server=server_spec(settings),
    )


def server_spec(settings: CaptionSettings) -> ServerSpec | None:
    """The server an HTTP engine captions through; None for the engines that load the model here."""
    if settings.engine != "openai" or settings.base_url is None:
        return None
    return ServerSpec(
        base_url=settings.base_url,
        model=settings.model,
        api_key_env=settings.api_key_env,
        concurrency=settings.concurrency,
        retries=settings.retries,
        prompt=settings.prompt,
        system_prompt=settings.system_prompt,
    )


def start_engine(settings: CaptionSettings, spec: EngineSpec) -> Engine:
    """Load the engine, turning any failure into one clear `EngineStartError`."""
    try:
        return load_engine(settings.engine, spec)
    except CaprlError:  # already one clear line (the openai engine's server checks)
        raise
    except ImportError as exc:
        hint = ' (install it with: pip install "caprl-cli[vllm]")' if settings.engine == "vllm" else ""
        raise EngineStartError(f"cannot import the {settings.engine} engine: {exc}{hint}") from exc
    except Exception as exc:
        raise EngineStartError(f"cannot start the {settings.engine} engine: {type(exc).__name__}: {exc}") from exc


def images_only(
    outcomes: Iterable[Outcome], sink: RowSink, model: str, should_stop: Callable[[], bool]
) -> Iterator[Prepared]:
    """Pass prepared images on to the engine and failed ones straight to the sink; stop when asked."""
    for outcome in outcomes:
        if should_stop():
            return
        if isinstance(outcome, Failed):
            sink.add(failed_row(outcome, model))
        else:
            yield outcome


def image_requests(images: Iterable[Prepared], waiting: dict[str, Prepared]) -> Iterator[ImageRequest]:
    """The engine's requests for `images`; each stays in `waiting` by key until its caption returns."""
    for item in images:
        waiting[item.sample.key] = item
        yield ImageRequest(item.sample.key, item.image, lossy_source=is_jpeg_name(item.sample.ext))


def is_jpeg_name(ext: str | None) -> bool:
    """Whether an image's extension says JPEG (the one lossy format an image is re-encoded as)."""
    return (ext or "").lower().lstrip(".") in ("jpg", "jpeg", "jpe", "jfif")


def load_model(settings: CaptionSettings) -> tuple[ModelSource, ModelProfile]:
    """Find the model and read its grid and prompt; no engine yet."""
    # An HTTP engine's server holds the weights: only the processor's files are needed here.
    source = resolve_model(settings.processor or settings.model, settings.revision, weights=settings.engine != "openai")
    profile = profile_from_processor(
        load_processor(source.path), settings.prompt, settings.system_prompt, settings.min_pixels, settings.max_pixels
    )
    return source, profile


def caption_plan(
    settings: CaptionSettings,
    plan: Plan,
    samples: Iterator[Sample],
    parts: PartWriter,
    stopper: Stopper,
    keep_images: bool = False,
) -> RunOutcome:
    """Caption `samples` (the plan's work) into committed parts."""
    pause_point("model.before_load")
    log.debug("loading model %s with the %s engine", settings.model, settings.engine)
    source, profile = load_model(settings)
    facts = ModelFacts(model_revision=source.revision, prompt_text=profile.prompt_text, grid_factor=profile.grid.factor)
    preprocessor = Preprocessor(
        profile.grid,
        settings.max_image_pixels,
        settings.workers,
        keep_bytes=keep_images,
        storage_options=settings.storage_options,
        retries=settings.retries,
        decode_timeout=settings.decode_timeout,
        max_image_bytes=settings.max_image_bytes,
    )
    sink = RowSink(parts, Progress(0, enabled=False), plan)
    engine: Engine | None = None
    try:
        try:
            pause_point("model.loading")
            engine = start_engine(settings, engine_spec(settings, source, profile))
        except EngineStartError:
            if stopper.reason is None:
                raise
            return RunOutcome(sink.counts, 0.0, facts)  # a signal during loading took the engine down
        facts = ModelFacts(
            engine.version,
            source.revision,
            profile.prompt_text,
            profile.grid.factor,
            prompt_sent=getattr(engine, "prompt_sent", None),
        )
        pause_point("model.loaded")
        if stopper.should_stop():
            return RunOutcome(sink.counts, 0.0, facts)
        stopper.begin_captioning()  # rows are about to exist: a first signal now drains the run
        total = expected_images(plan)
        log.info("captioning %s images with %s on %s", total or "the", settings.model, engine.version)
        sink.progress = Progress(total, enabled=settings.progress)
        outcomes = preprocessor.prepare(samples, stopper.should_stop)
        waiting: dict[str, Prepared] = {}
        requests = image_requests(images_only(outcomes, sink, settings.model, stopper.should_stop), waiting)
        try:
            for key, caption in engine.caption(requests, stopper.should_stop):
                sink.add(result_row(waiting.pop(key), caption, settings.model, keep_images))
        except Exception:
            if stopper.reason is None:
                raise
            log.debug("engine stopped with an error after %s", stopper.reason.value, exc_info=True)
        return RunOutcome(sink.counts, sink.progress.rate(), facts)
    finally:
        sink.progress.close()
        preprocessor.close()
        if engine is not None:
            engine.close()


def expected_images(plan: Plan) -> int | None:
    """How many images this run will caption, if known before shards and manifests are read."""
    if plan.shards or plan.manifests:
        return None
    todo = len(plan.listed.todo)
    return todo if plan.limit is None else min(todo, plan.limit)
