"""One captioning run: lock -> plan -> decode+resize (worker pool) -> engine -> parts -> merge.

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
from pathlib import Path

from caprl_cli.engines import load_engine
from caprl_cli.engines.base import Caption, Engine, EngineSpec, Sampling
from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.inputs import list_samples
from caprl_cli.merge import merge_output
from caprl_cli.model_profile import ModelProfile, load_processor, profile_from_processor
from caprl_cli.model_source import ModelSource, resolve_model
from caprl_cli.parts import PartWriter, new_run_id
from caprl_cli.plan import Plan, plan_run
from caprl_cli.preprocess import Failed, Outcome, Prepared, Preprocessor
from caprl_cli.progress import Progress
from caprl_cli.provenance import ModelFacts, RunCounts, build_provenance, summary_path_for, totals_of, utc_now
from caprl_cli.rows import Row, caption_row, error_kind_of, error_row
from caprl_cli.run_state import RunState, fingerprint_changes, fingerprint_of
from caprl_cli.settings import CaptionSettings
from caprl_cli.stopping import StopReason, Stopper
from caprl_cli.writers import write_json_atomically

log = logging.getLogger("caprl")


class EngineStartError(Exception):
    """The engine could not be started (bad weights, unsupported model, out of memory)."""


@dataclass(frozen=True)
class RunReport:
    """What the CLI tells the user when a run ends."""

    output: Path
    summary: Path
    run: RunCounts
    totals: dict
    plan: Plan
    elapsed_s: float
    images_per_s: float  # while captioning, model loading excluded
    stop_reason: StopReason | None

    @property
    def remaining(self) -> int:
        """Inputs still to caption: not reached because of --limit, or because the run was stopped."""
        return self.plan.remaining_after + len(self.plan.todo) - self.run.images


@dataclass(frozen=True)
class RunOutcome:
    """What the captioning part of a run did, and what its model told us."""

    counts: RunCounts
    images_per_s: float
    facts: ModelFacts


class RowSink:
    """Counts each finished row, shows progress, and hands the row to the part writer."""

    def __init__(self, parts: PartWriter, progress: Progress) -> None:
        self.parts = parts
        self.progress = progress
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


def result_row(item: Prepared, caption: Caption, model: str) -> Row:
    """The row of an image the engine handled: a caption, or an engine error."""
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
    return caption_row(
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


def check_fingerprint(state: RunState, settings: CaptionSettings) -> None:
    """Refuse to add captions made with other settings to an output; record them on a first run."""
    current = fingerprint_of(settings)
    stored = state.stored_fingerprint()
    if stored is None:
        if settings.output.exists():
            raise UsageError(
                f"{settings.output} exists but has no caprl state folder ({state.dir.name}); "
                "pass --overwrite to replace it"
            )
        state.create()
        state.write_fingerprint(current)
        return
    changed = fingerprint_changes(stored, current)
    if changed and not state.part_paths() and not settings.output.exists():
        # Nothing was ever committed under the old settings (a first run that failed early, say):
        # there are no captions to protect, so the new settings simply take over.
        state.write_fingerprint(current)
        return
    if changed:
        raise UsageError(
            f"{settings.output} was captioned with other settings ({', '.join(changed)} changed); "
            "run with the same settings to continue, or pass --overwrite to start over"
        )


def load_model(settings: CaptionSettings) -> tuple[ModelSource, ModelProfile]:
    """Find the model and read its grid and prompt; no engine yet."""
    source = resolve_model(settings.model, settings.revision)
    profile = profile_from_processor(
        load_processor(source.path), settings.prompt, settings.system_prompt, settings.min_pixels, settings.max_pixels
    )
    return source, profile


def caption_plan(settings: CaptionSettings, plan: Plan, parts: PartWriter, stopper: Stopper) -> RunOutcome:
    """Caption `plan.todo` into committed parts."""
    source, profile = load_model(settings)
    facts = ModelFacts(model_revision=source.revision, prompt_text=profile.prompt_text, grid_factor=profile.grid.factor)
    preprocessor = Preprocessor(profile.grid, settings.max_image_pixels, settings.workers)
    sink = RowSink(parts, Progress(0, enabled=False))
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
        log.info("captioning %d images with %s on %s", len(plan.todo), settings.model, engine.version)
        sink.progress = Progress(len(plan.todo), enabled=settings.progress)
        outcomes = preprocessor.prepare(plan.todo)
        images = images_only(outcomes, sink, settings.model, stopper.should_stop)
        try:
            for item, caption in engine.caption(images, stopper.should_stop):
                sink.add(result_row(item, caption, settings.model))
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


def finish(
    settings: CaptionSettings,
    state: RunState,
    run_id: str,
    started: tuple[str, float],
    plan: Plan,
    outcome: RunOutcome,
    stop_reason: StopReason | None,
) -> RunReport:
    """Merge the parts into the output, write the summary and the run record."""
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
    summary = summary_path_for(settings.output)
    if not state.output_is_current(index.parts):
        merge_output(state, index, settings.output_format, provenance)
        write_json_atomically(summary, provenance)
    if outcome.counts.images:
        state.record_run(run_id, {**provenance["run"], "facts": asdict(outcome.facts)})
    return RunReport(settings.output, summary, outcome.counts, totals, plan, elapsed, outcome.images_per_s, stop_reason)


def last_facts(state: RunState) -> ModelFacts:
    """What the last run's model told us, for provenance written without loading a model."""
    record = state.last_run() or {}
    return ModelFacts(**record.get("facts", {}))


def run_caption(settings: CaptionSettings) -> RunReport:
    """Caption what the output does not hold yet; the output is rebuilt atomically at the end."""
    started_at, started = utc_now(), time.monotonic()
    state = RunState(settings.output)
    new_state = not state.dir.exists()
    state.acquire(wait=settings.wait)
    stopper = Stopper(settings.max_runtime, started)
    stopper.install()
    try:
        if settings.overwrite:
            state.clear()
        state.remove_stale_temporaries()
        check_fingerprint(state, settings)
        samples = list_samples(list(settings.inputs))
        if not samples:
            log.warning("no images found in %s", ", ".join(settings.inputs))
        plan = plan_run(samples, state.committed(), settings.retry_errors, settings.limit)
        if plan.already_done:
            log.info("%d of %d images are already in %s", plan.already_done, plan.inputs, settings.output)
        run_id = new_run_id()
        outcome = RunOutcome(RunCounts(), 0.0, last_facts(state))
        if plan.todo:
            parts = PartWriter(state.parts_dir, run_id, flush_rows=settings.flush_every)
            try:
                outcome = caption_plan(settings, plan, parts, stopper)
            finally:
                parts.close()
        return finish(settings, state, run_id, (started_at, started), plan, outcome, stopper.reason)
    except UsageError:
        if new_state and not state.part_paths():  # refused before anything was committed: no trace
            shutil.rmtree(state.dir, ignore_errors=True)
        raise
    finally:
        stopper.restore()
        state.release()
