"""Several engines, one queue: the parent side of a multi-engine run.

The parent plans small units (a few dozen samples) from the plan's samples and hands one to whichever
engine worker asks (`execute.worker`), so a slow GPU simply takes fewer. Every row comes back here and
goes to the run's one `RowSink` and `PartWriter`: one writer keeps the state's promises (every key
once, little lost on kill -9) exactly as with one engine.

Faults stay with the engine that had them:

- a worker that dies (a segfault, CUDA out of memory, kill -9) is started again with growing pauses;
  the images of its units that have no row go back on the queue, never written twice;
- those images are then suspects: each suspect unit runs alone on an engine. If its engine dies again
  it is split in halves, until the one image that kills the engine is alone: it gets an `engine` error
  row and the run goes on;
- a worker that holds images and shows no sign of life (no row, no heartbeat from its engine loop) for
  `--stall-timeout` (a hung CUDA call, a frozen process) is killed and treated as dead;
- an engine whose worker fails three times in a row without a single row (not counting deaths while
  it ran suspects alone: those are the image's fault) is taken out of the run with a warning; the run
  fails only when no engine is left.

SIGINT/SIGTERM (and --max-runtime): no more units are handed out, every worker is told to stop (vLLM
requests aborted), the rows they finished are committed, and the run ends the normal way.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from caprl_cli.execute.devices import CUDA_VISIBLE_DEVICES, EnginePlacement, decode_workers_per_engine
from caprl_cli.execute.local import RowSink, RunOutcome, caption_plan, engine_spec, expected_images, load_model
from caprl_cli.execute.progress import Progress
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
from caprl_cli.execute.worker import WorkerConfig, end_engine_process, worker_main
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.provenance import ModelFacts
from caprl_cli.outputs.rows import Row
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.parts import PartWriter
from caprl_cli.state.plan import Plan

log = logging.getLogger("caprl")

DEFAULT_STALL_TIMEOUT_S = 600.0
MAX_UNIT_SIZE = 32
_POLL_S = 0.25
# Compile caches that concurrent engines must not share (vLLM's and torch.compile's, Triton's).
_CACHE_VARIABLES = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def caption_with_engines(
    settings: CaptionSettings,
    placements: list[EnginePlacement],
    plan: Plan,
    samples: Iterator[Sample],
    parts: PartWriter,
    stopper: Stopper,
    keep_images: bool = False,
) -> RunOutcome:
    """Caption the plan's samples with the engines placed: one in this process, several in workers.

    One vLLM engine whose engine core runs in a process of its own (on GPUs, or when
    VLLM_ENABLE_V1_MULTIPROCESSING=1 asks for it) also goes to a worker: that engine core would outlive
    a kill -9 of this process, while an engine worker leads a process group that ends with its parent.
    """
    if len(placements) == 1 and not engine_core_apart(settings.engine, placements[0], os.environ):
        devices = placements[0].devices
        if devices is not None:  # before torch or vLLM is imported here
            os.environ[CUDA_VISIBLE_DEVICES] = devices
        return caption_plan(settings, plan, samples, parts, stopper, keep_images)
    return MultiEngineRun(settings, placements, plan, samples, parts, stopper, keep_images).run()


def engine_core_apart(engine: str, placement: EnginePlacement, environ: Mapping[str, str]) -> bool:
    """Whether the engine runs its core in a separate process: vLLM does on GPUs unless told not to
    (its CPU build is kept in-process by the engine itself), and wherever it is told to."""
    if engine != "vllm":
        return False
    asked = environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if asked is not None:
        return asked.strip() not in ("", "0")
    return placement.devices is not None


def unit_size(total: int | None, engines: int) -> int:
    """Samples per unit: small enough that every engine gets several units of a small run (so none
    waits on a straggler's share), at most MAX_UNIT_SIZE."""
    if total is None:
        return MAX_UNIT_SIZE
    return max(1, min(MAX_UNIT_SIZE, math.ceil(total / (4 * engines))))


def engine_cache_env(placement: EnginePlacement, environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Compile cache folders of this engine's own, unless the user chose them: concurrent engines
    writing one cache corrupt it. Named by the engine's devices, so a later run (or a restarted worker)
    on the same GPUs reuses what was compiled."""
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caprl" / "engines"
    name = f"gpu-{placement.devices.replace(',', '-')}" if placement.devices is not None else f"cpu-{placement.index}"
    return {var: str(base / name / sub) for var, sub in _CACHE_VARIABLES.items() if var not in environ}


@contextmanager
def environment(changes: dict[str, str]) -> Iterator[None]:
    """`os.environ` with `changes` while a worker is started (a spawned child copies it at start)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class EngineSlot:
    """One engine's place in the run and its current worker process (if any)."""

    placement: EnginePlacement
    stats: EngineStats
    process: Any = None
    conn: Connection | None = None
    ready: bool = False
    finished: bool = False  # told "end" and gone, or dropped
    held: dict[int, Unit] = field(default_factory=dict)
    capacity: int = 0  # images it may hold without rows: its appetite and one unit
    failures: int = 0  # deaths in a row without a row in between (suspects run alone excepted)
    start_at: float = 0.0  # when to start the next worker, while there is none
    last_sign: float = 0.0  # last message from the worker, or when it got work while idle
    told: str | None = None  # "end" or "stop" once sent
    told_at: float = 0.0
    last_error: str | None = None  # what the worker said when an exception ended it

    @property
    def alive(self) -> bool:
        return self.process is not None

    @property
    def label(self) -> str:
        return self.placement.label


class MultiEngineRun:
    """One multi-engine captioning run (see the module doc)."""

    def __init__(
        self,
        settings: CaptionSettings,
        placements: list[EnginePlacement],
        plan: Plan,
        samples: Iterator[Sample],
        parts: PartWriter,
        stopper: Stopper,
        keep_images: bool,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.samples = samples
        self.stopper = stopper
        self.keep_images = keep_images
        self.sink = RowSink(parts, Progress(0, enabled=False), plan)
        self.slots = [EngineSlot(p, EngineStats(p.index, p.devices)) for p in placements]
        self.unit_size = unit_size(expected_images(plan), len(placements))
        self.units = UnitQueue(samples, settings, self.sink, self.unit_size)
        self.stopping = False
        self.captioning = False
        self.start_failure: str | None = None
        self._context = multiprocessing.get_context("spawn")
        self.stats_log = StatsLog()
        self.config: WorkerConfig | None = None

    # -- the run -------------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        settings = self.settings
        source, profile = load_model(settings)  # weights resolved (and downloaded) once, here
        facts = ModelFacts(model_revision=source.revision, prompt_text=profile.prompt_text, grid_factor=profile.grid.factor)
        self.config = WorkerConfig(
            index=0,
            settings=settings,
            spec=engine_spec(settings, source, profile),
            grid=profile.grid,
            decode_workers=decode_workers_per_engine(settings.workers, len(self.slots)),
            keep_images=self.keep_images,
            parent_pid=os.getpid(),
        )
        log.info(
            "starting %d engines (%s), %d decode workers each",
            len(self.slots),
            ", ".join(slot.placement.label for slot in self.slots),
            self.config.decode_workers,
        )
        version: str | None = None
        try:
            for slot in self.slots:
                self._start(slot)
            while not self._done():
                if self.captioning and not self.stopping and self.stopper.should_stop():
                    self._stop_all()
                for slot, message in self._receive():
                    if message[0] == "ready":
                        version = version or message[1]
                        slot.capacity = message[2] + self.unit_size
                        self._on_ready(slot, version)
                    else:
                        self._on_message(slot, message)
                self._check_workers()
                self._serve()
                self.stats_log.tick(slot.stats for slot in self.slots)
            facts = replace(facts, engine_version=version)
            return RunOutcome(self._counts(), self.sink.progress.rate(), facts)
        finally:
            self.sink.progress.close()
            for slot in self.slots:
                self._kill(slot)
            for stats in (slot.stats for slot in self.slots):
                log.debug(stats.line())

    def _done(self) -> bool:
        """True once every worker is gone and nothing is left to do (or the run is stopping)."""
        live = [slot for slot in self.slots if slot.alive]
        if self.stopping:
            return not live
        if not self.units.work_left():
            for slot in self.slots:
                if slot.alive and slot.ready:
                    self._tell(slot, "end")
                elif slot.alive:  # still loading: there is nothing left for it
                    self._kill(slot)
                    slot.finished = True
                else:
                    slot.finished = True
            return not any(slot.alive for slot in self.slots)
        ensure_an_engine_left(self.slots, self.start_failure)
        return False

    def _counts(self) -> Any:
        counts = self.sink.counts
        counts.engines = [slot.stats.record() for slot in self.slots]
        return counts

    # -- workers -------------------------------------------------------------------------------------

    def _start(self, slot: EngineSlot) -> None:
        assert self.config is not None
        placement = slot.placement
        parent_end, child_end = self._context.Pipe(duplex=True)
        config = replace(self.config, index=placement.index)
        changes = engine_cache_env(placement, os.environ)
        if placement.devices is not None:
            changes[CUDA_VISIBLE_DEVICES] = placement.devices
        process = self._context.Process(
            target=worker_main, args=(config, child_end), name=f"caprl-engine-{placement.index}"
        )
        with environment(changes):
            process.start()
        child_end.close()
        slot.process, slot.conn, slot.ready, slot.told = process, parent_end, False, None
        slot.last_sign = time.monotonic()
        log.debug("started %s (pid %d)", placement.label, process.pid)

    def _on_ready(self, slot: EngineSlot, version: str) -> None:
        slot.ready = True
        slot.last_sign = time.monotonic()
        if slot.stats.ready_at is None:
            slot.stats.ready_at = slot.last_sign
        log.debug("%s is ready (%s)", slot.placement.label, version)
        if self.stopping:
            self._tell(slot, "stop")
        if not self.captioning:
            self.captioning = True
            self.stopper.begin_captioning()  # rows are about to exist: a signal now drains the run
            total = expected_images(self.plan)
            log.info("captioning %s images with %s on %s", total or "the", self.settings.model, version)
            self.sink.progress = Progress(total, enabled=self.settings.progress)

    def _receive(self) -> Iterator[tuple[EngineSlot, tuple[Any, ...]]]:
        """Messages from every live worker, waiting at most a moment for the first."""
        by_conn = {slot.conn: slot for slot in self.slots if slot.alive and slot.conn is not None}
        if not by_conn:
            time.sleep(_POLL_S)
            return
        for conn in wait(list(by_conn), timeout=_POLL_S):
            slot = by_conn[conn]
            while slot.conn is conn:
                try:
                    if not conn.poll():
                        break
                    message = conn.recv()
                except (EOFError, OSError):
                    self._ended(slot)
                    break
                slot.last_sign = time.monotonic()
                yield slot, message

    def _on_message(self, slot: EngineSlot, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "row":
            self._on_row(slot, message[1])
        elif kind == "start_failed":
            self.start_failure = message[1]
            log.warning("%s cannot start and is left out of the run: %s", slot.placement.label, message[1])
            self._kill(slot)
            self._drop(slot)
        elif kind == "crashed":
            slot.last_error = message[1]
        elif kind == "bye":
            slot.told = slot.told or "end"

    def _on_row(self, slot: EngineSlot, row: Row) -> None:
        unit = self.units.accept(slot, row["key"])
        if unit is None:
            return  # not this worker's any more (it was given up on): never written twice
        if not unit.remaining:
            slot.held.pop(unit.id, None)
        slot.failures = 0
        slot.stats.count(row)
        self.sink.add(row)

    def _check_workers(self) -> None:
        """Notice dead and stalled workers; start again those whose pause is over."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.alive:
                if not slot.process.is_alive():
                    self._ended(slot)
                elif slot.told is not None and now - slot.told_at > STOP_GRACE_S:
                    log.warning("%s did not end in time: killing it", slot.placement.label)
                    self._kill(slot)
                    self._gone(slot)
                elif slot.ready and slot.held and now - slot.last_sign > self.settings.stall_timeout:
                    log.warning(
                        "%s made no progress for %.0fs: killing it", slot.placement.label, now - slot.last_sign
                    )
                    self._lost(slot, "it stalled")  # killed there, its images given back
                elif not slot.ready and self.stopping:
                    self._kill(slot)  # still loading: nothing to hand in
                    self._gone(slot)
            elif not slot.finished and not self.stopping and now >= slot.start_at:
                self._start(slot)

    def _ended(self, slot: EngineSlot) -> None:
        """The worker closed its end of the pipe: it is exiting, as told or not."""
        slot.process.join(timeout=10)
        code = slot.process.exitcode
        if slot.told is not None and code == 0:
            self._gone(slot)
        else:
            self._lost(slot, f"its process ended with {_describe_exit(code)}")

    def _gone(self, slot: EngineSlot) -> None:
        """A worker that ended as told."""
        self._drain(slot)
        self._close(slot)
        self._requeue(slot, died=False)
        slot.finished = True

    def _lost(self, slot: EngineSlot, why: str) -> None:
        """A worker died: take its last rows, give its other images back, start it again later."""
        if not slot.alive:
            return
        was_ready = slot.ready
        self._drain(slot)
        if slot.last_error:
            why, slot.last_error = f"{why}: {slot.last_error}", None
        self._kill(slot)
        if self.stopping:
            self._gone(slot)
            return
        # A death while running suspects alone is the image's fault, not the engine's.
        alone_suspect = len(slot.held) == 1 and next(iter(slot.held.values())).suspect
        self._requeue(slot, died=True)
        if not count_death(slot, slot.label, why, image_fault=alone_suspect and was_ready):
            self._drop(slot)

    def _drain(self, slot: EngineSlot) -> None:
        """Rows a dead worker sent before it died are whole: keep them."""
        conn = slot.conn
        while conn is not None:
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] in ("row", "crashed"):
                self._on_message(slot, message)

    def _requeue(self, slot: EngineSlot, died: bool) -> None:
        """The units `slot` held go back on the queue (see `UnitQueue.give_back`)."""
        held, slot.held = list(slot.held.values()), {}
        self.units.give_back(held, died)

    def _drop(self, slot: EngineSlot) -> None:
        slot.finished = True
        slot.stats.dropped = True
        self._requeue(slot, died=False)

    def _tell(self, slot: EngineSlot, what: str) -> None:
        if slot.told == what or slot.conn is None:
            return
        slot.told, slot.told_at = what, time.monotonic()
        try:
            slot.conn.send((what,))
        except (OSError, ValueError):
            pass  # it died meanwhile: noticed by its exit

    def _kill(self, slot: EngineSlot) -> None:
        if slot.process is not None:
            end_engine_process(slot.process.pid, slot.process.is_alive())  # with its engine core
            slot.process.join(timeout=30)
        self._close(slot)

    def _close(self, slot: EngineSlot) -> None:
        if slot.conn is not None:
            slot.conn.close()
        slot.process, slot.conn, slot.ready = None, None, False

    def _stop_all(self) -> None:
        """A signal or the deadline: no more units; every worker stops and hands in what it finished."""
        self.stopping = True
        for slot in self.slots:
            if slot.alive and slot.ready:
                self._tell(slot, "stop")
        for slot in self.slots:
            if not slot.alive:
                slot.finished = True

    # -- handing out units ---------------------------------------------------------------------------

    def _serve(self) -> None:
        """Keep every ready worker supplied up to its capacity. Suspects go only to an engine that holds
        nothing, and while any waits, engines are not given new work (so they empty and take one)."""
        if self.stopping:
            return
        for slot in self.slots:
            while slot.alive and slot.ready and slot.told is None and self._holding(slot) < slot.capacity:
                unit = self.units.take(slot.held.values())
                if unit is None:
                    break
                self._hand(slot, unit)

    @staticmethod
    def _holding(slot: EngineSlot) -> int:
        return sum(len(unit.remaining) for unit in slot.held.values())

    def _hand(self, slot: EngineSlot, unit: Unit) -> None:
        assert slot.conn is not None
        if not slot.held:
            slot.last_sign = time.monotonic()  # the stall clock starts when an idle worker gets work
        slot.held[unit.id] = unit
        slot.stats.units += 1
        self.units.hand(slot, unit)
        try:
            slot.conn.send(("unit", unit.id, list(unit.remaining.values())))
        except (OSError, ValueError):
            self._lost(slot, "it could not be sent work")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
