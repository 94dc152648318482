"""An engine worker: one engine and its own decode pool in a process of its own, fed by the parent.

The parent (`execute.multi`) starts one worker per engine with the spawn method, after putting the
engine's `CUDA_VISIBLE_DEVICES` (and cache folders of its own) in the environment, so torch and vLLM,
imported only here, see just that engine's GPUs. A worker shows in `ps` as `caprl engine <n>`, dies
with the parent, and leaves SIGINT and SIGTERM to the parent, which decides how the run stops.

Conversation over one pipe (tuples, first item the message name):

    parent -> worker:  ("unit", unit_id, [Sample, ...])   work
                       ("end",)                           no more work: finish and exit
                       ("stop",)                          abort what is in flight and exit
    worker -> parent:  ("ready", version, appetite)       loaded; keep `appetite` images in hand
                       ("start_failed", message)          the engine cannot start here
                       ("row", row)                       one finished row (caption or error)
                       ("beat",)                          the engine loop is alive (at most 1/s)
                       ("crashed", message)               an exception ends the worker
                       ("bye",)                           ended as told

The parent keeps each worker supplied with about as many images as its engine and decode pool take in
at once (its appetite) plus one unit, so the engine never waits on the parent, while a slow engine,
holding fewer finished rows, is given fewer units.

Test hooks, honoured only in engine workers (for the crash tests, never set them in production):
`CAPRL_TEST_ENGINE_CRASH=<text>` makes the worker exit abruptly (`os._exit`) when an image whose key
contains <text> reaches its engine; `CAPRL_TEST_ENGINE_DELAY=<n>:<seconds>` makes engine <n> (`*`: every
engine) wait that long before each image (a slow GPU).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from caprl_cli.engines.base import EngineSpec, ImageRequest
from caprl_cli.errors import EngineStartError
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.rows import Row
from caprl_cli.prepare.grid import Grid
from caprl_cli.settings import CaptionSettings

log = logging.getLogger("caprl")

CRASH_ENV = "CAPRL_TEST_ENGINE_CRASH"
DELAY_ENV = "CAPRL_TEST_ENGINE_DELAY"
CRASH_EXIT_CODE = 70
BEAT_INTERVAL_S = 1.0
# How long a worker with images in flight waits for its reserve unit before letting its engine finish
# what it holds (it then waits for the next unit with nothing in flight).
_RESERVE_WAIT_S = 0.1
_PR_SET_PDEATHSIG = 1
# The parent-death signal of a worker: caught, to end the worker's whole process group.
_PARENT_DIED = signal.SIGUSR1
_WATCH_PARENT_S = 0.5
_PR_SET_NAME = 15


@dataclass(frozen=True)
class WorkerConfig:
    """What one engine worker needs: the run's settings, the engine to load (weights already resolved
    to a local folder by the parent), the model's grid for its decode pool, and its own sizes."""

    index: int
    settings: CaptionSettings
    spec: EngineSpec
    grid: Grid
    decode_workers: int
    keep_images: bool
    parent_pid: int


def process_title(index: int) -> str:
    return f"caprl engine {index}"


def become_engine_process(index: int, parent_pid: int) -> None:
    """Name this process `caprl engine <n>`, die with the parent (and take everything it started
    along), leave signals to the parent.

    The worker leads a process group of its own, which its engine core (vLLM runs it in a process of
    its own on GPUs), that one's workers and the decode workers join. Its death is the end of the whole
    group: when the parent dies (the kernel's parent-death signal, and a thread that watches for it in
    case the main thread is inside a long native call), and when the parent kills it
    (`end_engine_process`). Killing the worker alone would orphan an engine core that holds the GPU.
    """
    title = process_title(index)
    try:
        import setproctitle  # installed with vLLM; optional

        setproctitle.setproctitle(title)
    except ImportError:
        pass
    os.setpgid(0, 0)
    signal.signal(_PARENT_DIED, _end_own_group)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)  # what `ps -o comm` and /proc/<pid>/comm show
            libc.prctl(_PR_SET_PDEATHSIG, _PARENT_DIED, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="caprl-engine-watch", daemon=True).start()
    # Ctrl-C reaches the whole process group and a scheduler may signal it too: the parent decides
    # how the run stops and tells this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _end_own_group(*_: object) -> None:
    """The parent is gone: end this worker and every process it started, at once."""
    os.killpg(0, signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_PARENT_S)
    _end_own_group()


def end_engine_process(pid: int, alive: bool) -> None:
    """SIGKILL an engine worker and whatever it started (its process group, which outlives a worker that
    died by itself while its engine core or decode workers still run). `alive`: the worker itself has not
    been reaped yet, so its pid is still its own (it may not lead its group yet)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ParentLink:
    """The worker's end of the pipe: sends from any thread, receives on a thread of its own, so the
    engine loop only ever looks at a queue and a stop flag."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.units: queue.Queue[tuple[int, list[Sample]] | None] = queue.Queue()
        self.stopping = threading.Event()
        self._send_lock = threading.Lock()
        self._last_beat = 0.0
        threading.Thread(target=self._receive, name="caprl-engine-inbox", daemon=True).start()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= BEAT_INTERVAL_S:
            self._last_beat = now
            self.send(("beat",))

    def should_stop(self) -> bool:
        """Polled by the engine at every step: also the heartbeat that proves the loop is alive."""
        self.beat()
        return self.stopping.is_set()

    def _receive(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: PR_SET_PDEATHSIG ends us too
                message = ("stop",)
            if message[0] == "unit":
                self.units.put((message[1], message[2]))
                continue
            if message[0] == "stop":
                self.stopping.set()
            self.units.put(None)  # "end" or "stop": no more units
            return

    def next_unit(self, timeout: float | None) -> tuple[int, list[Sample]] | None | bool:
        """The next unit; None when there is no more work; False when none came within `timeout`."""
        try:
            return self.units.get(timeout=timeout)
        except queue.Empty:
            return False


class Feed:
    """The samples of the units this worker is given, one engine pass at a time. A pass goes on from
    unit to unit while the reserve unit is there; when it is not (the parent has none to give now), the
    pass ends, so the engine finishes what it holds instead of waiting on the parent with images in
    flight, and the worker then waits for the next unit with nothing in flight."""

    def __init__(self, link: ParentLink) -> None:
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


def engine_requests(
    requests: Iterator[ImageRequest], index: int, environ: dict[str, str]
) -> Iterator[ImageRequest]:
    """`requests` with the test hooks applied (see the module doc); unchanged when they are unset."""
    crash_on = environ.get(CRASH_ENV) or None
    delay = 0.0
    engine, _, seconds = environ.get(DELAY_ENV, "").partition(":")
    engine = engine.strip()
    if engine == "*" or (engine.isdigit() and int(engine) == index):
        delay = float(seconds or 0)
    if crash_on is None and not delay:
        yield from requests
        return
    for request in requests:
        if crash_on is not None and crash_on in request.key:
            os._exit(CRASH_EXIT_CODE)
        if delay:
            time.sleep(delay)
        yield request


class _RowsToParent:
    """The worker's row sink: each row goes straight to the parent, which alone writes parts."""

    def __init__(self, link: ParentLink) -> None:
        self.link = link

    def add(self, row: Row) -> None:
        self.link.send(("row", row))


def decode_pool(config: WorkerConfig) -> Any:
    """This engine's own decode pool, sized from the cores per engine."""
    from caprl_cli.prepare.pool import Preprocessor

    settings = config.settings
    return Preprocessor(
        config.grid,
        settings.max_image_pixels,
        config.decode_workers,
        keep_bytes=config.keep_images,
        storage_options=settings.storage_options,
        retries=settings.retries,
        **{name: getattr(settings, name) for name in ("decode_timeout", "max_image_bytes") if hasattr(settings, name)},
    )


def appetite(engine: Any, preprocessor: Any) -> int:
    """Images the engine and its decode pool take in before the first row comes out."""
    engine_share = getattr(engine, "max_in_flight", None) or getattr(engine, "batch_size", None) or 8
    return int(engine_share) + (preprocessor.window if preprocessor.workers > 0 else 0)


def run_worker(config: WorkerConfig, conn: Connection) -> None:
    """The worker process: load the engine, then caption units until told to end or stop."""
    become_engine_process(config.index, config.parent_pid)
    from caprl_cli.verbosity import apply_in_child

    apply_in_child()  # -q/-v/-vv as the parent was given, before torch or vLLM is imported here
    from caprl_cli.execute.local import image_requests, images_only, result_row, start_engine

    link = ParentLink(conn)
    try:
        engine = start_engine(config.settings, config.spec)
    except EngineStartError as exc:
        link.send(("start_failed", str(exc)))
        os._exit(1)
    preprocessor = decode_pool(config)
    link.send(("ready", engine.version, appetite(engine, preprocessor)))
    feed = Feed(link)
    sink = _RowsToParent(link)
    model = config.settings.model
    environ = dict(os.environ)
    try:
        while not feed.finished and not link.stopping.is_set():
            first = link.next_unit(timeout=None)
            if not first:  # None: no more work
                break
            waiting: dict[str, Any] = {}
            outcomes = preprocessor.prepare(feed.samples(first[1]), should_stop=link.should_stop)
            prepared = images_only(outcomes, sink, model, link.should_stop)  # type: ignore[arg-type]
            requests = engine_requests(image_requests(prepared, waiting), config.index, environ)
            for key, caption in engine.caption(requests, link.should_stop):
                sink.add(result_row(waiting.pop(key), caption, model, config.keep_images))
    finally:
        preprocessor.close()
        engine.close()
    link.send(("bye",))


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    """Process entry point: any failure after loading ends the process with a non-zero code, which the
    parent treats like a crash (its unfinished images go back on the queue)."""
    try:
        run_worker(config, conn)
    except BaseException as exc:
        try:
            conn.send(("crashed", f"{type(exc).__name__}: {exc}"))
        except Exception:
            pass
        os._exit(1)
    os._exit(0)
