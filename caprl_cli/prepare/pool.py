"""Decode and resize images in worker processes, ahead of the engine, with bounded memory.

The engine must never wait on JPEG decoding, a million-image listing must never become a million
pending tasks, and nothing in a corpus may abort or hang the run:

- a fixed window of images is in flight at once, and outcomes come back as they finish, so one slow
  image (a huge TIFF, a slow URL) never holds back the ones behind it;
- a worker that dies (segfault, `kill -9`, the OOM killer) costs at most the image it was on: the
  worker is replaced and that image is tried again in a fresh worker; an image that kills a worker
  twice becomes a `decode` error row;
- an image whose read and decode pass `decode_timeout` becomes a `timeout` error row, and its worker
  is killed and replaced;
- every failure comes back as a `Failed` value, never as an exception; and a wait on the workers
  longer than a few seconds says, with `-v`, which images it waits for.

The workers themselves, and their test hooks, are in `prepare.workers`.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait

from caprl_cli.errors import DecodeWorkersError, ErrorKind
from caprl_cli.defaults import DEFAULT_RETRIES
from caprl_cli.inputs.sample import DEFAULT_MAX_IMAGE_BYTES, Sample
from caprl_cli.prepare.grid import Grid
from caprl_cli.prepare.outcomes import (
    DecodeSettings,
    Failed,
    Outcome,
    Prepared,
    prepare_sample,
    prepare_with,
    without_bytes,
)
from caprl_cli.prepare.reading import read_sample_bytes
from caprl_cli.prepare.workers import READY, DecodeWorker
from caprl_cli.storage import StorageOptions, is_process_local

__all__ = ["Failed", "Outcome", "Prepared", "Preprocessor", "prepare_sample", "read_sample_bytes"]

log = logging.getLogger("caprl")

DEFAULT_DECODE_TIMEOUT = 120.0
CRASHED = "the image decoder crashed on this file"
CRASHES_ALLOWED = 1  # an image that kills a worker once is tried again; twice, it is an error row
START_FAILURES_ALLOWED = 5  # workers in a row that die before they ever start: the environment is broken
WAIT_REPORT_AFTER_S = 5.0  # a wait this long is logged (with -v), then again every WAIT_REPORT_EVERY_S
WAIT_REPORT_EVERY_S = 30.0
_STOP_CHECK_S = 0.5  # how often a wait looks at `should_stop`
_KEYS_SHOWN = 5


class Preprocessor:
    """Prepares samples with `workers` processes (0: in the calling process, with no timeout and no
    isolation from a crashing decoder)."""

    def __init__(
        self,
        grid: Grid,
        max_image_pixels: int,
        workers: int,
        window: int | None = None,
        keep_bytes: bool = False,
        storage_options: StorageOptions | None = None,
        retries: int = DEFAULT_RETRIES,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        self.settings = DecodeSettings(grid, max_image_pixels, keep_bytes, storage_options, retries, max_image_bytes)
        self.workers = workers
        self.window = window or max(16, 8 * workers)
        self.decode_timeout = decode_timeout
        self.wait_report_after_s = WAIT_REPORT_AFTER_S
        self._context = multiprocessing.get_context("spawn")
        self._pool: list[DecodeWorker] = [DecodeWorker(self._context, self.settings) for _ in range(workers)]
        self._crashes: Counter[str] = Counter()  # key -> workers it killed
        self._start_failures = 0  # workers in a row that died before they were ready

    # -- the outcomes ------------------------------------------------------------------------------

    def prepare(
        self, samples: Iterable[Sample], should_stop: Callable[[], bool] | None = None
    ) -> Iterator[Outcome]:
        """Yield one outcome per sample as each finishes, with at most `window` samples taken from
        `samples` and not yet yielded. Ends early, leaving the rest, once `should_stop()` is true."""
        if not self._pool:
            for sample in samples:
                yield prepare_with(sample, self.settings)
            return
        source = iter(samples)
        backlog: deque[Sample] = deque()  # taken from `samples`, not yet handed to a worker
        outstanding = 0  # taken from `samples`, not yet yielded
        exhausted = False
        try:
            while True:
                while not exhausted and outstanding < self.window:
                    sample = next(source, None)
                    if sample is None:
                        exhausted = True
                    elif self._in_parent(sample):
                        yield prepare_with(sample, self.settings)
                    else:
                        backlog.append(sample)
                        outstanding += 1
                if exhausted and outstanding == 0:
                    return
                self._hand_out(backlog)
                for outcome in self._next_outcomes(backlog, should_stop):
                    outstanding -= 1
                    yield outcome
                if should_stop is not None and should_stop():
                    return
        finally:
            self._abandon_held_images()

    @staticmethod
    def _in_parent(sample: Sample) -> bool:
        """Broken before decoding, or in a memory:// filesystem no worker process can see: done here."""
        return sample.error_kind is not None or (sample.path is not None and is_process_local(sample.path))

    def _hand_out(self, backlog: deque[Sample]) -> None:
        for worker in self._pool:
            if backlog and worker.idle:
                sample = backlog.popleft()
                try:
                    worker.hand(sample)
                except OSError:  # it died while idle: the image goes back, the death is seen at the next wait
                    worker.sample = None
                    backlog.appendleft(sample)

    def _next_outcomes(self, backlog: deque[Sample], should_stop: Callable[[], bool] | None) -> list[Outcome]:
        """Wait until at least one image is done, a worker dies or passes the timeout, a worker becomes
        ready for the backlog, or `should_stop()`; return the outcomes that came of it."""
        started = time.monotonic()
        reported = 0.0
        while True:
            outcomes: list[Outcome] = []
            progressed = self._wait_once(backlog, outcomes, _STOP_CHECK_S if should_stop else None)
            if outcomes or progressed or (should_stop is not None and should_stop()):
                return outcomes
            waited = time.monotonic() - started
            if waited >= self.wait_report_after_s and waited - reported >= (WAIT_REPORT_EVERY_S if reported else 0):
                reported = waited
                log.debug("waiting %.0f s for image decoding: %s", waited, self._describe_held())

    def _wait_once(self, backlog: deque[Sample], outcomes: list[Outcome], poll_s: float | None) -> bool:
        """One wait on every worker's pipe and process. True when a worker became ready for work."""
        now = time.monotonic()
        limits = [worker.since + self.decode_timeout - now for worker in self._pool if worker.sample is not None]
        timeout = min([max(0.0, limit) for limit in limits] + ([poll_s] if poll_s else []) + [self.wait_report_after_s])
        watched = {worker.conn: worker for worker in self._pool}
        watched.update({worker.process.sentinel: worker for worker in self._pool})
        ready_for_work = False
        for handle in wait(list(watched), timeout):
            worker = watched[handle]
            if worker not in self._pool:  # replaced earlier in this loop
                continue
            if handle is worker.conn and self._receive(worker, outcomes):
                ready_for_work = ready_for_work or worker.idle
                continue
            self._replace(worker, backlog, outcomes)
            ready_for_work = True
        now = time.monotonic()
        for worker in list(self._pool):
            if worker.sample is not None and now - worker.since >= self.decode_timeout:
                outcomes.append(self._timed_out(worker))
                ready_for_work = True
        return ready_for_work

    def _receive(self, worker: DecodeWorker, outcomes: list[Outcome]) -> bool:
        """Take what a worker sent; False when its pipe says it is gone."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return False
        if message == READY:
            worker.ready = True
            self._start_failures = 0
        elif worker.sample is not None:
            worker.sample = None
            outcomes.append(message)
        return True

    def _replace(self, worker: DecodeWorker, backlog: deque[Sample], outcomes: list[Outcome]) -> None:
        """A worker died: anything it sent before dying counts, the image it was on is tried again in a
        fresh worker (or, the second time it kills one, is a decode error row), and a new worker takes
        its place. Workers that keep dying before they ever start mean the environment is broken."""
        while worker.sample is not None and self._poll(worker) and self._receive(worker, outcomes):
            pass
        worker.stop()
        self._pool[self._pool.index(worker)] = DecodeWorker(self._context, self.settings)
        sample = worker.sample
        if sample is not None:
            self._crashes[sample.key] += 1
            if self._crashes[sample.key] > CRASHES_ALLOWED:
                log.warning("the image decoder crashed twice on %s: recorded as a decode error", sample.key)
                outcomes.append(Failed(without_bytes(sample), ErrorKind.DECODE, CRASHED))
            else:
                log.warning("an image decoding worker %s on %s; trying it again", worker.describe_exit(), sample.key)
                backlog.appendleft(sample)
        elif not worker.ready:
            self._start_failures += 1
            log.debug("an image decoding worker %s before it was ready; starting another", worker.describe_exit())
            if self._start_failures >= START_FAILURES_ALLOWED:
                raise DecodeWorkersError(
                    f"image decoding workers cannot start: {self._start_failures} in a row "
                    f"{worker.describe_exit()} before they were ready"
                )
        else:
            log.warning("an idle image decoding worker %s; starting another", worker.describe_exit())

    @staticmethod
    def _poll(worker: DecodeWorker) -> bool:
        try:
            return worker.conn.poll()
        except (EOFError, OSError):
            return False

    def _timed_out(self, worker: DecodeWorker) -> Failed:
        """The image a worker has held past the timeout: an error row; the worker is killed and replaced."""
        sample = worker.sample
        assert sample is not None
        worker.sample = None
        worker.process.kill()
        worker.stop()
        self._pool[self._pool.index(worker)] = DecodeWorker(self._context, self.settings)
        log.warning("reading and decoding %s took longer than %g s: its worker was stopped", sample.key, self.decode_timeout)
        return Failed(
            without_bytes(sample),
            ErrorKind.TIMEOUT,
            f"reading and decoding took longer than {self.decode_timeout:g} s (--decode-timeout); the worker was stopped",
        )

    def _describe_held(self) -> str:
        now = time.monotonic()
        held = sorted((worker for worker in self._pool if worker.sample is not None), key=lambda worker: worker.since)
        if not held:
            return "workers starting"
        shown = ", ".join(f"{worker.sample.key} ({now - worker.since:.0f} s)" for worker in held[:_KEYS_SHOWN] if worker.sample)
        more = f" and {len(held) - _KEYS_SHOWN} more" if len(held) > _KEYS_SHOWN else ""
        return shown + more

    def _abandon_held_images(self) -> None:
        """A `prepare` that ended early (a stop, a closed generator) leaves images in workers: those
        workers are replaced so a later `prepare` never receives an outcome of this one."""
        for index, worker in enumerate(self._pool):
            if worker.sample is not None:
                worker.sample = None
                worker.process.kill()
                worker.stop()
                self._pool[index] = DecodeWorker(self._context, self.settings)

    def close(self) -> None:
        """Stop every worker: idle ones leave, busy ones are killed (their images are not needed)."""
        pool, self._pool = self._pool, []
        for worker in pool:
            worker.stop()
