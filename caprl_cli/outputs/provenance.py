"""Run provenance: what produced these captions, stored in Parquet metadata and the summary JSON.

A corpus outlives the run that made it; the model revision, prompt, sampling and pixel limits recorded
here are what lets someone trust, reproduce or extend it later.
"""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from caprl_cli import __version__
from caprl_cli.settings import CaptionSettings
from caprl_cli.storage import redact


def utc_now() -> str:
    """ISO 8601 time in UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def summary_path_for(output: Path) -> Path:
    """`out.parquet` -> `out.parquet.summary.json`."""
    return output.with_name(output.name + ".summary.json")


@dataclass
class RunCounts:
    """What a run produced, by outcome."""

    ok: int = 0
    output_tokens: int = 0
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    engines: list[dict[str, Any]] = field(default_factory=list)  # per engine, when a run had several

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    @property
    def images(self) -> int:
        return self.ok + self.errors


@dataclass(frozen=True)
class ModelFacts:
    """What the loaded model told us; carried over from the last run when no model is loaded."""

    engine_version: str | None = None
    model_revision: str | None = None
    prompt_text: str | None = None
    grid_factor: int | None = None
    # --engine openai: how the prompt reached the model (the endpoint, and whether the server's own
    # chat template or caprl's rendered it); None for engines fed `prompt_text` in this process.
    prompt_sent: dict[str, Any] | None = None


def totals_of(ok: int, errors_by_kind: dict[str, int]) -> dict[str, Any]:
    """The `counts` block: rows in the output by status and error kind."""
    errors = sum(errors_by_kind.values())
    return {"images": ok + errors, "ok": ok, "error": errors, "errors_by_kind": dict(sorted(errors_by_kind.items()))}


def build_provenance(
    settings: CaptionSettings,
    *,
    facts: ModelFacts,
    started_at: str,
    elapsed_s: float,
    images_per_s: float,
    run: RunCounts,
    totals: dict[str, Any],
    stop_reason: str | None,
) -> dict[str, Any]:
    """The provenance record: what produced the output, what it holds, and what this run did."""
    return {
        "caprl_cli_version": __version__,
        "python_version": platform.python_version(),
        "engine": settings.engine,
        "engine_version": facts.engine_version,
        "model": settings.model,
        "model_revision": facts.model_revision,
        # The processor files (grid, chat template) the images and prompt were prepared with: the model's
        # own, or with --engine openai the ones model/served.py found for what the server serves.
        "processor": settings.processor or settings.model,
        "prompt": settings.prompt,
        "system_prompt": settings.system_prompt,
        "prompt_text": facts.prompt_text,
        "prompt_sent": facts.prompt_sent,
        "base_url": redact(settings.base_url) if settings.base_url is not None else None,
        "sampling": {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_tokens": settings.max_tokens,
            "repetition_penalty": 1.0,
            "seed": settings.seed,
            "num_captions": settings.num_captions,
            "max_repeats": settings.max_repeats,  # loop detection (engines/repetition.py); 0: off
        },
        "pixels": {
            "min_pixels": settings.min_pixels,
            "max_pixels": settings.max_pixels,
            "max_image_pixels": settings.max_image_pixels,
            "grid_factor": facts.grid_factor,
        },
        "output": redact(settings.output_location) if settings.output_location is not None else None,
        "format": settings.output_format,
        "revision": settings.revision,
        # --num-shards/--shard-index: this output holds one share of the work; None: all of it
        "share": (
            {"index": settings.shard_index, "count": settings.num_shards} if settings.num_shards is not None else None
        ),
        "counts": totals,
        "run": {
            "started_at": started_at,
            "finished_at": utc_now(),
            "elapsed_s": round(elapsed_s, 3),
            "images_per_s": round(images_per_s, 3),
            "images": run.images,
            "ok": run.ok,
            "error": run.errors,
            "errors_by_kind": dict(sorted(run.errors_by_kind.items())),
            "output_tokens": run.output_tokens,
            "stopped_by": stop_reason,
            **({"engines": run.engines} if run.engines else {}),
        },
    }
