"""`--executor ray`: the run's engines as Ray actors, reading and image preparation as Ray tasks, and
every row back here, to the run's one writer.

The shape is that of the multi-engine run (`execute.multi`), with Ray in place of worker processes:

- the plan's samples are cut into small units; for each unit a CPU task (a fraction of a CPU, so
  engine actors can never take every CPU a task waits for) reads and prepares its images near the
  data, and the unit goes to one engine actor, which captions the prepared images with the same engine
  classes as a local run (`engines.load_engine`) and returns the unit's rows;
- the driver keeps each actor a unit ahead, tracks which units every actor holds, and commits rows
  through the run's `RowSink` and `PartWriter`, so resume, `status`, the lock, fingerprints and every
  output format work as with local engines; a row is accepted only from the actor that holds its key;
- a dead actor (killed, out of memory, its node lost) or one that shows no progress for
  `--stall-timeout` is killed and started again with growing pauses; the images of its units go back
  on the queue as suspects, which run alone, are split when they kill an engine again, and end as an
  `engine` error row when one image alone does; an engine that fails three times in a row without a row
  is left out of the run, which fails only when no engine is left;
- SIGINT/SIGTERM (and --max-runtime): no more units; every actor is told to stop (it hands in the rows
  of the images it finished), those rows are committed, Ray is shut down and the run ends the normal way.

Engines: one per GPU of the cluster (or per `--tensor-parallel-size` GPUs), or `--num-engines`; on a
cluster without GPUs, one CPU engine unless `--num-engines` says more.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from caprl_cli.errors import EngineStartError, UsageError
from caprl_cli.execute.local import (
    RowSink,
    RunOutcome,
    engine_spec,
    expected_images,
    image_requests,
    images_only,
    load_model,
    result_row,
    start_engine,
)
from caprl_cli.execute.progress import Progress
from caprl_cli.execute.ray_cluster import ray_cluster
from caprl_cli.execute.stopping import Stopper
from caprl_cli.execute.units import (
    STOP_GRACE_S,
    EngineStats,
    StatsLog,
    Unit,
    UnitQueue,
    count_death,
    ensure_an_engine_left,
)
from caprl_cli.execute.worker import engine_requests
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.provenance import ModelFacts
from caprl_cli.outputs.rows import Row
from caprl_cli.prepare.outcomes import DecodeSettings, Outcome, prepare_with
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.parts import PartWriter
from caprl_cli.state.plan import Plan

log = logging.getLogger("caprl")

PREPARE_CPUS = 0.25  # logical CPUs one preparation task asks for
ENGINE_CPUS = 0.5  # logical CPUs one engine actor asks for (besides its GPUs)
MAX_UNIT_SIZE = 64
UNITS_AHEAD = 2  # units an actor holds: the one it captions and the next, prepared meanwhile
_POLL_S = 0.25
_WAITING_REPORT_S = 60.0  # an engine not ready after this long: say what it waits for


# -- what runs on the cluster ---------------------------------------------------------------------------


def prepare_unit(samples: list[Sample], settings: DecodeSettings) -> list[Outcome]:
    """A preparation task: read, decode and resize each sample (never raises: failures are values)."""
    return [prepare_with(sample, settings) for sample in samples]


class EngineHost:
    """The body of an engine actor: one engine, loaded once, captioning one unit at a time.

    `stop` runs on a concurrency group of its own, so it reaches a `caption` in progress, which then
    returns the rows of the images it finished."""

    def __init__(self, settings: CaptionSettings, spec: Any, index: int, keep_images: bool) -> None:
        from caprl_cli.model.source import resolve_model

        if not Path(spec.model_path).exists():  # another node: the weights are fetched here, once
            spec = replace(spec, model_path=resolve_model(settings.model, settings.revision).path)
        self.settings = settings
        self.index = index
        self.keep_images = keep_images
        self.engine = start_engine(settings, spec)
        self._stop = threading.Event()
        self._environ = dict(os.environ)

    def ready(self) -> tuple[str, int, int]:
        """The engine's version, how many images it takes in at once, and this process's pid."""
        share = getattr(self.engine, "max_in_flight", None) or getattr(self.engine, "batch_size", None) or 8
        return self.engine.version, int(share), os.getpid()

    def stop(self) -> None:
        self._stop.set()

    def caption(self, unit_id: int, outcomes: list[Outcome]) -> tuple[int, list[Row]]:
        """The rows of one prepared unit: error rows for images that failed to prepare, caption (or
        engine error) rows for the others; only the finished ones once told to stop."""
        rows: list[Row] = []
        sink = _RowList(rows)
        model = self.settings.model
        should_stop = self._stop.is_set
        waiting: dict[str, Any] = {}
        prepared = images_only(outcomes, sink, model, should_stop)  # type: ignore[arg-type]
        requests = engine_requests(image_requests(prepared, waiting), self.index, self._environ)
        for key, caption in self.engine.caption(requests, should_stop):
            rows.append(result_row(waiting.pop(key), caption, model, self.keep_images))
        return unit_id, rows


class _RowList:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def add(self, row: Row) -> None:
        self.rows.append(row)


# -- the driver ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayPlacement:
    """How many engines the cluster runs and what each actor asks for."""

    engines: int
    gpus_per_engine: int  # 0: CPU engines


def place_engines(cluster_gpus: int, num_engines: int | None, tensor_parallel_size: int) -> RayPlacement:
    """One engine per `tensor_parallel_size` GPUs of the cluster, or `num_engines`; CPU engines on a
    cluster without GPUs. A count the cluster cannot hold is a `UsageError` (Ray would wait forever)."""
    if cluster_gpus <= 0:
        if tensor_parallel_size > 1:
            raise UsageError("--tensor-parallel-size needs GPUs, and the Ray cluster has none")
        return RayPlacement(num_engines or 1, 0)
    fits = cluster_gpus // tensor_parallel_size
    if fits < 1:
        raise UsageError(
            f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} GPUs; the Ray cluster has {cluster_gpus}"
        )
    if num_engines is not None and num_engines > fits:
        raise UsageError(
            f"--num-engines {num_engines} needs {num_engines * tensor_parallel_size} GPUs, "
            f"but the Ray cluster has {cluster_gpus}"
        )
    return RayPlacement(num_engines or fits, tensor_parallel_size)


def unit_size(total: int | None, engines: int, appetite: int) -> int:
    """Samples per unit: what an engine takes in at once (so one unit fills it), but small enough that
    every engine gets several units of a small run, and at most MAX_UNIT_SIZE."""
    size = min(MAX_UNIT_SIZE, max(appetite, 1))
    if total is not None:
        size = min(size, math.ceil(total / (4 * engines)))
    return max(1, size)


@dataclass
class ActorSlot:
    """One engine's place in the run and its current actor, if any."""

    index: int
    stats: EngineStats
    actor: Any = None
    ready_ref: Any = None
    ready: bool = False
    pid: int | None = None
    appetite: int = 0
    in_flight: dict[Any, Unit] = field(default_factory=dict)  # caption ObjectRef -> the unit it captions
    finished: bool = False
    failures: int = 0
    start_at: float = 0.0
    started_at: float = 0.0
    last_sign: float = 0.0
    stop_sent_at: float | None = None
    reported_wait: bool = False

    @property
    def alive(self) -> bool:
        return self.actor is not None

    @property
    def label(self) -> str:
        return f"engine {self.index}"


def caption_with_ray(
    settings: CaptionSettings,
    plan: Plan,
    samples: Iterator[Sample],
    parts: PartWriter,
    stopper: Stopper,
    keep_images: bool = False,
) -> RunOutcome:
    """Caption the plan's samples on a Ray cluster (see the module doc)."""
    verbose = log.isEnabledFor(logging.DEBUG)
    with ray_cluster(settings.ray_address, verbose) as ray:
        return RayRun(ray, settings, plan, samples, parts, stopper, keep_images).run()


class RayRun:
    """One captioning run on Ray (see the module doc)."""

    def __init__(
        self,
        ray: Any,
        settings: CaptionSettings,
        plan: Plan,
        samples: Iterator[Sample],
        parts: PartWriter,
        stopper: Stopper,
        keep_images: bool,
    ) -> None:
        self.ray = ray
        self.settings = settings
        self.plan = plan
        self.samples = samples
        self.stopper = stopper
        self.keep_images = keep_images
        self.sink = RowSink(parts, Progress(0, enabled=False), plan)
        self.slots: list[ActorSlot] = []
        self.units = UnitQueue(samples, settings, self.sink, unit_size=1)  # sized once an engine is ready
        self.stopping = False
        self.captioning = False
        self.start_failure: str | None = None
        self.stats_log = StatsLog()

    # -- the run -----------------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        ray, settings = self.ray, self.settings
        source, profile = load_model(settings)  # weights resolved (and downloaded) once, here
        facts = ModelFacts(model_revision=source.revision, prompt_text=profile.prompt_text, grid_factor=profile.grid.factor)
        placement = place_engines(
            int(ray.cluster_resources().get("GPU", 0)), settings.num_engines, settings.tensor_parallel_size
        )
        self.decode = DecodeSettings(
            profile.grid,
            settings.max_image_pixels,
            self.keep_images,
            settings.storage_options,
            settings.retries,
            settings.max_image_bytes,
        )
        self.prepare = ray.remote(num_cpus=PREPARE_CPUS)(prepare_unit)
        self.actor_class = ray.remote(
            num_cpus=ENGINE_CPUS,
            num_gpus=placement.gpus_per_engine,
            max_restarts=0,
            concurrency_groups={"control": 1},
        )(EngineHost)
        self.spec = engine_spec(settings, source, profile)
        self.slots = [ActorSlot(index, EngineStats(index, None)) for index in range(placement.engines)]
        log.info(
            "starting %d engines on Ray (%s each)",
            placement.engines,
            f"{placement.gpus_per_engine} GPU" if placement.gpus_per_engine else "CPU",
        )
        version: str | None = None
        try:
            for slot in self.slots:
                self._start(slot)
            while not self._done():
                if self.captioning and not self.stopping and self.stopper.should_stop():
                    self._stop_all()
                for ref in self._finished_refs():
                    version = self._on_result(ref) or version
                self._check_actors()
                self._serve()
                self.stats_log.tick(slot.stats for slot in self.slots)
            facts = replace(facts, engine_version=version)
            counts = self.sink.counts
            counts.engines = [slot.stats.record() for slot in self.slots]
            return RunOutcome(counts, self.sink.progress.rate(), facts)
        finally:
            self.sink.progress.close()
            for slot in self.slots:
                self._kill(slot)

    def _done(self) -> bool:
        if self.stopping:
            return not any(slot.alive and slot.in_flight for slot in self.slots)
        if not self.units.work_left():
            return True
        ensure_an_engine_left(self.slots, self.start_failure)
        return False

    # -- actors ------------------------------------------------------------------------------------------

    def _start(self, slot: ActorSlot) -> None:
        actor = self.actor_class.options(name=None).remote(self.settings, self.spec, slot.index, self.keep_images)
        slot.actor, slot.ready, slot.pid = actor, False, None
        slot.ready_ref = actor.ready.remote()
        slot.started_at = slot.last_sign = time.monotonic()
        slot.reported_wait = False
        slot.stop_sent_at = None
        log.debug("started engine %d on Ray", slot.index)

    def _finished_refs(self) -> list[Any]:
        refs = [slot.ready_ref for slot in self.slots if slot.ready_ref is not None]
        refs += [ref for slot in self.slots for ref in slot.in_flight]
        if not refs:
            time.sleep(_POLL_S)
            return []
        done, _ = self.ray.wait(refs, num_returns=1, timeout=_POLL_S)
        if done:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return done

    def _slot_of(self, ref: Any) -> tuple[ActorSlot | None, bool]:
        for slot in self.slots:
            if slot.ready_ref is not None and ref == slot.ready_ref:
                return slot, True
            if ref in slot.in_flight:
                return slot, False
        return None, False

    def _on_result(self, ref: Any) -> str | None:
        slot, is_ready = self._slot_of(ref)
        if slot is None:
            return None
        try:
            value = self.ray.get(ref)
        except Exception as exc:  # the actor died (or its node), or an exception ended the call
            if is_ready:
                slot.ready_ref = None
            self._lost(slot, _describe(exc), exc)  # gives back every unit it held, this one included
            return None
        if is_ready:
            slot.ready_ref = None
            version, appetite, pid = value
            self._on_ready(slot, version, appetite, pid)
            return version
        unit = slot.in_flight.pop(ref)
        _, rows = value
        slot.last_sign = time.monotonic()
        accepted = 0
        for row in rows:
            accepted += self._on_row(slot, unit, row)
        if accepted:
            slot.failures = 0
        self.units.release(slot, unit)  # images a stop cut off: no row, nobody holds them now
        return None

    def _on_ready(self, slot: ActorSlot, version: str, appetite: int, pid: int) -> None:
        slot.ready, slot.appetite, slot.pid = True, appetite, pid
        slot.last_sign = time.monotonic()
        if slot.stats.ready_at is None:
            slot.stats.ready_at = slot.last_sign
        log.debug("engine %d is ready on Ray (pid %d, %s)", slot.index, pid, version)
        if self.stopping:
            self._kill(slot)
            slot.finished = True
            return
        if not self.captioning:
            self.captioning = True
            self.stopper.begin_captioning()  # rows are about to exist: a signal now drains the run
            total = expected_images(self.plan)
            self.units.unit_size = unit_size(total, len(self.slots), appetite)
            log.info("captioning %s images with %s on %s (Ray)", total or "the", self.settings.model, version)
            self.sink.progress = Progress(total, enabled=self.settings.progress)

    def _on_row(self, slot: ActorSlot, unit: Unit, row: Row) -> int:
        if self.units.accept(slot, row["key"], unit) is None:
            return 0  # not this actor's any more (it was given up on): never written twice
        slot.stats.count(row)
        self.sink.add(row)
        return 1

    def _check_actors(self) -> None:
        """Start actors whose pause is over; give up on stalled ones and on slow stops."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.alive:
                if slot.stop_sent_at is not None and now - slot.stop_sent_at > STOP_GRACE_S:
                    log.warning("engine %d did not stop in time: killing it", slot.index)
                    self._kill(slot)
                    slot.in_flight.clear()
                    slot.finished = True
                elif slot.ready and slot.in_flight and now - slot.last_sign > self.settings.stall_timeout:
                    log.warning("engine %d made no progress for %.0fs: killing it", slot.index, now - slot.last_sign)
                    self._lost(slot, "it stalled")
                elif not slot.ready and not slot.reported_wait and now - slot.started_at > _WAITING_REPORT_S:
                    slot.reported_wait = True
                    log.warning(
                        "engine %d has not started after %.0fs: the Ray cluster may lack the resources it asks for",
                        slot.index,
                        now - slot.started_at,
                    )
                elif not slot.ready and self.stopping:
                    self._kill(slot)
                    slot.finished = True
            elif not slot.finished and not self.stopping and now >= slot.start_at:
                self._start(slot)

    def _lost(self, slot: ActorSlot, why: str, exc: BaseException | None = None) -> None:
        """An actor died or was given up on: give its units back, start it again later."""
        if not slot.alive:
            return
        was_ready = slot.ready
        start_failure = _start_failure(exc)
        alone_suspect = len(slot.in_flight) == 1 and next(iter(slot.in_flight.values())).suspect
        self._kill(slot)
        if self.stopping:  # the run ends: its images stay for the next run
            self._requeue(slot, died=False)
            slot.finished = True
            return
        self._requeue(slot, died=True)
        if start_failure is not None:
            self.start_failure = start_failure
            log.warning("engine %d cannot start and is left out of the run: %s", slot.index, start_failure)
            self._drop(slot)
            return
        if not count_death(slot, slot.label, why, image_fault=alone_suspect and was_ready):
            self._drop(slot)

    def _requeue(self, slot: ActorSlot, died: bool) -> None:
        """The units `slot` held go back on the queue (see `UnitQueue.give_back`)."""
        held, slot.in_flight = list(slot.in_flight.values()), {}
        self.units.give_back(held, died)

    def _drop(self, slot: ActorSlot) -> None:
        slot.finished = True
        slot.stats.dropped = True
        self._requeue(slot, died=False)

    def _kill(self, slot: ActorSlot) -> None:
        if slot.actor is not None:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        slot.actor, slot.ready_ref, slot.ready = None, None, False

    def _stop_all(self) -> None:
        """A signal or the deadline: no more units; every actor stops and hands in what it finished."""
        self.stopping = True
        now = time.monotonic()
        for slot in self.slots:
            if slot.alive and slot.ready and slot.in_flight:
                slot.actor.stop.options(concurrency_group="control").remote()
                slot.stop_sent_at = now
            elif slot.alive and slot.ready:
                self._kill(slot)
                slot.finished = True
            elif not slot.alive:
                slot.finished = True

    # -- handing out units -------------------------------------------------------------------------------

    def _serve(self) -> None:
        """Keep every ready actor a unit ahead. Suspects go only to an actor that holds nothing, and
        while any waits, actors are not given new work (so they empty and take one)."""
        if self.stopping:
            return
        for slot in self.slots:
            while slot.alive and slot.ready and len(slot.in_flight) < UNITS_AHEAD:
                unit = self.units.take(slot.in_flight.values())
                if unit is None:
                    break
                self._hand(slot, unit)

    def _hand(self, slot: ActorSlot, unit: Unit) -> None:
        if not slot.in_flight:
            slot.last_sign = time.monotonic()  # the stall clock starts when an idle actor gets work
        slot.stats.units += 1
        self.units.hand(slot, unit)
        prepared = self.prepare.remote(list(unit.remaining.values()), self.decode)
        slot.in_flight[slot.actor.caption.remote(unit.id, prepared)] = unit



def _start_failure(exc: BaseException | None) -> str | None:
    """The message of an engine that could not start (`EngineStartError` in the actor's constructor)."""
    seen = exc
    while seen is not None:
        cause = getattr(seen, "cause", None)
        if isinstance(seen, EngineStartError):
            return str(seen)
        if isinstance(cause, EngineStartError):
            return str(cause)
        seen = cause if isinstance(cause, BaseException) and cause is not seen else seen.__cause__
    text = str(exc) if exc is not None else ""
    if "EngineStartError" in text:
        return text.rsplit("EngineStartError:", 1)[-1].strip().splitlines()[0]
    return None


def _describe(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]
