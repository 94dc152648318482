"""One captioning run: list -> decode+resize (worker pool) -> engine -> rows -> atomic commit.

The runner wires the stages together and owns the bookkeeping (counts, progress, provenance); each
stage lives in its own module behind a small interface, so the same loop can later run inside one
worker process per GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from caprl_cli.engines import load_engine
from caprl_cli.engines.base import Caption, Engine, EngineSpec, Sampling
from caprl_cli.errors import ErrorKind
from caprl_cli.inputs import Sample, list_samples
from caprl_cli.model_profile import ModelProfile, load_processor, profile_from_processor
from caprl_cli.model_source import ModelSource, resolve_model
from caprl_cli.preprocess import Failed, Outcome, Prepared, Preprocessor
from caprl_cli.progress import Progress
from caprl_cli.provenance import RunCounts, build_provenance, summary_path_for, utc_now
from caprl_cli.rows import Row, caption_row, error_kind_of, error_row
from caprl_cli.settings import CaptionSettings
from caprl_cli.writers import RowWriter, open_writer, write_json_atomically

log = logging.getLogger("caprl")

FLUSH_ROWS = 512
FLUSH_SECONDS = 10.0


class EngineStartError(Exception):
    """The engine could not be started (bad weights, unsupported model, out of memory)."""


@dataclass(frozen=True)
class RunReport:
    """What the CLI tells the user when a run ends."""

    output: Path
    summary: Path
    counts: RunCounts
    elapsed_s: float
    images_per_s: float  # while captioning, model loading excluded


class RowSink:
    """Buffers rows into groups for the writer and keeps the run's counts and progress."""

    def __init__(self, writer: RowWriter, progress: Progress) -> None:
        self.writer = writer
        self.progress = progress
        self.counts = RunCounts()
        self._buffer: list[Row] = []
        self._last_flush = time.monotonic()

    def add(self, row: Row) -> None:
        kind = error_kind_of(row)
        if kind is None:
            self.counts.ok += 1
            self.counts.output_tokens += row["output_tokens"] or 0
        else:
            self.counts.errors_by_kind[kind] += 1
        self.progress.update(tokens=row["output_tokens"] or 0, error=kind is not None)
        self._buffer.append(row)
        if len(self._buffer) >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self.writer.write(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()


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
        max_visual_tokens=profile.grid.max_visual_tokens(),
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


def images_only(outcomes: Iterable[Outcome], sink: RowSink, model: str) -> Iterator[Prepared]:
    """Pass prepared images on to the engine; write failed ones straight to the sink."""
    for outcome in outcomes:
        if isinstance(outcome, Failed):
            sink.add(failed_row(outcome, model))
        else:
            yield outcome


def select_samples(settings: CaptionSettings) -> list[Sample]:
    """The samples this run captions: every input, in key order, cut to --limit."""
    samples = list_samples(list(settings.inputs))
    return samples if settings.limit is None else samples[: settings.limit]


def run_caption(settings: CaptionSettings) -> RunReport:
    """Caption every selected sample into `settings.output`; the output appears only when complete."""
    started_at, started = utc_now(), time.monotonic()
    samples = select_samples(settings)
    source: ModelSource | None = None
    profile: ModelProfile | None = None
    if samples:
        source = resolve_model(settings.model, settings.revision)
        profile = profile_from_processor(
            load_processor(source.path),
            settings.prompt,
            settings.system_prompt,
            settings.min_pixels,
            settings.max_pixels,
        )
    else:
        log.warning("no images found in %s", ", ".join(settings.inputs))
    writer = open_writer(settings.output_format, settings.output)
    sink = RowSink(writer, Progress(0, enabled=False))
    engine: Engine | None = None
    preprocessor: Preprocessor | None = None
    try:
        if samples and source is not None and profile is not None:
            preprocessor = Preprocessor(profile.grid, settings.max_image_pixels, settings.workers)
            engine = start_engine(settings, engine_spec(settings, source, profile))
            log.info("captioning %d images with %s on %s", len(samples), settings.model, engine.version)
            sink.progress = Progress(len(samples), enabled=settings.progress)
            outcomes = preprocessor.prepare(samples)
            for item, caption in engine.caption(images_only(outcomes, sink, settings.model)):
                sink.add(result_row(item, caption, settings.model))
        sink.flush()
        elapsed = time.monotonic() - started
        images_per_s = sink.progress.rate()
        provenance = build_provenance(
            settings,
            engine_version=engine.version if engine else None,
            model_revision=source.revision if source else None,
            prompt_text=profile.prompt_text if profile else None,
            grid_factor=profile.grid.factor if profile else None,
            started_at=started_at,
            elapsed_s=elapsed,
            images_per_s=images_per_s,
            counts=sink.counts,
        )
        writer.commit(provenance)
    except BaseException:
        writer.abort()
        raise
    finally:
        sink.progress.close()
        if preprocessor is not None:
            preprocessor.close()
        if engine is not None:
            engine.close()
    summary = summary_path_for(settings.output)
    write_json_atomically(summary, provenance)
    return RunReport(
        output=settings.output, summary=summary, counts=sink.counts, elapsed_s=elapsed, images_per_s=images_per_s
    )
