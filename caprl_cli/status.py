"""`caprl status OUTPUT`: how far a run has come, from the state folder alone (no model, no lock).

Status only reads: it creates, renames and deletes nothing, so it is safe beside a running job. Parts
only ever appear complete; one that a merging run removed between listing and reading is met by
listing again. An unreadable part is reported (and makes the exit code 1), never moved. With INPUTs,
tar shards that no run has finished and manifests are read to count what remains.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from caprl_cli.errors import UsageError
from caprl_cli.outputs import open_target
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.locate import as_dataset_folder, check_recorded_share, located_format, missing_state_hint
from caprl_cli.state.fingerprint import SHARE
from caprl_cli.state.plan import plan_run
from caprl_cli.state.shares import Share, describe_share
from caprl_cli.execute.progress import format_duration
from caprl_cli.state.folder import PartsChanged, RunState
from caprl_cli.state.index import CommittedIndex
from caprl_cli.inputs.resolve import InputOptions, resolve_inputs
from caprl_cli.storage import StorageOptions


def state_dir_of(
    output: str,
    output_format: str | None,
    state_dir: Path | None,
    share: tuple[int, int] | None = None,
    storage_options: StorageOptions | None = None,
) -> Path:
    """The state folder a run with this -o (and --format, --state-dir, --num-shards/--shard-index) used.
    A folder holding a Parquet dataset is one without --format (outputs/locate.py); another folder means
    WebDataset shards (or sidecar captions): either keeps its state in <folder>/.caprl."""
    if state_dir is not None:
        return state_dir
    try:
        output_format = located_format(output, output_format, storage_options)
    except UsageError:
        output_format = "parquet"
    location = as_dataset_folder(output, output_format, storage_options)
    return open_target(location, [location], OutputOptions(output_format=output_format, share=share)).state_dir


def output_status(
    output: str,
    inputs: list[str],
    output_format: str | None = None,
    state_dir: Path | None = None,
    storage_options: StorageOptions | None = None,
    reading: InputOptions | None = None,
    share: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """done, ok, errors (and by kind), remaining (None without inputs), last run, images/s, ETA.

    `reading` says how inputs are read (`--files-from`, `--image-column`, `--image-root`,
    `--keep-meta`), exactly as the caption run was told, so `remaining` counts the same images. `share`
    (index, count) names a node share's state inside a Parquet dataset folder."""
    found_dir = state_dir_of(str(output), output_format, state_dir, share, storage_options)
    state = RunState(None, state_dir=found_dir, label=str(output))
    if not state.exists():
        hint = missing_state_hint(str(output), share) if state_dir is None else ""
        raise UsageError(f"no caprl run has written {output} (no state folder {state.dir}){hint}")
    check_recorded_share(state.stored_fingerprint(), share, str(output))
    index, damaged = read_committed(state)
    errors_by_kind = index.error_counts()
    errors = sum(errors_by_kind.values())
    remaining = None
    options = dataclasses.replace(reading or InputOptions(), storage_options=storage_options or {})
    share_record = (state.stored_fingerprint() or {}).get(SHARE)
    if inputs or options.files_from:
        found = resolve_inputs(inputs, options)
        share = Share(**share_record) if share_record else None  # count what remains of this share only
        plan = plan_run(found, index, finished_shards=state.finished_shards(), options=options, share=share)
        remaining = sum(1 for _ in plan.samples())
    last_run = state.last_run()
    rate = (last_run or {}).get("images_per_s") or None
    eta = remaining / rate if remaining is not None and rate else None
    return {
        "output": str(output),
        "done": index.size,
        "ok": index.size - errors,
        "errors": errors,
        "errors_by_kind": errors_by_kind,
        "remaining": remaining,
        "parts": len(index.parts),
        "output_current": not damaged and state.merged_parts() == [part.name for part in index.parts],
        "damaged_parts": [str(path) for path in damaged],
        "last_run": last_run,
        "images_per_s": rate,
        "eta_s": round(eta, 1) if eta is not None else None,
        "share": share_record or None,
    }


# A run merging or compacting removes parts at most once per merge, so a few listings always settle.
READ_ATTEMPTS = 20


def read_committed(state: RunState) -> tuple[CommittedIndex, list[Path]]:
    """The committed index of the readable parts and the unreadable ones, without writing anything;
    listed again when a concurrent merge removed a part between listing and reading it."""
    for attempt in range(READ_ATTEMPTS):
        damaged: list[Path] = []
        try:
            return state.committed(damaged=damaged), damaged
        except PartsChanged:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.01 * (attempt + 1))  # let the merge finish removing what it replaced
    raise AssertionError("unreachable")


def format_status(status: dict[str, Any]) -> str:
    """One line per fact, for a shell or a cron log."""
    lines = [f"{status['output']}: {status['done']} done ({status['ok']} ok, {status['errors']} errors)"]
    share = describe_share(status.get("share"))
    if share:
        lines[0] += f"; {share} (--num-shards/--shard-index)"
    if status["errors_by_kind"]:
        lines.append("errors: " + ", ".join(f"{kind} {n}" for kind, n in status["errors_by_kind"].items()))
    if status["remaining"] is not None:
        lines.append(f"remaining: {status['remaining']}")
    last = status["last_run"]
    if last:
        stopped = f", stopped by {last['stopped_by']}" if last.get("stopped_by") else ""
        lines.append(
            f"last run: {last.get('finished_at')}, {last.get('images')} images at "
            f"{last.get('images_per_s')} images/s{stopped}"
        )
    if status["eta_s"] is not None:
        lines.append(f"ETA: {format_duration(status['eta_s'])}")
    if not status["output_current"] and not status.get("damaged_parts"):
        lines.append("output not yet merged: run the caption command again to merge")
    for part in status.get("damaged_parts") or []:
        lines.append(
            f"damaged: state part {part} cannot be read (counts above leave it out); restore the file, "
            f"or run `caprl repair {status['output']}` to rebuild the state from the published output"
        )
    return "\n".join(lines)
