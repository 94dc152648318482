"""`caprl caption --dry-run`: what a run would do, planned exactly as the run plans it, and nothing done.

The same checks and the same plan as `run_caption` up to the point where a run would lock the state,
create it and load a model; then the counts are reported instead. Nothing is written, created or
locked (like `caprl status`, it only reads, so it is safe beside a running job). Shards are not opened:
how many images a shard holds is known only once it is read, so shards left are counted as shards.
"""

from __future__ import annotations

from dataclasses import dataclass

from caprl_cli.execute.progress import format_duration
from caprl_cli.inputs.resolve import resolve_inputs
from caprl_cli.outputs.place import without_probes
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.folder import RunState
from caprl_cli.state.index import CommittedIndex
from caprl_cli.state.plan import plan_listed, plan_run
from caprl_cli.state.shares import Share


@dataclass(frozen=True)
class DryRun:
    """What `caprl caption` with the same settings would do now."""

    output: str
    inputs: int  # listed images, plus the samples of shards earlier runs finished
    to_caption: int  # listed images this run would caption (after --limit)
    not_done: int  # listed images without a final row (before --limit)
    already_done: int
    retrying: int  # error rows this run would caption again (with --retry-errors; `unavailable` always)
    errors_kept: int  # error rows kept as they are (a run with --retry-errors would caption them again)
    shards_left: int  # shards no earlier run finished: opened and read by the run
    manifests: int  # manifests: read by the run, their images counted as they are read
    rate: float | None  # images/s of the last run that captioned, from its run record
    eta_s: float | None  # to_caption / rate; None without a rate (shards left not included)
    overwrite: bool


def last_rate(state: RunState) -> float | None:
    """images/s of captioning in the latest run record (model loading excluded); None if none."""
    record = state.last_run() if state.exists() else None
    rate = (record or {}).get("images_per_s")
    return float(rate) if isinstance(rate, int | float) and rate > 0 else None


def preview_run(settings: CaptionSettings) -> DryRun:
    """Plan the run `settings` describe, refusing what the run would refuse (a UsageError for settings
    that differ from the output's, an unsafe output place, sidecars for remote inputs), and count."""
    from caprl_cli.runner import check_fingerprint, check_sidecar_inputs, input_options, output_target

    target = output_target(settings)
    state = RunState(target.local_file, state_dir=target.state_dir, label=target.label)
    with without_probes():  # the run's own checks, minus the probe file it would create
        target.check_place(state)
    if not settings.overwrite:
        check_fingerprint(state, settings, target)  # reads only; raises what the run would raise
    index = CommittedIndex.empty() if settings.overwrite or not state.exists() else state.committed()
    finished = {} if settings.overwrite else state.finished_shards()
    options = input_options(settings, target)
    inputs = resolve_inputs(list(settings.inputs), options)
    check_sidecar_inputs(settings, inputs)
    share = Share.of(settings)
    if share is not None:  # only this share's images, as the run plans them (state/shares.py)
        inputs = share.of_inputs(inputs)
    plan = plan_run(
        inputs,
        index,
        retry_errors=settings.retry_errors,
        limit=settings.limit,
        finished_shards=finished,
        options=options,
        retries=settings.retries,
        share=share,
    )
    errors_kept = 0
    if not settings.retry_errors and index.size:
        errors_kept = plan_listed(inputs.listed, index, retry_errors=True).retrying - plan.retrying
    not_done = len(plan.listed.todo)
    to_caption = not_done if settings.limit is None else min(settings.limit, not_done)
    rate = None if settings.overwrite else last_rate(state)
    return DryRun(
        output=target.label,
        inputs=plan.inputs,
        to_caption=to_caption,
        not_done=not_done,
        already_done=plan.already_done,
        retrying=plan.retrying,
        errors_kept=errors_kept,
        shards_left=sum(1 for shard in plan.shards if shard.source in plan.tallies),
        manifests=len(plan.manifests),
        rate=rate,
        eta_s=to_caption / rate if rate else None,
        overwrite=settings.overwrite,
    )


def format_dry_run(found: DryRun) -> str:
    """One line per fact, for a shell or a cron log."""
    start = " (--overwrite: starting over)" if found.overwrite else ""
    lines = [f"dry run: nothing was written or loaded{start}", f"output: {found.output}"]
    limited = f" (--limit; {found.not_done} not done)" if found.to_caption < found.not_done else ""
    lines.append(f"images to caption: {found.to_caption}{limited}")
    lines.append(f"already done: {found.already_done}")
    if found.retrying:
        lines.append(f"error rows to retry: {found.retrying} (counted in images to caption)")
    if found.errors_kept:
        lines.append(f"error rows kept: {found.errors_kept} (--retry-errors would caption them again)")
    if found.shards_left:
        lines.append(f"shards left: {found.shards_left} (not opened: their images are counted when read)")
    if found.manifests:
        lines.append(f"manifests: {found.manifests} (read by the run: their images are counted when read)")
    if found.eta_s is not None and found.rate is not None:
        beyond = " plus the shards left" if found.shards_left or found.manifests else ""
        lines.append(
            f"estimated time: {format_duration(found.eta_s)}{beyond} at {found.rate:g} images/s "
            "(the last run's captioning rate; model loading not included)"
        )
    else:
        lines.append("estimated time: unknown (no earlier run recorded a rate)")
    return "\n".join(lines)
