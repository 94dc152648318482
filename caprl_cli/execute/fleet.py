"""Several engines, one queue: the loop that schedules, restarts, isolates, drains and requeues, written
once over engine slots.

How a slot's engine host (`execute.host`) is reached is a transport's job: a local worker process over
a pipe (`execute.process`), or a Ray actor on any node (`execute.ray_transport`). The loop itself never
knows which; it sees messages from hosts and tells them what to do.

The driver cuts the plan's samples into small units and hands one to whichever host has room, so a
slow engine simply takes fewer. Every row comes back here and goes to the run's one `RowSink` and
`PartWriter`: one writer keeps the state's promises (every key once, little lost on kill -9) exactly
as with one engine. Faults stay with the engine that had them:

- a host that dies (a segfault, CUDA out of memory, kill -9, its node lost) is started again with
  growing pauses; the images of its units that have no row go back on the queue at once, never
  written twice;
- those images are then suspects: each suspect unit runs alone on an engine. If its engine dies again
  it is split in halves, until the one image that kills the engine is alone: it gets an `engine` error
  row and the run goes on;
- a host that holds images and shows no sign of life (no row, no heartbeat from its engine loop) for
  `--stall-timeout` (a hung CUDA call, a frozen process) is killed and treated as dead;
- an engine that fails three times in a row without a single row (not counting deaths while it ran
  suspects alone: those are the image's fault) is taken out of the run with a warning; the run fails
  only when no engine is left.

SIGINT/SIGTERM (and --max-runtime): no more units are handed out, every host is told to stop (vLLM
requests aborted), the rows they finished are committed, and the run ends the normal way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from caprl_cli.execute.job import CaptionJob, RunOutcome, expected_images
from caprl_cli.execute.units import (
    STOP_GRACE_S,
    EngineStats,
    StatsLog,
    Unit,
    UnitQueue,
    count_death,
    ensure_an_engine_left,
    unit_size,
)
from caprl_cli.outputs.rows import Row

log = logging.getLogger("caprl")

POLL_S = 0.25
WAITING_REPORT_S = 60.0  # an engine not ready after this long: say what it may be waiting for

Message = tuple[Any, ...]


@dataclass
class Slot:
    """One engine's place in the run, and its current host (the transport's handle), if any."""

    index: int
    label: str
    stats: EngineStats
    handle: Any = None  # the transport's: a worker process and its pipe, an actor and its call
    ready: bool = False
    finished: bool = False  # told "end" and gone, or dropped
    held: dict[int, Unit] = field(default_factory=dict)
    capacity: int = 0  # images it may hold without rows: its appetite and one unit
    failures: int = 0  # deaths in a row without a row in between (suspects run alone excepted)
    start_at: float = 0.0  # when to start the next host, while there is none
    started_at: float = 0.0
    last_sign: float = 0.0  # last message from the host, or when it got work while idle
    told: str | None = None  # "end" or "stop" once sent
    told_at: float = 0.0
    last_error: str | None = None  # what the host said when an exception ended it
    reported_wait: bool = False

    @property
    def alive(self) -> bool:
        return self.handle is not None

    def holding(self) -> int:
        return sum(len(unit.remaining) for unit in self.held.values())


class Transport(Protocol):
    """How the fleet reaches its hosts. Messages are those of `execute.host`, plus one the transport
    makes itself when a host is gone: ("exit", clean, why), `clean` when it ended by itself after a
    "bye" or a start failure it reported, `why` describing the end otherwise."""

    # Said when an engine is not ready after WAITING_REPORT_S (what it may be waiting for).
    waiting_hint: str

    def start(self, slot: Slot) -> None:
        """Start the slot's host (sets `slot.handle`); its messages then come through `receive`."""

    def receive(self, slots: list[Slot], timeout: float) -> Iterator[tuple[Slot, Message]]:
        """Messages from the live hosts among `slots`, waiting at most `timeout` for the first."""

    def send(self, slot: Slot, message: Message) -> bool:
        """Send a message to the slot's host; False when it cannot take it (it is gone)."""

    def kill(self, slot: Slot) -> None:
        """End the slot's host now, with everything it started; `slot.handle` becomes None."""


class Fleet:
    """One run over several engine slots (see the module doc)."""

    def __init__(
        self, job: CaptionJob, transport: Transport, slots: list[Slot], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.job = job
        self.clock = clock  # every pause and timeout of the loop is read from it (a test runs it faster)
        self.transport = transport
        self.slots = slots
        self.unit_size = unit_size(expected_images(job.plan), len(slots))
        self.units = UnitQueue(job.samples, job.settings, job.sink, self.unit_size)
        self.stopping = False
        self.captioning = False
        self.start_failure: str | None = None
        self.version: str | None = None
        self.stats_log = StatsLog()

    # -- the run -------------------------------------------------------------------------------------

    def run(self, where: str = "") -> RunOutcome:
        try:
            for slot in self.slots:
                self._start(slot)
            while not self._done():
                if self.captioning and not self.stopping and self.job.stopper.should_stop():
                    self._stop_all()
                for slot, message in self.transport.receive(self.slots, POLL_S):
                    slot.last_sign = self.clock()
                    self._on_message(slot, message, where)
                self._check_hosts()
                self._serve()
                self.stats_log.tick(slot.stats for slot in self.slots)
            outcome = self.job.outcome(self.version)
            outcome.counts.engines = [slot.stats.record() for slot in self.slots]
            return outcome
        finally:
            self.job.sink.progress.close()
            for slot in self.slots:
                self.transport.kill(slot)
            for slot in self.slots:
                log.debug(slot.stats.line())

    def _done(self) -> bool:
        """True once every host is gone and nothing is left to do (or the run is stopping)."""
        if self.stopping:
            return not any(slot.alive for slot in self.slots)
        if not self.units.work_left():
            for slot in self.slots:
                if slot.alive and slot.ready:
                    self._tell(slot, "end")
                elif slot.alive:  # still loading: there is nothing left for it
                    self.transport.kill(slot)
                    slot.finished = True
                else:
                    slot.finished = True
            return not any(slot.alive for slot in self.slots)
        ensure_an_engine_left(self.slots, self.start_failure)
        return False

    # -- hosts ---------------------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        slot.ready, slot.told, slot.reported_wait = False, None, False
        self.transport.start(slot)
        slot.started_at = slot.last_sign = self.clock()

    def _on_message(self, slot: Slot, message: Message, where: str) -> None:
        kind = message[0]
        if kind == "row":
            self._on_row(slot, message[1])
        elif kind == "ready":
            self._on_ready(slot, message[1], message[2], message[3], where)
        elif kind == "start_failed":
            self.start_failure = message[1]
            log.warning("%s cannot start and is left out of the run: %s", slot.label, message[1])
            self.transport.kill(slot)
            self._drop(slot)
        elif kind == "crashed":
            slot.last_error = message[1]
        elif kind == "bye":
            slot.told = slot.told or "end"
        elif kind == "exit":
            self._ended(slot, clean=message[1], why=message[2])

    def _on_ready(self, slot: Slot, version: str, appetite: int, pid: int, where: str) -> None:
        slot.ready = True
        slot.capacity = appetite + self.unit_size
        self.version = self.version or version
        if slot.stats.ready_at is None:
            slot.stats.ready_at = time.monotonic()
        log.debug("%s is ready (pid %d, %s)", slot.label, pid, version)
        if self.stopping:
            self._tell(slot, "stop")
        if not self.captioning:
            self.captioning = True
            self.job.begin_captioning(version, where)

    def _on_row(self, slot: Slot, row: Row) -> None:
        unit = self.units.accept(slot, row["key"])
        if unit is None:
            return  # not this host's any more (it was given up on): never written twice
        if not unit.remaining:
            slot.held.pop(unit.id, None)
        slot.failures = 0
        slot.stats.count(row)
        self.job.sink.add(row)

    def _check_hosts(self) -> None:
        """Notice stalled hosts and slow stops; start again those whose pause is over."""
        now = self.clock()
        for slot in self.slots:
            if slot.alive:
                if slot.told is not None and now - slot.told_at > STOP_GRACE_S:
                    log.warning("%s did not end in time: killing it", slot.label)
                    self.transport.kill(slot)
                    self._gone(slot)
                elif slot.ready and slot.held and now - slot.last_sign > self.job.settings.stall_timeout:
                    log.warning("%s made no progress for %.0fs: killing it", slot.label, now - slot.last_sign)
                    self._lost(slot, "it stalled")  # killed there, its images given back
                elif not slot.ready and self.stopping:
                    self.transport.kill(slot)  # still loading: nothing to hand in
                    self._gone(slot)
                elif not slot.ready and not slot.reported_wait and now - slot.started_at > WAITING_REPORT_S:
                    slot.reported_wait = True
                    log.warning(
                        "%s has not started after %.0fs%s", slot.label, now - slot.started_at, self.transport.waiting_hint
                    )
            elif not slot.finished and not self.stopping and now >= slot.start_at:
                self._start(slot)

    def _ended(self, slot: Slot, clean: bool, why: str) -> None:
        """The host is gone (the transport saw it end): as told, or not."""
        if not slot.alive:
            return
        if slot.told is not None and clean:
            self.transport.kill(slot)  # whatever is left of it
            self._gone(slot)
        else:
            self._lost(slot, why)

    def _gone(self, slot: Slot) -> None:
        """A host that ended as told (or that the run no longer waits for)."""
        self._requeue(slot, died=False)
        slot.finished = True

    def _lost(self, slot: Slot, why: str) -> None:
        """A host died: give its images back at once, start it again later."""
        if not slot.alive:
            return
        was_ready = slot.ready
        if slot.last_error:
            why, slot.last_error = f"{why}: {slot.last_error}", None
        self.transport.kill(slot)
        if self.stopping:
            self._gone(slot)
            return
        # A death while running suspects alone is the image's fault, not the engine's.
        alone_suspect = len(slot.held) == 1 and next(iter(slot.held.values())).suspect
        self._requeue(slot, died=True)
        if not count_death(slot, slot.label, why, image_fault=alone_suspect and was_ready, now=self.clock()):
            self._drop(slot)

    def _requeue(self, slot: Slot, died: bool) -> None:
        """The units `slot` held go back on the queue (see `UnitQueue.give_back`)."""
        held, slot.held = list(slot.held.values()), {}
        self.units.give_back(held, died)

    def _drop(self, slot: Slot) -> None:
        slot.finished = True
        slot.stats.dropped = True
        self._requeue(slot, died=False)

    def _tell(self, slot: Slot, what: str) -> None:
        if slot.told == what or not slot.alive:
            return
        slot.told, slot.told_at = what, self.clock()
        self.transport.send(slot, (what,))  # a host gone meanwhile is noticed by its exit

    def _stop_all(self) -> None:
        """A signal or the deadline: no more units; every host stops and hands in what it finished."""
        self.stopping = True
        for slot in self.slots:
            if slot.alive and slot.ready:
                self._tell(slot, "stop")
            elif not slot.alive:
                slot.finished = True

    # -- handing out units ---------------------------------------------------------------------------

    def _serve(self) -> None:
        """Keep every ready host supplied up to its capacity. Suspects go only to an engine that holds
        nothing, and while any waits, engines are not given new work (so they empty and take one)."""
        if self.stopping:
            return
        for slot in self.slots:
            while slot.alive and slot.ready and slot.told is None and slot.holding() < slot.capacity:
                unit = self.units.take(slot.held.values())
                if unit is None:
                    break
                self._hand(slot, unit)

    def _hand(self, slot: Slot, unit: Unit) -> None:
        if not slot.held:
            slot.last_sign = self.clock()  # the stall clock starts when an idle host gets work
        slot.held[unit.id] = unit
        slot.stats.units += 1
        self.units.hand(slot, unit)
        if not self.transport.send(slot, ("unit", unit.id, list(unit.remaining.values()))):
            self._lost(slot, "it could not be sent work")
