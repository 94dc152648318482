"""The fleet loop and its unit queue, driven directly: pure Python, no engine, no process.

A simulated transport stands in for worker processes or Ray actors. Its hosts speak the hosts'
protocol (`execute.host`): ready, rows in any order, beats, bye, and deaths the transport reports as
("exit", False, why). The loop's clock is simulated too, so restart pauses and stall timeouts pass
without waiting. Whatever order events come in (random seeds, property style), every key gets exactly
one row, an image that kills every engine it reaches ends as one `engine` error row, and the run ends.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from caprl_cli.errors import EngineStartError
from caprl_cli.execute.fleet import Fleet, Message, Slot
from caprl_cli.execute.job import CaptionJob
from caprl_cli.execute.stopping import Stopper, StopReason
from caprl_cli.execute.units import MAX_FAILURES, EngineStats, UnitQueue
from caprl_cli.execute.progress import Progress
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.provenance import ModelFacts, RunCounts
from caprl_cli.outputs.rows import error_kind_of
from caprl_cli.settings import CaptionSettings


class Clock:
    """Simulated time: it moves only when the transport waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListSink:
    """The rows the run commits, in order."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.progress = Progress(0, enabled=False)
        self.counts = RunCounts()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if error_kind_of(row) is None:
            self.counts.ok += 1
        else:
            self.counts.errors_by_kind[error_kind_of(row)] += 1

    def keys(self) -> Counter[str]:
        return Counter(row["key"] for row in self.rows)


@dataclass
class SimHost:
    """One simulated engine host."""

    index: int
    appetite: int
    held: list[Sample] = field(default_factory=list)
    inbox: list[Message] = field(default_factory=list)
    started: bool = False
    ended: str | None = None  # "end" or "stop" once told
    frozen: bool = False


class SimTransport:
    """Hosts that caption in random order and die as the test says (see the module doc)."""

    waiting_hint = ""

    def __init__(
        self,
        clock: Clock,
        seed: int,
        poison: set[str] = frozenset(),  # type: ignore[assignment]
        death_rate: float = 0.0,
        freeze_once: set[int] = frozenset(),  # type: ignore[assignment]
        start_fails: set[int] = frozenset(),  # type: ignore[assignment]
        start_crashes: set[int] = frozenset(),  # type: ignore[assignment]
        appetite: int = 4,
    ) -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.poison = poison
        self.death_rate = death_rate
        self.freeze_once = set(freeze_once)
        self.start_fails = start_fails
        self.start_crashes = start_crashes
        self.appetite = appetite
        self.starts: Counter[int] = Counter()
        self.kills = 0
        self.most_held = 0  # the most images one host held at once

    def start(self, slot: Slot) -> None:
        self.starts[slot.index] += 1
        slot.handle = SimHost(slot.index, self.appetite)

    def send(self, slot: Slot, message: Message) -> bool:
        if not slot.alive:
            return False
        slot.handle.inbox.append(message)
        return True

    def kill(self, slot: Slot) -> None:
        if slot.handle is not None:
            self.kills += 1
        slot.handle, slot.ready = None, False

    def receive(self, slots: list[Slot], timeout: float) -> Iterator[tuple[Slot, Message]]:
        self.clock.now += timeout
        live = [slot for slot in slots if slot.alive]
        self.rng.shuffle(live)
        for slot in live:
            if slot.alive:
                yield from ((slot, message) for message in self._step(slot, slot.handle))

    def _step(self, slot: Slot, host: SimHost) -> list[Message]:
        if not host.started:
            host.started = True
            if host.index in self.start_fails:
                return [("start_failed", "no device"), ("exit", False, "exit code 1")]
            if host.index in self.start_crashes:
                return [("crashed", "CUDA error"), ("exit", False, "exit code 1")]
            return [("ready", "sim", host.appetite, 1000 + host.index)]
        for message in host.inbox:
            if message[0] == "unit":
                host.held.extend(message[2])
            else:
                host.ended = message[0]
        host.inbox.clear()
        self.most_held = max(self.most_held, len(host.held))
        if host.frozen:
            return []
        if host.index in self.freeze_once and host.held:
            self.freeze_once.discard(host.index)
            host.frozen = True
            return []
        if host.ended == "stop":
            return [("bye",), ("exit", True, "exit code 0")]
        out: list[Message] = []
        self.rng.shuffle(host.held)
        for _ in range(self.rng.randint(0, len(host.held))):
            sample = host.held.pop()
            if sample.key in self.poison or self.rng.random() < self.death_rate:
                return out + [("exit", False, "signal SIGKILL")]
            out.append(("row", {"key": sample.key, "status": "ok", "error": None, "output_tokens": 1}))
        if self.rng.random() < 0.5:
            out.append(("beat",))
        if host.ended == "end" and not host.held:
            out += [("bye",), ("exit", True, "exit code 0")]
        return out


class StoppingSink(ListSink):
    """A sink that sees a SIGTERM arrive once it holds `after` rows."""

    def __init__(self, stopper: Stopper, after: int) -> None:
        super().__init__()
        self.stopper = stopper
        self.after = after

    def add(self, row: dict[str, Any]) -> None:
        super().add(row)
        if len(self.rows) == self.after:
            self.stopper.reason = StopReason.SIGTERM


def samples(count: int) -> list[Sample]:
    return [Sample(key=f"img{number:04d}.jpg", source=f"/in/img{number:04d}.jpg") for number in range(count)]


def make_job(sink: ListSink, items: list[Sample], stopper: Stopper | None = None, **settings: Any) -> CaptionJob:
    plan = SimpleNamespace(shards=[], manifests=[], listed=SimpleNamespace(todo=items), limit=None)
    run_settings = CaptionSettings(inputs=("in",), output="out.parquet", output_format="parquet", progress=False, **settings)
    return CaptionJob(
        settings=run_settings,
        spec=None,  # type: ignore[arg-type]  # never read by the loop
        decode=None,  # type: ignore[arg-type]
        facts=ModelFacts(),
        plan=plan,  # type: ignore[arg-type]
        samples=iter(items),
        sink=sink,  # type: ignore[arg-type]
        stopper=stopper or Stopper(),
    )


def run_fleet(transport: SimTransport, clock: Clock, items: list[Sample], engines: int, **settings: Any) -> ListSink:
    sink = ListSink()
    slots = [Slot(index, f"engine {index}", EngineStats(index, None)) for index in range(engines)]
    Fleet(make_job(sink, items, **settings), transport, slots, clock=clock).run()
    return sink


# -- the fleet loop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_every_key_once_under_random_deaths_and_orders(seed: int) -> None:
    """Hosts die at random moments while holding images, rows come in random order: every key ends
    with exactly one row. An image that kills every engine is an `engine` row; without random deaths
    it is the only error (a random death while a suspect runs alone looks the same as the image's)."""
    clock = Clock()
    rng = random.Random(seed)
    items = samples(rng.randint(1, 120))
    poison = {items[rng.randrange(len(items))].key} if seed % 3 == 0 else set()
    death_rate = 0.01 * (seed % 4)
    transport = SimTransport(clock, seed, poison=poison, death_rate=death_rate)
    sink = run_fleet(transport, clock, items, engines=rng.randint(1, 4))
    assert sink.keys() == Counter(sample.key for sample in items)
    errors = {row["key"] for row in sink.rows if row["status"] == "error"}
    assert poison <= errors
    if not death_rate:
        assert errors == poison
    assert all(error_kind_of(row) == "engine" for row in sink.rows if row["key"] in errors)


def test_an_engine_is_kept_supplied_with_its_whole_appetite() -> None:
    """A host that says it takes 300 images in at once (a vLLM engine's batch on a big GPU) is handed
    that many, plus its reserve unit, whatever transport reaches it: units never cap its batch."""
    clock = Clock()
    items = samples(2000)
    transport = SimTransport(clock, 7, appetite=300)
    sink = run_fleet(transport, clock, items, engines=1)
    assert sink.keys() == Counter(sample.key for sample in items)
    assert 300 <= transport.most_held < 300 + 2 * 32  # units are whole: the last one may pass it by less than one


def test_an_image_that_kills_every_engine_is_isolated_as_one_engine_row() -> None:
    clock = Clock()
    items = samples(64)
    poison = {items[37].key}
    transport = SimTransport(clock, 1, poison=poison)
    sink = run_fleet(transport, clock, items, engines=2)
    assert sink.keys() == Counter(sample.key for sample in items)
    assert [row["key"] for row in sink.rows if row["status"] == "error"] == [items[37].key]
    # Restarts: every death of a suspect running alone is the image's fault, so no engine is dropped.
    assert sum(transport.starts.values()) > 2


def test_a_frozen_host_is_killed_after_the_stall_timeout_and_its_images_redone() -> None:
    clock = Clock()
    items = samples(40)
    transport = SimTransport(clock, 2, freeze_once={0})
    sink = run_fleet(transport, clock, items, engines=2, stall_timeout=30.0)
    assert sink.keys() == Counter(sample.key for sample in items)
    assert transport.starts[0] == 2  # replaced once
    assert transport.kills >= 1


def test_an_engine_that_cannot_start_is_dropped_and_the_others_caption_everything() -> None:
    clock = Clock()
    items = samples(30)
    transport = SimTransport(clock, 3, start_fails={1})
    sink = run_fleet(transport, clock, items, engines=2)
    assert sink.keys() == Counter(sample.key for sample in items)
    assert transport.starts[1] == 1


def test_no_engine_left_fails_the_run_with_the_reason() -> None:
    clock = Clock()
    transport = SimTransport(clock, 4, start_fails={0, 1})
    with pytest.raises(EngineStartError, match="no device"):
        run_fleet(transport, clock, samples(5), engines=2)


def test_an_engine_that_keeps_dying_without_a_row_is_dropped() -> None:
    """Each death of an engine that had not captioned anything counts; after MAX_FAILURES it is left
    out while the other engine captions everything; with no engine left, the run fails."""
    clock = Clock()
    items = samples(30)
    transport = SimTransport(clock, 5, start_crashes={0})
    sink = run_fleet(transport, clock, items, engines=2)
    assert sink.keys() == Counter(sample.key for sample in items)
    assert transport.starts[0] <= MAX_FAILURES  # never started again after its last allowed death
    alone = SimTransport(clock, 5, start_crashes={0})
    with pytest.raises(EngineStartError, match="every engine failed repeatedly"):
        run_fleet(alone, clock, samples(10), engines=1)
    assert alone.starts[0] == MAX_FAILURES


def test_a_stop_drains_what_hosts_finished_and_leaves_the_rest() -> None:
    """A signal after the first rows: no more units, hosts stop, every row that came is kept once,
    and nothing is written for images without a row."""
    clock = Clock()
    items = samples(200)
    stopper = Stopper()
    transport = SimTransport(clock, 6)
    sink = StoppingSink(stopper, after=20)
    slots = [Slot(index, f"engine {index}", EngineStats(index, None)) for index in range(2)]
    Fleet(make_job(sink, items, stopper), transport, slots, clock=clock).run()
    keys = sink.keys()
    assert 20 <= len(keys) < len(items)
    assert max(keys.values()) == 1


# -- the unit queue --------------------------------------------------------------------------------------


def test_suspects_run_alone_and_split_until_one_image_is_an_engine_row() -> None:
    sink = ListSink()
    items = samples(8)
    queue = UnitQueue(iter(items), CaptionSettings(inputs=("in",), output="o.parquet", output_format="parquet"), sink, 8)
    holder = object()
    unit = queue.take([])
    assert unit is not None and len(unit.remaining) == 8
    queue.hand(holder, unit)
    queue.give_back([unit], died=True)  # a death: the unit's images are suspects
    deaths = 0
    while (suspect := queue.take([])) is not None:
        assert suspect.suspect
        assert queue.take([suspect]) is None  # a suspect runs alone
        queue.hand(holder, suspect)
        if items[5].key in suspect.remaining:
            deaths += 1
            queue.give_back([suspect], died=True)
        else:
            for key in list(suspect.remaining):
                assert queue.accept(holder, key) is suspect
    assert not queue.work_left()
    assert [row["key"] for row in sink.rows] == [items[5].key]
    assert error_kind_of(sink.rows[0]) == "engine"
    assert deaths == 4  # 8 -> 4 -> 2 -> 1 alone -> row


def test_a_row_from_a_holder_given_up_on_is_refused() -> None:
    items = samples(4)
    queue = UnitQueue(iter(items), CaptionSettings(inputs=("in",), output="o.parquet", output_format="parquet"), ListSink(), 4)
    first, second = object(), object()
    unit = queue.take([])
    assert unit is not None
    queue.hand(first, unit)
    queue.give_back([unit], died=False)
    again = queue.take([])
    assert again is unit
    queue.hand(second, again)
    assert queue.accept(first, items[0].key) is None
    assert queue.accept(second, items[0].key) is unit
    assert queue.accept(second, items[0].key) is None  # once
