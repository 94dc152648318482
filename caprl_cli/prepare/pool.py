"""Decode and resize images in a pool of worker processes, ahead of the engine, with bounded memory.

The engine must never wait on JPEG decoding, and a million-image listing must never be turned into a
million pending tasks: a fixed window of images is in flight at once, results come back in input
order. Every failure comes back as a `Failed` value, never as an exception.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

from PIL import Image

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.prepare.grid import Grid
from caprl_cli.prepare.images import prepare_image
from caprl_cli.inputs.retry import DEFAULT_RETRIES, is_transient, with_retries
from caprl_cli.inputs.sample import Sample
from caprl_cli.storage import StorageOptions, is_process_local, is_url, read_bytes, redact


@dataclass(frozen=True)
class Prepared:
    """An image ready for the engine: model-sized RGB pixels plus its original size."""

    sample: Sample
    image: Image.Image
    width: int
    height: int


@dataclass(frozen=True)
class Failed:
    """An image that will become an error row."""

    sample: Sample
    kind: ErrorKind
    message: str
    width: int | None = None
    height: int | None = None


Outcome = Prepared | Failed


def read_sample_bytes(
    sample: Sample, storage_options: StorageOptions | None = None, retries: int = DEFAULT_RETRIES
) -> bytes:
    """The encoded image: in memory already, or read from its path or URL. A URL that fails
    transiently is tried `retries` more times; if it still fails the sample is UNAVAILABLE (tried
    again by the next run), not READ. Local files are read once."""
    if sample.data is not None:
        return sample.data
    if sample.path is None:
        raise SampleError(ErrorKind.READ, "sample has neither bytes nor a path")
    path = sample.path
    try:
        if is_url(path):
            return with_retries(lambda: read_bytes(path, storage_options), retries)
        with open(path, "rb") as handle:
            return handle.read()
    except Exception as exc:
        if is_url(path) and is_transient(exc):
            raise SampleError(
                ErrorKind.UNAVAILABLE, redact(f"cannot read {path} (tried {retries + 1} times): {_described(exc)}")
            ) from None
        if not isinstance(exc, OSError):  # remote backends raise their own types (HTTP errors)
            raise SampleError(ErrorKind.READ, redact(f"cannot read {path}: {type(exc).__name__}: {exc}")) from None
        detail = exc.strerror or exc
        raise SampleError(ErrorKind.READ, redact(f"cannot read {path}: {detail}")) from None


def _described(exc: BaseException) -> str:
    """The exception and, when a backend wrapped it (fsspec turns a 503 into FileNotFoundError), its
    cause: the 503 is what the user needs to see."""
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    return text if cause is None else f"{text} ({type(cause).__name__}: {cause})"


def prepare_sample(
    sample: Sample,
    grid: Grid,
    max_image_pixels: int,
    keep_bytes: bool = False,
    storage_options: StorageOptions | None = None,
    retries: int = DEFAULT_RETRIES,
) -> Outcome:
    """Read, decode and resize one sample; any failure becomes `Failed`.

    The encoded bytes come back with the result only when `keep_bytes` (WebDataset output stores the
    original image); otherwise they are dropped here so they never cross back to the parent.
    """
    if sample.error_kind is not None:
        return Failed(sample, sample.error_kind, sample.error_message or "")
    try:
        data = read_sample_bytes(sample, storage_options, retries)
        pixels = prepare_image(data, grid, max_image_pixels)
    except SampleError as exc:
        return Failed(_without_bytes(sample), exc.kind, exc.message)
    except Exception as exc:  # a decoder bug must cost one row, not the run
        return Failed(_without_bytes(sample), ErrorKind.DECODE, f"{type(exc).__name__}: {exc}")
    kept = replace(sample, data=data) if keep_bytes else _without_bytes(sample)
    return Prepared(kept, pixels.image, pixels.width, pixels.height)


def _without_bytes(sample: Sample) -> Sample:
    return sample if sample.data is None else replace(sample, data=None)


_PR_SET_PDEATHSIG = 1
_worker_grid: Grid | None = None
_worker_max_image_pixels: int = 0
_worker_keep_bytes: bool = False
_worker_storage_options: StorageOptions | None = None
_worker_retries: int = DEFAULT_RETRIES


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the run: a kill -9'd parent must not leave idle decoders behind (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def _init_worker(
    grid: Grid,
    max_image_pixels: int,
    parent_pid: int,
    keep_bytes: bool,
    storage_options: StorageOptions | None,
    retries: int = DEFAULT_RETRIES,
) -> None:
    global _worker_grid, _worker_max_image_pixels, _worker_keep_bytes, _worker_storage_options, _worker_retries
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent decides how to stop, workers just go quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_grid = grid
    _worker_max_image_pixels = max_image_pixels
    _worker_keep_bytes = keep_bytes
    _worker_storage_options = storage_options
    _worker_retries = retries


def _worker_ready() -> bool:
    return _worker_grid is not None


def _prepare_in_worker(sample: Sample) -> Outcome:
    assert _worker_grid is not None, "worker not initialised"
    return prepare_sample(
        sample, _worker_grid, _worker_max_image_pixels, _worker_keep_bytes, _worker_storage_options, _worker_retries
    )


class Preprocessor:
    """Prepares samples with `workers` processes (0: in the calling process)."""

    def __init__(
        self,
        grid: Grid,
        max_image_pixels: int,
        workers: int,
        window: int | None = None,
        keep_bytes: bool = False,
        storage_options: StorageOptions | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        self.grid = grid
        self.retries = retries
        self.max_image_pixels = max_image_pixels
        self.workers = workers
        self.keep_bytes = keep_bytes
        self.storage_options = storage_options
        self.window = window or max(16, 8 * workers)
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: the parent holds an engine with threads and device handles that must not be forked.
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(
                self.grid, self.max_image_pixels, os.getpid(), self.keep_bytes, self.storage_options, self.retries
            ),
        )

    def prepare(self, samples: Iterable[Sample]) -> Iterator[Outcome]:
        """Yield one outcome per sample, in order, with at most `window` images in flight."""
        if self._pool is None:
            for sample in samples:
                yield prepare_sample(
                    sample, self.grid, self.max_image_pixels, self.keep_bytes, self.storage_options, self.retries
                )
            return
        in_flight: deque[tuple[Sample, Future[Outcome]]] = deque()
        for sample in samples:
            in_flight.append((sample, self._submit(sample)))
            if len(in_flight) >= self.window:
                yield from self._collect(in_flight, keep=self.window - 1)
        yield from self._collect(in_flight, keep=0)

    def _submit(self, sample: Sample) -> Future[Outcome]:
        assert self._pool is not None
        # Broken before decoding, or in a memory:// filesystem no worker process can see: done here.
        if sample.error_kind is not None or (sample.path is not None and is_process_local(sample.path)):
            known: Future[Outcome] = Future()
            known.set_result(
                prepare_sample(
                    sample, self.grid, self.max_image_pixels, self.keep_bytes, self.storage_options, self.retries
                )
            )
            return known
        return self._pool.submit(_prepare_in_worker, sample)

    def _collect(self, in_flight: deque[tuple[Sample, Future[Outcome]]], keep: int) -> Iterator[Outcome]:
        """Yield finished outcomes from the front until `keep` remain in flight.

        When a worker dies (a decoder crash), every future of the pool fails and which sample killed it
        is unknown: the pool is replaced once and each sample that was in flight is retried alone.
        """
        while len(in_flight) > keep:
            sample, future = in_flight.popleft()
            try:
                yield future.result()
            except (BrokenProcessPool, CancelledError):
                retry = [sample, *(waiting for waiting, _ in in_flight)]
                in_flight.clear()
                self._replace_pool()
                for suspect in retry:
                    yield self._prepare_alone(suspect)

    def _prepare_alone(self, sample: Sample) -> Outcome:
        try:
            return self._submit(sample).result()
        except (BrokenProcessPool, CancelledError):
            self._replace_pool()
            return Failed(sample, ErrorKind.DECODE, "the image decoder crashed on this file")

    def _replace_pool(self) -> None:
        """A fresh pool after a crash. If even a fresh pool cannot run a no-op, the workers cannot
        start at all (a broken environment): that fails the run instead of making every image a
        decode error row that only --retry-errors would undo."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        try:
            self._pool.submit(_worker_ready).result()
        except (BrokenProcessPool, CancelledError) as exc:
            raise RuntimeError(f"image decoding workers cannot start: {exc}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
