"""Read inputs ahead of the engine on a background thread.

A remote tar shard arrives at network speed and a manifest is parsed line by line; done on the
engine's thread, every stall there would idle the GPU. A bounded queue keeps a few dozen samples
ready, so memory stays flat however large the shard.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class Prefetcher(Iterator[T]):
    """Iterates `items` on a daemon thread, up to `size` items ahead of the consumer."""

    def __init__(self, items: Iterator[T], size: int = 64) -> None:
        self._items = items
        self._queue: queue.Queue[object] = queue.Queue(maxsize=size)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="caprl-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised where the items are used
            if self._put(_Raised(exc)):
                self._put(_END)
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stopped.is_set() and not self._thread.is_alive():
                    raise StopIteration from None
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            raise StopIteration
        if isinstance(item, _Raised):
            raise item.error
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop reading ahead (the reader thread ends at its next item); what was read ahead can still
        be taken, then iteration ends."""
        self._stopped.set()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error
