"""The job: what every executor needs to caption a run's samples, built once by the runner.

An executor is `run(job)`. Whatever it is (one engine in this process, engine worker processes, Ray
actors), it reads the same frozen `CaptionJob`: the engine to start (`EngineSpec`), how images are
read and prepared (`DecodeSettings`, timeout and byte cap included), the plan and its samples, the
sink that commits rows and the stopper that says when to drain. Nothing is passed by hand past this
point, so executors cannot disagree on a setting.

The engine side of a slot (`execute.host`) gets the picklable part of it, a `HostConfig`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from caprl_cli.engines.base import EngineSpec, Sampling, ServerSpec
from caprl_cli.engines.repetition import RepetitionRule
from caprl_cli.execute.progress import Progress
from caprl_cli.execute.stopping import Stopper
from caprl_cli.faults import pause_point
from caprl_cli.inputs.sample import Sample
from caprl_cli.model.profile import ModelProfile, load_processor, profile_from_processor
from caprl_cli.model.source import ModelSource, resolve_model
from caprl_cli.outputs.provenance import ModelFacts, RunCounts
from caprl_cli.outputs.rows import Row, all_output_tokens, error_kind_of
from caprl_cli.prepare.outcomes import DecodeSettings
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
    """The run's one committing sink: counts each finished row, shows progress, and hands the row to
    the part writer. Thread-safe: an engine may read its requests on a thread of its own, which adds
    the rows of failed images."""

    def __init__(self, parts: PartWriter, plan: Plan) -> None:
        self.parts = parts
        self.progress = Progress(0, enabled=False)
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


@dataclass(frozen=True)
class HostConfig:
    """What the engine side of one slot needs, wherever it runs: the engine (weights already resolved
    by the driver), the decode pool's settings and size, and the slot's index (for test hooks)."""

    index: int
    engine: str  # the engine's name (`--engine`)
    model: str  # the model id written into rows
    revision: str | None  # to fetch the weights again on a node that lacks the driver's folder
    spec: EngineSpec
    decode: DecodeSettings
    decode_workers: int


@dataclass(frozen=True)
class CaptionJob:
    """One run's captioning, as every executor sees it (see the module doc)."""

    settings: CaptionSettings
    spec: EngineSpec
    decode: DecodeSettings
    facts: ModelFacts  # what the model's files told us; the engine's version is added once one is ready
    plan: Plan
    samples: Iterator[Sample]
    sink: RowSink
    stopper: Stopper

    @property
    def keep_images(self) -> bool:
        """Rows carry the original image bytes (WebDataset shards that hold the images)."""
        return self.decode.keep_bytes

    @property
    def model(self) -> str:
        return self.settings.model

    def host_config(self, index: int, decode_workers: int) -> HostConfig:
        settings = self.settings
        return HostConfig(index, settings.engine, settings.model, settings.revision, self.spec, self.decode, decode_workers)

    def begin_captioning(self, version: str, where: str = "") -> None:
        """The first engine is ready: rows are about to exist, so a signal now drains the run."""
        self.stopper.begin_captioning()
        total = expected_images(self.plan)
        log.info("captioning %s images with %s on %s%s", total or "the", self.model, version, where)
        self.sink.progress = Progress(total, enabled=self.settings.progress)

    def outcome(self, version: str | None, prompt_sent: dict[str, Any] | None = None) -> RunOutcome:
        """The run's outcome so far, with what the engine said of itself."""
        facts = replace(self.facts, engine_version=version or self.facts.engine_version)
        if prompt_sent is not None:
            facts = replace(facts, prompt_sent=prompt_sent)
        return RunOutcome(self.sink.counts, self.sink.progress.rate(), facts)


def build_job(
    settings: CaptionSettings, plan: Plan, samples: Iterator[Sample], parts: PartWriter, stopper: Stopper, keep_images: bool
) -> CaptionJob:
    """Find the model, read its grid and prompt (no engine yet), and build the run's job."""
    pause_point("model.before_load")
    log.debug("loading model %s with the %s engine", settings.model, settings.engine)
    source, profile = load_model(settings)  # weights resolved (and downloaded) once, here
    facts = ModelFacts(model_revision=source.revision, prompt_text=profile.prompt_text, grid_factor=profile.grid.factor)
    decode = DecodeSettings(
        grid=profile.grid,
        max_image_pixels=settings.max_image_pixels,
        keep_bytes=keep_images,
        storage_options=settings.storage_options,
        retries=settings.retries,
        max_image_bytes=settings.max_image_bytes,
        decode_timeout=settings.decode_timeout,
    )
    sink = RowSink(parts, plan)
    return CaptionJob(settings, engine_spec(settings, source, profile), decode, facts, plan, samples, sink, stopper)


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


def load_model(settings: CaptionSettings) -> tuple[ModelSource, ModelProfile]:
    """Find the model and read its grid and prompt; no engine yet."""
    # An HTTP engine's server holds the weights: only the processor's files are needed here.
    source = resolve_model(settings.processor or settings.model, settings.revision, weights=settings.engine != "openai")
    profile = profile_from_processor(
        load_processor(source.path), settings.prompt, settings.system_prompt, settings.min_pixels, settings.max_pixels
    )
    return source, profile


def expected_images(plan: Plan) -> int | None:
    """How many images this run will caption, if known before shards and manifests are read."""
    if plan.shards or plan.manifests:
        return None
    todo = len(plan.listed.todo)
    return todo if plan.limit is None else min(todo, plan.limit)
