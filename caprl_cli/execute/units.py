"""Units of work shared out among several engines: what the fleet loop hands out, to whom, and when.

The fleet loop (`execute.fleet`) hands these out, whatever transport reaches its engines. What is
handed out, to whom, and what becomes of the images of an engine that dies lives here, pure Python,
testable without any engine:

- `unit_size`: how many samples a unit holds;
- `UnitQueue`: the plan's samples cut into units as engines ask; units given back by engines that
  ended; suspects (images a dead engine held), which run alone and are split in halves each time they
  kill an engine again, until one image alone becomes an `engine` error row; and which engine holds
  each key now, so that a row is written once, by the engine that holds it;
- `count_death`: the restart policy (growing pauses; an engine that dies MAX_FAILURES times in a row
  without a row is left out of the run) and `ensure_an_engine_left`;
- `EngineStats` and `StatsLog`: what each engine did, for -v logs and the summary.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from caprl_cli.errors import EngineStartError, ErrorKind, SampleError
from caprl_cli.execute.stream import Sink, failed_row
from caprl_cli.execute.progress import LOG_INTERVAL_S
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.rows import Row, all_output_tokens, error_kind_of
from caprl_cli.prepare.pool import Failed
from caprl_cli.settings import CaptionSettings
from caprl_cli.storage import is_process_local

log = logging.getLogger("caprl")

MAX_FAILURES = 3  # deaths in a row, without a row in between, that take an engine out of the run
STOP_GRACE_S = 30.0  # how long engines told to end or stop may take to hand in their last rows
_BACKOFF_CAP_S = 30.0
MAX_UNIT_SIZE = 32


def unit_size(total: int | None, engines: int) -> int:
    """Samples per unit: small enough that every engine gets several units of a small run (so none
    waits on a straggler's share), at most MAX_UNIT_SIZE. An engine is kept supplied with its appetite
    plus one unit, so the unit size never limits how many requests an engine has in flight."""
    if total is None:
        return MAX_UNIT_SIZE
    return max(1, min(MAX_UNIT_SIZE, math.ceil(total / (4 * max(engines, 1)))))


@dataclass
class Unit:
    """Samples handed out together. `remaining` holds those without a row yet; a suspect unit holds
    images a dead engine had and runs alone on an engine."""

    id: int
    remaining: dict[str, Sample]
    suspect: bool = False


class UnitQueue:
    """The units of one run and who holds each key (see the module doc). A holder is whatever the
    executor keeps per engine (its slot); only its identity matters here."""

    def __init__(self, samples: Iterator[Sample], settings: CaptionSettings, sink: Sink, unit_size: int) -> None:
        self.samples = samples
        self.settings = settings
        self.sink = sink
        self.unit_size = unit_size
        self.queue: deque[Unit] = deque()  # units given back by engines that ended, not suspects
        self.suspects: deque[Unit] = deque()
        self.owner: dict[str, tuple[object, Unit]] = {}  # key -> who holds it now, in which unit
        self.deaths: Counter[str] = Counter()  # key -> engine deaths while it was held
        self.exhausted = False
        self._unit_ids = iter(range(1 << 62))

    def work_left(self) -> bool:
        """Whether any image still needs a row: unread samples, units waiting, or units held."""
        return bool(not self.exhausted or self.queue or self.suspects or self.owner)

    def take(self, held: Collection[Unit]) -> Unit | None:
        """The next unit for an engine that holds `held`, or None when it gets nothing now. Suspects go
        only to an engine that holds nothing, and while any waits, engines are not given new work (so
        they empty and take one)."""
        if any(unit.suspect for unit in held):
            return None
        if self.suspects:
            return None if held else self.suspects.popleft()
        if self.queue:
            return self.queue.popleft()
        if self.exhausted:
            return None
        taken: list[Sample] = []
        for sample in self.samples:
            taken.append(self._reachable(sample))
            if len(taken) >= self.unit_size:
                break
        else:
            self.exhausted = True
        return self._unit(taken) if taken else None

    def hand(self, holder: object, unit: Unit) -> None:
        """`holder` holds the unit's keys from now on: only its rows for them are accepted."""
        for key in unit.remaining:
            self.owner[key] = (holder, unit)

    def accept(self, holder: object, key: str, unit: Unit | None = None) -> Unit | None:
        """The unit whose image `key` now has a row from `holder`, or None when `holder` (in `unit`, if
        given) no longer holds it (it was given up on): a row is never written twice."""
        held = self.owner.get(key)
        if held is None or held[0] is not holder or (unit is not None and held[1] is not unit):
            return None
        del self.owner[key]
        held[1].remaining.pop(key, None)
        return held[1]

    def release(self, holder: object, unit: Unit) -> None:
        """The unit came back without rows for some images (a stop cut them off): nobody holds them now."""
        for key in list(unit.remaining):
            if self.owner.get(key, (None, None))[0] is holder:
                del self.owner[key]

    def give_back(self, held: Sequence[Unit], died: bool) -> None:
        """The units an engine held go back on the queue (only what has no row). After a death they
        are suspects; a suspect that ran alone and died again is split, and a single image that did so
        is an `engine` error row."""
        alone = len(held) == 1
        for unit in held:
            for key in unit.remaining:
                self.owner.pop(key, None)
                self.deaths[key] += died
            if not unit.remaining:
                continue
            if not died:
                self.queue.appendleft(unit)
            elif unit.suspect and alone and len(unit.remaining) == 1:
                self._engine_error_row(next(iter(unit.remaining.values())))
            elif unit.suspect and alone:
                samples = list(unit.remaining.values())
                half = len(samples) // 2
                for part in (samples[:half], samples[half:]):
                    self.suspects.append(self._unit(part, suspect=True))
            else:
                self.suspects.append(self._unit(list(unit.remaining.values()), suspect=True))

    def _engine_error_row(self, sample: Sample) -> None:
        deaths = self.deaths[sample.key]
        log.warning("%s made the engine die %d times: recorded as an engine error", sample.key, deaths)
        failure = Failed(sample, ErrorKind.ENGINE, f"the engine process died on this image ({deaths} times)")
        self.sink.add(failed_row(failure, self.settings.model))

    def _reachable(self, sample: Sample) -> Sample:
        """A sample in a memory:// filesystem only this process sees travels with its bytes."""
        if sample.data is not None or sample.path is None or not is_process_local(sample.path):
            return sample
        from caprl_cli.prepare.reading import read_sample_bytes

        try:
            return replace(sample, data=read_sample_bytes(sample, self.settings.storage_options, self.settings.retries))
        except SampleError as exc:
            return replace(sample, error_kind=exc.kind, error_message=exc.message)

    def _unit(self, samples: list[Sample], suspect: bool = False) -> Unit:
        return Unit(next(self._unit_ids), {sample.key: sample for sample in samples}, suspect)


# -- engines: restarts and stats --------------------------------------------------------------------------


@dataclass
class EngineStats:
    """What one engine did, for -v logs and the summary."""

    index: int
    devices: str | None
    images: int = 0
    ok: int = 0
    errors: int = 0
    output_tokens: int = 0
    units: int = 0
    restarts: int = 0
    dropped: bool = False
    ready_at: float | None = None
    last_row_at: float | None = None

    def count(self, row: Row) -> None:
        """One row the engine handed in (and the run accepted)."""
        self.images += 1
        self.last_row_at = time.monotonic()
        if error_kind_of(row) is None:
            self.ok += 1
            self.output_tokens += all_output_tokens(row)
        else:
            self.errors += 1

    def rate(self) -> float:
        if self.ready_at is None or self.last_row_at is None:
            return 0.0
        return self.images / max(self.last_row_at - self.ready_at, 1e-9)

    def record(self) -> dict[str, Any]:
        return {
            "engine": self.index,
            "devices": self.devices if self.devices is not None else "cpu",
            "images": self.images,
            "ok": self.ok,
            "error": self.errors,
            "output_tokens": self.output_tokens,
            "units": self.units,
            "images_per_s": round(self.rate(), 3),
            "restarts": self.restarts,
            "dropped": self.dropped,
        }

    def line(self) -> str:
        where = f"GPU {self.devices}" if self.devices is not None else "CPU"
        state = ", dropped" if self.dropped else ""
        return (
            f"engine {self.index} ({where}): {self.images} images, {self.errors} errors, "
            f"{self.rate():.2f} img/s, {self.restarts} restarts{state}"
        )


class StatsLog:
    """Each engine's stats line in -v logs, every LOG_INTERVAL_S."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def tick(self, stats: Iterable[EngineStats]) -> None:
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL_S and log.isEnabledFor(logging.DEBUG):
            self._last = now
            for engine in stats:
                log.debug(engine.line())


class EngineSeat(Protocol):
    """What the restart policy reads and sets of an executor's per-engine slot."""

    stats: EngineStats
    failures: int
    start_at: float
    finished: bool

    @property
    def alive(self) -> bool: ...


def restart_delay(failures: int) -> float:
    """Pause before starting an engine again: none after a death that was an image's fault, then
    1, 2, 4 ... seconds, at most 30."""
    return 0.0 if failures <= 0 else min(_BACKOFF_CAP_S, 2.0 ** (failures - 1))


def count_death(slot: EngineSeat, label: str, why: str, image_fault: bool, now: float) -> bool:
    """Count an engine's death; True when it is to start again (at `slot.start_at`), False when it
    failed MAX_FAILURES times in a row without a row and is to be left out of the run. A death while
    it ran a suspect alone is the image's fault, not the engine's: it does not count towards that."""
    slot.stats.restarts += 1
    if not image_fault:
        slot.failures += 1
    if slot.failures >= MAX_FAILURES:
        log.warning(
            "%s failed %d times in a row without captioning anything (%s): it is left out of the run",
            label,
            slot.failures,
            why,
        )
        return False
    delay = restart_delay(slot.failures)
    slot.start_at = now + delay
    log.warning("%s died (%s); starting it again in %.0fs", label, why, delay)
    return True


def ensure_an_engine_left(slots: Iterable[EngineSeat], start_failure: str | None) -> None:
    """The run fails only when no engine is left: none running and none waiting to start again."""
    if not any(slot.alive or not slot.finished for slot in slots):
        message = start_failure or "every engine failed repeatedly"
        raise EngineStartError(f"no engine is left to caption with: {message}")
