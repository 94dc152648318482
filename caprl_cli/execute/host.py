"""The engine side of a slot: one engine and its own decode pool, fed units by the driver.

The same code runs in an engine worker process (`execute.process`) and in a Ray actor
(`execute.ray_transport`); only how messages move differs, and that is the `EngineLink`'s job. A host
reads and prepares the images it captions with the same pool, `--decode-timeout`, `--max-image-bytes`,
crash isolation and completion order as a local engine, and streams each row back as it finishes.

Conversation (tuples, first item the message name):

    driver -> host:  ("unit", unit_id, [Sample, ...])   work
                     ("end",)                           no more work: finish and leave
                     ("stop",)                          abort what is in flight and leave
    host -> driver:  ("ready", version, appetite, pid)  loaded; keep `appetite` images in its hands
                     ("start_failed", message)          the engine cannot start here
                     ("row", row)                       one finished row (caption or error)
                     ("beat",)                          the engine loop is alive (at most 1/s)
                     ("crashed", message)               an exception ends the host
                     ("bye",)                           ended as told

The driver keeps each host supplied with about as many images as its engine and decode pool take in
at once (its appetite) plus one unit, so the engine never waits on the driver, while a slow engine,
holding fewer finished rows, is given fewer units.

Test hooks, honoured only in engine hosts (for the crash tests, never set them in production):
`CAPRL_TEST_ENGINE_CRASH=<text>` makes the host's process exit abruptly (`os._exit`) when an image whose
key contains <text> reaches its engine; `CAPRL_TEST_ENGINE_DELAY=<n>:<seconds>` makes engine <n> (`*`:
every engine) wait that long before each image (a slow GPU). The decode pool's own hooks
(`prepare.workers`) reach the host's decode workers too.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from caprl_cli.engines import start_engine
from caprl_cli.engines.base import Engine, ImageRequest
from caprl_cli.errors import EngineStartError
from caprl_cli.execute.job import HostConfig
from caprl_cli.execute.stream import RequestFilter, caption_stream
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.rows import Row

log = logging.getLogger("caprl")

CRASH_ENV = "CAPRL_TEST_ENGINE_CRASH"
DELAY_ENV = "CAPRL_TEST_ENGINE_DELAY"
CRASH_EXIT_CODE = 70
BEAT_INTERVAL_S = 1.0
# How long a host with images in flight waits for its reserve unit before letting its engine finish
# what it holds (it then waits for the next unit with nothing in flight).
_RESERVE_WAIT_S = 0.1

Message = tuple[Any, ...]


class EngineLink:
    """The host's end of its conversation with the driver: `send` goes out through the transport (a
    pipe, an actor's outbox) from any thread; what arrives is `deliver`ed here, so the engine loop only
    ever looks at a queue and a stop flag."""

    def __init__(self, send: Callable[[Message], None]) -> None:
        self._send = send
        self.units: queue.Queue[tuple[int, list[Sample]] | None] = queue.Queue()
        self.stopping = threading.Event()
        self._send_lock = threading.Lock()
        self._last_beat = 0.0
        self._closed = False

    def send(self, message: Message) -> None:
        with self._send_lock:
            self._send(message)

    def deliver(self, message: Message) -> None:
        """A message from the driver (or ("stop",) when the driver is gone)."""
        if self._closed:
            return
        if message[0] == "unit":
            self.units.put((message[1], message[2]))
            return
        if message[0] == "stop":
            self.stopping.set()
        self._closed = True
        self.units.put(None)  # "end" or "stop": no more units

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= BEAT_INTERVAL_S:
            self._last_beat = now
            self.send(("beat",))

    def should_stop(self) -> bool:
        """Polled by the engine at every step: also the heartbeat that proves the loop is alive."""
        self.beat()
        return self.stopping.is_set()

    def next_unit(self, timeout: float | None) -> tuple[int, list[Sample]] | None | bool:
        """The next unit; None when there is no more work; False when none came within `timeout`."""
        try:
            return self.units.get(timeout=timeout)
        except queue.Empty:
            return False


class Feed:
    """The samples of the units this host is given, one engine pass at a time. A pass goes on from
    unit to unit while the reserve unit is there; when it is not (the driver has none to give now), the
    pass ends, so the engine finishes what it holds instead of waiting on the driver with images in
    flight, and the host then waits for the next unit with nothing in flight."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self.finished = False

    def samples(self, first: list[Sample]) -> Iterator[Sample]:
        unit: list[Sample] | None = first
        while unit is not None:
            yield from unit
            unit = None
            if self.link.stopping.is_set():
                return
            nxt = self.link.next_unit(timeout=_RESERVE_WAIT_S)
            if nxt is None:
                self.finished = True
            elif nxt is not False:
                unit = nxt[1]


class _RowsToDriver:
    """The host's sink: each row goes straight to the driver, which alone writes parts."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link

    def add(self, row: Row) -> None:
        self.link.send(("row", row))


def serve(config: HostConfig, link: EngineLink) -> bool:
    """The host's whole life: load the engine, then caption units until told to end or stop. True when
    it ended as told ("bye" sent), False when its engine could not start ("start_failed" sent);
    anything else raises."""
    from caprl_cli.prepare.pool import Preprocessor

    try:
        engine = start_engine(config.engine, host_spec(config))
    except EngineStartError as exc:
        link.send(("start_failed", str(exc)))
        return False
    preprocessor = Preprocessor(config.decode, config.decode_workers)
    link.send(("ready", engine.version, appetite(engine, preprocessor), os.getpid()))
    feed = Feed(link)
    sink = _RowsToDriver(link)
    hooks = engine_test_hooks(config.index, dict(os.environ))
    try:
        while not feed.finished and not link.stopping.is_set():
            first = link.next_unit(timeout=None)
            if not first:  # None: no more work
                break
            outcomes = preprocessor.prepare(feed.samples(first[1]), should_stop=link.should_stop)
            caption_stream(engine, outcomes, sink, config.model, config.decode.keep_bytes, link.should_stop, hooks)
    finally:
        preprocessor.close()
        engine.close()
    link.send(("bye",))
    return True


def host_spec(config: HostConfig) -> Any:
    """The engine spec, with the weights fetched here when this machine lacks the driver's folder
    (another node of a cluster); an HTTP engine's server holds its weights."""
    spec = config.spec
    if config.engine == "openai" or Path(spec.model_path).exists():
        return spec
    from caprl_cli.model.source import resolve_model

    return replace(spec, model_path=resolve_model(config.model, config.revision).path)


def appetite(engine: Engine, preprocessor: Any) -> int:
    """Images the engine and its decode pool take in before the first row comes out."""
    return int(engine.max_in_flight) + (preprocessor.window if preprocessor.workers > 0 else 0)


def engine_test_hooks(index: int, environ: dict[str, str]) -> RequestFilter | None:
    """The engine hosts' test hooks (see the module doc) as a request filter; None when unset."""
    crash_on = environ.get(CRASH_ENV) or None
    delay = 0.0
    engine, _, seconds = environ.get(DELAY_ENV, "").partition(":")
    engine = engine.strip()
    if engine == "*" or (engine.isdigit() and int(engine) == index):
        delay = float(seconds or 0)
    if crash_on is None and not delay:
        return None

    def apply(requests: Iterator[ImageRequest]) -> Iterator[ImageRequest]:
        for request in requests:
            if crash_on is not None and crash_on in request.key:
                os._exit(CRASH_EXIT_CODE)
            if delay:
                time.sleep(delay)
            yield request

    return apply
