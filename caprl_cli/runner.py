"""One captioning run: lock -> plan -> decode+resize (worker pool) -> engine -> parts -> publish.

The runner wires the stages together and owns the bookkeeping (lock, fingerprint, plan, publishing,
provenance); the captioning itself is an executor's job (`execute/`), so the same run can drive one
engine here or several in worker processes.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from caprl_cli.errors import CaprlError, UsageError
from caprl_cli.execute.devices import EnginePlacement, engine_placements
from caprl_cli.execute.job import RunOutcome, build_job
from caprl_cli.execute.local import LocalExecutor
from caprl_cli.execute.stopping import StopNow, Stopper, StopReason
from caprl_cli.inputs.prefetch import Prefetcher
from caprl_cli.inputs.resolve import InputOptions, InputSet, resolve_inputs
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions, OutputTarget
from caprl_cli.outputs.provenance import ModelFacts, RunCounts, build_provenance, totals_of, utc_now
from caprl_cli.outputs.rows import PART_SCHEMA, PART_SCHEMA_WITH_IMAGES, withdrawal_row
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.fingerprint import fingerprint_changes, fingerprint_of, unrecorded
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import PartWriter, new_run_id
from caprl_cli.state.plan import Plan, peek, plan_run
from caprl_cli.state.shares import Share
from caprl_cli.storage import is_url

log = logging.getLogger("caprl")


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


def check_fingerprint(state: RunState, settings: CaptionSettings, target: OutputTarget) -> dict | None:
    """Refuse to add captions made with other settings to an output. Returns the fingerprint to record
    once every other check has passed (a first run, or settings an older state never recorded), else None:
    a refused run changes nothing."""
    current = fingerprint_of(settings)
    stored = state.stored_fingerprint()
    if stored is None:
        if target.exists():
            raise UsageError(
                f"{target.label} exists but has no caprl state folder ({state.dir}); pass --overwrite to replace it"
            )
        return current
    changed = fingerprint_changes(stored, current)
    if changed and not state.part_paths() and not target.exists():
        # Nothing was ever committed under the old settings (a first run that failed early, say):
        # there are no captions to protect, so the new settings simply take over.
        return current
    if changed:
        raise UsageError(
            f"{target.label} was captioned with other settings ({', '.join(changed)} changed); "
            "run with the same settings to continue, or pass --overwrite to start over"
        )
    if unrecorded(stored, current):  # written by a caprl that did not record them yet: record them now
        return {**current, **stored}
    return None


def start_over(state: RunState, settings: CaptionSettings) -> None:
    """--overwrite, once every check has passed: forget the state in one swap. The published output is
    left in place for this run's publish to replace atomically (WebDataset: shards numbered past what
    the new state records are removed then), so a kill at any instant leaves the old output or the new."""
    state.start_over(fingerprint_of(settings))


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
            replace_sidecars=settings.replace_sidecars,
            rows_per_file=settings.rows_per_file,
            share=None if settings.num_shards is None else (settings.shard_index, settings.num_shards),
            num_captions=settings.num_captions,
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


def commit_withdrawals(state: RunState, run_id: str, plan: Plan, model: str, keeps_images: bool) -> None:
    """Withdraw the placeholder rows (`<shard>@0`, `<manifest>@<line>`) of streams this run read to
    the end, in a part of their own: after the run's rows, and before the shards are recorded
    finished, so a crash in between only means the stream is read again."""
    if not plan.withdrawn:
        return
    schema = PART_SCHEMA_WITH_IMAGES if keeps_images else PART_SCHEMA
    parts = PartWriter(state.parts_dir, f"{run_id}-withdrawn", schema=schema)
    try:
        for key, source in plan.withdrawn:
            parts.add(withdrawal_row(key=key, source=source, model=model))
    finally:
        parts.close()


def run_engines(
    settings: CaptionSettings,
    placements: list[EnginePlacement],
    plan: Plan,
    samples: Iterator[Sample],
    parts: PartWriter,
    stopper: Stopper,
    keep_images: bool,
) -> RunOutcome:
    """Build the run's job once and hand it to the executor the settings choose: the engines of this
    machine, or of a Ray cluster."""
    job = build_job(settings, plan, samples, parts, stopper, keep_images)
    if settings.executor == "ray":
        from caprl_cli.execute.ray_transport import RayExecutor

        return RayExecutor().run(job)
    return LocalExecutor(placements).run(job)


def run_caption(settings: CaptionSettings, started: float | None = None) -> RunReport:
    """Caption what the output does not hold yet; the output is published atomically at the end.
    `started` (a time.monotonic() reading) is when the command started: --max-runtime counts from it."""
    started_at, started = utc_now(), time.monotonic() if started is None else started
    # From here on a signal, or the deadline, ends the run at once until captioning starts (StopNow).
    stopper = Stopper(settings.max_runtime, started)
    stopper.install()
    state: RunState | None = None
    new_state = held = False
    try:
        target = output_target(settings)
        state = RunState(target.local_file, state_dir=target.state_dir, label=target.label)
        target.check_place(state)
        new_state = not state.dir.exists()
        state.acquire(wait=settings.wait)
        held = True
        state.remove_stale_temporaries()
        target.remove_stale_temporaries()
        to_record = None if settings.overwrite else check_fingerprint(state, settings, target)
        options = input_options(settings, target)
        inputs = resolve_inputs(list(settings.inputs), options)
        check_sidecar_inputs(settings, inputs)
        placements = engine_placements(settings) if settings.executor == "local" else []  # Ray places its own
        # Every check has passed: only now does the state change.
        if settings.overwrite:
            start_over(state, settings)
        elif to_record is not None:
            state.create()
            state.write_fingerprint(to_record)
        if not inputs.listed and not inputs.streams:
            log.warning("no images found in %s", ", ".join(settings.inputs))
        plan = plan_run(
            inputs,
            state.committed(),
            retry_errors=settings.retry_errors,
            limit=settings.limit,
            finished_shards=state.finished_shards(),
            options=options,
            retries=settings.retries,
            share=Share.of(settings),
        )
        run_id = new_run_id()
        outcome = RunOutcome(RunCounts(), 0.0, last_facts(state))
        reader = Prefetcher(plan.samples())
        try:
            first, samples = peek(reader)
            if plan.already_done and not plan.shards and not plan.manifests:
                log.info("%d images are already in %s", plan.already_done, target.label)
            if first is not None:
                schema = PART_SCHEMA_WITH_IMAGES if target.keeps_images else PART_SCHEMA
                parts = PartWriter(state.parts_dir, run_id, flush_rows=settings.flush_every, schema=schema)
                try:
                    outcome = run_engines(
                        settings, placements, plan, samples, parts, stopper, target.keeps_images
                    )
                finally:
                    parts.close()
        finally:
            reader.close()
        if stopper.reason is not None and not outcome.counts.images:
            raise StopNow(stopper.reason, "before any image was captioned")
        commit_withdrawals(state, run_id, plan, settings.model, target.keeps_images)
        state.record_finished_shards(run_id, plan.completed_shards())
        return finish(settings, state, target, run_id, (started_at, started), plan, outcome, stopper.reason)
    except (CaprlError, StopNow):
        if held and new_state and state is not None and not state.part_paths():  # nothing committed: no trace
            shutil.rmtree(state.dir, ignore_errors=True)
        raise
    finally:
        stopper.restore()
        if state is not None:
            state.release()
