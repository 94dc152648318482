"""`caprl status OUTPUT`: how far a run has come, from the state folder alone (no model, no lock).

Readable while a run is writing, since parts only ever appear complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caprl_cli.errors import UsageError
from caprl_cli.inputs import list_samples
from caprl_cli.plan import plan_run
from caprl_cli.progress import format_duration
from caprl_cli.run_state import RunState


def output_status(output: Path, inputs: list[str]) -> dict[str, Any]:
    """done, ok, errors (and by kind), remaining (None without inputs), last run, images/s, ETA."""
    state = RunState(output)
    if not state.exists():
        raise UsageError(f"no caprl run has written {output} (no state folder {state.dir.name})")
    index = state.committed()
    errors_by_kind = index.error_counts()
    errors = sum(errors_by_kind.values())
    remaining = None
    if inputs:
        remaining = len(plan_run(list_samples(inputs), index, retry_errors=False, limit=None).todo)
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
        "output_current": state.output_is_current(index.parts),
        "last_run": last_run,
        "images_per_s": rate,
        "eta_s": round(eta, 1) if eta is not None else None,
    }


def format_status(status: dict[str, Any]) -> str:
    """One line per fact, for a shell or a cron log."""
    lines = [f"{status['output']}: {status['done']} done ({status['ok']} ok, {status['errors']} errors)"]
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
    if not status["output_current"]:
        lines.append("output not yet merged: run the caption command again to merge")
    return "\n".join(lines)
