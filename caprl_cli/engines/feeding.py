"""Requests pulled ahead of a stepping engine, so waiting for input never stalls the batch.

An engine that steps a running batch (vLLM) must not wait inside `next()` on its request iterator:
while one image is still being fetched or decoded, every running sequence would sit idle. A `Feeder`
pulls from the iterator on a thread of its own into a small bounded queue; the engine takes whatever
is ready without waiting while it has work, and waits (briefly, so it can notice a stop) only when it
has none. An exception raised by the iterator is handed over and raised again in the engine's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# How long a closing engine waits for the feeding thread to leave the iterator (it may be inside a
# slow read or decode, which the iterator's own stop check or timeout ends).
_JOIN_TIMEOUT_S = 5.0
_PUT_POLL_S = 0.1


class Nothing:
    """No request is ready (yet)."""


class Ended:
    """The iterator is exhausted: no request will come any more."""


NOTHING = Nothing()
ENDED = Ended()


@dataclass(frozen=True)
class _Raised:
    error: BaseException


class Feeder(Generic[T]):
    """Pulls `items` on a background thread into a queue of at most `capacity` entries."""

    def __init__(self, items: Iterable[T], capacity: int, name: str = "caprl-feeder") -> None:
        self._items = items
        self._queue: queue.Queue[T | Ended | _Raised] = queue.Queue(maxsize=max(1, capacity))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pull, name=name, daemon=True)
        self._thread.start()

    def take(self, timeout: float | None = None) -> T | Nothing | Ended:
        """The next request: at once when `timeout` is None (NOTHING when none is ready), else waiting
        up to `timeout` seconds for one. ENDED once the iterator is exhausted; re-raises its error."""
        try:
            entry = self._queue.get_nowait() if timeout is None else self._queue.get(timeout=timeout)
        except queue.Empty:
            return NOTHING
        if isinstance(entry, _Raised):
            self._closed.set()
            raise entry.error
        if isinstance(entry, Ended):
            self._closed.set()
        return entry

    def close(self) -> None:
        """Stop pulling; wait a bounded time for the thread to leave the iterator. What it still holds
        is dropped (a stopped engine's unfinished images are captioned by a later run)."""
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=_JOIN_TIMEOUT_S)

    def _pull(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the engine's thread, which raises it
            self._put(_Raised(exc))
            return
        self._put(ENDED)

    def _put(self, entry: T | Ended | _Raised) -> bool:
        """Queue `entry`, waiting while the queue is full; False once closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False
