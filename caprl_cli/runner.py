"""One captioning run: lock -> plan -> decode+resize (worker pool) -> engine -> parts -> publish.

The runner wires the stages together and owns the bookkeeping (lock, fingerprint, counts, progress,
provenance); each stage lives in its own module behind a small interface, so the same loop can later
run inside one worker process per GPU.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

from caprl_cli.engines import load_engine
from caprl_cli.engines.base import Caption, Engine, EngineSpec, Sampling
from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.inputs.sample import Sample
from caprl_cli.model.profile import ModelProfile, load_processor, profile_from_processor
from caprl_cli.model.source import ModelSource, resolve_model
from caprl_cli.outputs.targets import OutputOptions, OutputTarget, open_target
from caprl_cli.state.parts import PartWriter, new_run_id
from caprl_cli.state.plan import Plan, peek, plan_run
from caprl_cli.inputs.prefetch import Prefetcher
from caprl_cli.prepare.pool import Failed, Outcome, Prepared, Preprocessor
from caprl_cli.execute.progress import Progress
from caprl_cli.outputs.provenance import ModelFacts, RunCounts, build_provenance, totals_of, utc_now
from caprl_cli.outputs.rows import PART_SCHEMA_WITH_IMAGES, SCHEMA, Row, caption_row, error_kind_of, error_row
from caprl_cli.state.folder import RunState, fingerprint_changes, fingerprint_of
from caprl_cli.settings import CaptionSettings
from caprl_cli.inputs.resolve import InputOptions, InputSet, resolve_inputs
from caprl_cli.execute.stopping import Stopper, StopReason
from caprl_cli.storage import is_url

log = logging.getLogger("caprl")


class EngineStartError(Exception):
    """The engine could not be started (bad weights, unsupported model, out of memory)."""


@dataclass(frozen=True)
class RunReport:
    """What the CLI tells the user when a run ends."""

    output: str
    summary: str
    run: RunCounts
    totals: dict
    plan: Plan
    elapsed_s: float
    images_per_s: float  # while captioning, model loading excluded
    stop_reason: StopReason | None



@dataclass(frozen=True)
class RunOutcome:
    """What the captioning part of a run did, and what its model told us."""

    counts: RunCounts
    images_per_s: float
    facts: ModelFacts


class RowSink:
    """Counts each finished row, shows progress, and hands the row to the part writer."""

    def __init__(self, parts: PartWriter, progress: Progress, plan: Plan) -> None:
        self.parts = parts
        self.progress = progress
        self.plan = plan
        self.counts = RunCounts()

    def add(self, row: Row) -> None:
        kind = error_kind_of(row)
        if kind is None:
            self.counts.ok += 1
            self.counts.output_tokens += row["output_tokens"] or 0
        else:
            self.counts.errors_by_kind[kind] += 1
        self.progress.update(tokens=row["output_tokens"] or 0, error=kind is not None)
        self.parts.add(row)
        self.plan.row_done(row)


def failed_row(failed: Failed, model: str) -> Row:
    """The error row of an image that never reached the engine."""
    sample = failed.sample
    return error_row(
        key=sample.key,
        source=sample.source,
        model=model,
        kind=failed.kind,
        message=failed.message,
        width=failed.width,
        height=failed.height,
        meta=sample.meta,
    )


def result_row(item: Prepared, caption: Caption, model: str, keep_image: bool = False) -> Row:
    """The row of an image the engine handled: a caption, or an engine error. With `keep_image`, a
    captioned row also carries the original bytes, for WebDataset shards that hold the images."""
    sample = item.sample
    if caption.error is not None:
        return error_row(
            key=sample.key,
            source=sample.source,
            model=model,
            kind=ErrorKind.ENGINE,
            message=caption.error,
            width=item.width,
            height=item.height,
            meta=sample.meta,
        )
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
    )
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
        ),
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len or profile.context_length(settings.max_tokens),
        gpu_memory_utilization=settings.gpu_memory_utilization,
        batch_size=settings.batch_size,
    )


def start_engine(settings: CaptionSettings, spec: EngineSpec) -> Engine:
    """Load the engine, turning any failure into one clear `EngineStartError`."""
    try:
        return load_engine(settings.engine, spec)
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


def check_fingerprint(state: RunState, settings: CaptionSettings, target: OutputTarget) -> None:
    """Refuse to add captions made with other settings to an output; record them on a first run."""
    current = fingerprint_of(settings)
    stored = state.stored_fingerprint()
    if stored is None:
        if target.exists():
            raise UsageError(
                f"{target.label} exists but has no caprl state folder ({state.dir}); pass --overwrite to replace it"
            )
        state.create()
        state.write_fingerprint(current)
        return
    changed = fingerprint_changes(stored, current)
    if changed and not state.part_paths() and not target.exists():
        # Nothing was ever committed under the old settings (a first run that failed early, say):
        # there are no captions to protect, so the new settings simply take over.
        state.write_fingerprint(current)
        return
    if changed:
        raise UsageError(
            f"{target.label} was captioned with other settings ({', '.join(changed)} changed); "
            "run with the same settings to continue, or pass --overwrite to start over"
        )


def load_model(settings: CaptionSettings) -> tuple[ModelSource, ModelProfile]:
    """Find the model and read its grid and prompt; no engine yet."""
    source = resolve_model(settings.model, settings.revision)
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
    source, profile = load_model(settings)
    facts = ModelFacts(model_revision=source.revision, prompt_text=profile.prompt_text, grid_factor=profile.grid.factor)
    preprocessor = Preprocessor(
        profile.grid,
        settings.max_image_pixels,
        settings.workers,
        keep_bytes=keep_images,
        storage_options=settings.storage_options,
    )
    sink = RowSink(parts, Progress(0, enabled=False), plan)
    engine: Engine | None = None
    try:
        try:
            engine = start_engine(settings, engine_spec(settings, source, profile))
        except EngineStartError:
            if stopper.reason is None:
                raise
            return RunOutcome(sink.counts, 0.0, facts)  # a signal during loading took the engine down
        facts = ModelFacts(engine.version, source.revision, profile.prompt_text, profile.grid.factor)
        if stopper.should_stop():
            return RunOutcome(sink.counts, 0.0, facts)
        total = expected_images(plan)
        log.info("captioning %s images with %s on %s", total or "the", settings.model, engine.version)
        sink.progress = Progress(total, enabled=settings.progress)
        outcomes = preprocessor.prepare(samples)
        images = images_only(outcomes, sink, settings.model, stopper.should_stop)
        try:
            for item, caption in engine.caption(images, stopper.should_stop):
                sink.add(result_row(item, caption, settings.model, keep_images))
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


def finish(
    settings: CaptionSettings,
    state: RunState,
    target: OutputTarget,
    run_id: str,
    started: tuple[str, float],
    plan: Plan,
    outcome: RunOutcome,
    stop_reason: StopReason | None,
) -> RunReport:
    """Publish the parts to the target, write the summary and the run record."""
    started_at, started_clock = started
    index = state.committed()
    errors_by_kind = index.error_counts()
    totals = totals_of(index.size - sum(errors_by_kind.values()), errors_by_kind)
    elapsed = time.monotonic() - started_clock
    provenance = build_provenance(
        settings,
        facts=outcome.facts,
        started_at=started_at,
        elapsed_s=elapsed,
        images_per_s=outcome.images_per_s,
        run=outcome.counts,
        totals=totals,
        stop_reason=stop_reason.value if stop_reason else None,
    )
    if not state.output_is_current(index.parts, target.exists()):
        target.publish(state, index, provenance)
        target.write_summary(state, provenance)
    if outcome.counts.images:
        state.record_run(run_id, {**provenance["run"], "facts": asdict(outcome.facts)})
    summary = target.summary_location()
    return RunReport(target.label, summary, outcome.counts, totals, plan, elapsed, outcome.images_per_s, stop_reason)


def last_facts(state: RunState) -> ModelFacts:
    """What the last run's model told us, for provenance written without loading a model."""
    record = state.last_run() or {}
    return ModelFacts(**record.get("facts", {}))


def output_target(settings: CaptionSettings) -> OutputTarget:
    """The target the settings name."""
    return open_target(
        settings.output_location,
        list(settings.inputs),
        OutputOptions(
            output_format=settings.output_format,
            shard_size=settings.shard_size,
            with_images=settings.images,
            state_dir=settings.state_dir,
            storage_options=settings.storage_options,
            overwrite=settings.overwrite,
        ),
    )


def input_options(settings: CaptionSettings, target: OutputTarget) -> InputOptions:
    """How the settings say inputs are read."""
    return InputOptions(
        is_output=target.is_own_file,
        storage_options=settings.storage_options,
        files_from=settings.files_from,
        image_column=settings.image_column,
        image_root=settings.image_root,
        keep_meta=settings.keep_meta,
    )


def check_sidecar_inputs(settings: CaptionSettings, inputs: InputSet) -> None:
    """Sidecar captions go beside local image files; shards and URLs have no such place."""
    if settings.output_format != "sidecar":
        return
    if inputs.shards or any(sample.path is None or is_url(sample.path) for sample in inputs.listed):
        raise UsageError("--format sidecar writes .txt files beside local images; shards and URLs have none")


def run_caption(settings: CaptionSettings) -> RunReport:
    """Caption what the output does not hold yet; the output is published atomically at the end."""
    started_at, started = utc_now(), time.monotonic()
    target = output_target(settings)
    state = RunState(target.local_file, state_dir=target.state_dir, label=target.label)
    new_state = not state.dir.exists()
    state.acquire(wait=settings.wait)
    stopper = Stopper(settings.max_runtime, started)
    stopper.install()
    try:
        if settings.overwrite:
            state.clear()
            target.clear()
        state.remove_stale_temporaries()
        target.remove_stale_temporaries()
        check_fingerprint(state, settings, target)
        options = input_options(settings, target)
        inputs = resolve_inputs(list(settings.inputs), options)
        check_sidecar_inputs(settings, inputs)
        if not inputs.listed and not inputs.streams:
            log.warning("no images found in %s", ", ".join(settings.inputs))
        plan = plan_run(
            inputs,
            state.committed(),
            retry_errors=settings.retry_errors,
            limit=settings.limit,
            finished_shards=state.finished_shards(),
            options=options,
        )
        run_id = new_run_id()
        outcome = RunOutcome(RunCounts(), 0.0, last_facts(state))
        reader = Prefetcher(plan.samples())
        try:
            first, samples = peek(reader)
            if plan.already_done and not plan.shards and not plan.manifests:
                log.info("%d images are already in %s", plan.already_done, target.label)
            if first is not None:
                schema = PART_SCHEMA_WITH_IMAGES if target.keeps_images else SCHEMA
                parts = PartWriter(state.parts_dir, run_id, flush_rows=settings.flush_every, schema=schema)
                try:
                    outcome = caption_plan(settings, plan, samples, parts, stopper, target.keeps_images)
                finally:
                    parts.close()
        finally:
            reader.close()
        state.record_finished_shards(run_id, plan.completed_shards())
        return finish(settings, state, target, run_id, (started_at, started), plan, outcome, stopper.reason)
    except UsageError:
        if new_state and not state.part_paths():  # refused before anything was committed: no trace
            shutil.rmtree(state.dir, ignore_errors=True)
        raise
    finally:
        stopper.restore()
        state.release()
