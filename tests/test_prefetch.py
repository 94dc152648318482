"""The read-ahead thread: same items in the same order, errors where they happened, bounded memory.

A Prefetcher must be invisible to its consumer apart from speed: every item arrives once and in order,
an exception from the source surfaces at the item where it was raised, the source is never read more
than the queue size ahead, and `close()` lets the reader thread end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from caprl_cli.inputs.prefetch import Prefetcher

# Bounds for waits that end as soon as their condition holds: generous, for a loaded machine.
JOIN_TIMEOUT = 60.0


def _wait_until(condition: Callable[[], bool], timeout: float = JOIN_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _stuck_putting(reader: Prefetcher) -> bool:
    """Whether the reader thread tries to put into its full queue at least twice from now on: it is
    waiting for room, not reading further (each try gives up after a short timeout and retries)."""
    tries = [0]
    real_put = reader._queue.put

    def counting_put(*args: object, **kwargs: object) -> None:
        tries[0] += 1
        real_put(*args, **kwargs)

    reader._queue.put = counting_put  # type: ignore[method-assign]
    try:
        return _wait_until(lambda: tries[0] >= 2 and reader._queue.full())
    finally:
        reader._queue.put = real_put  # type: ignore[method-assign]


class Counting(Iterator[int]):
    """0, 1, 2, ... (endless unless `stop`), counting how many items were taken."""

    def __init__(self, stop: int | None = None) -> None:
        self.taken = 0
        self.stop = stop

    def __next__(self) -> int:
        if self.stop is not None and self.taken >= self.stop:
            raise StopIteration
        self.taken += 1
        return self.taken - 1


def _next_within(iterator: Iterator[object], timeout: float = JOIN_TIMEOUT) -> tuple[bool, object]:
    """(finished, what next() returned or raised), run on a daemon thread so a hang cannot hang the test."""
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(next(iterator))
        except BaseException as exc:  # noqa: BLE001 - the outcome itself is what is tested
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    return (not thread.is_alive(), outcome[0] if outcome else None)


def test_order_preserved() -> None:
    """Every item arrives once, in source order, through a queue much smaller than the source."""
    assert list(Prefetcher(iter(range(1000)), size=4)) == list(range(1000))


def test_size_one_and_objects_pass_through() -> None:
    """A queue of one still delivers everything; items are the very objects the source yielded."""
    items = [object() for _ in range(20)]
    received = list(Prefetcher(iter(items), size=1))
    assert len(received) == 20
    assert all(got is sent for got, sent in zip(received, items, strict=True))


def test_empty_source() -> None:
    reader = Prefetcher(iter([]))
    assert list(reader) == []
    reader._thread.join(JOIN_TIMEOUT)
    assert not reader._thread.is_alive()


def test_exhausted_stays_exhausted() -> None:
    """After the last item, next() keeps raising StopIteration and the reader thread has ended."""
    reader = Prefetcher(iter([1, 2]), size=2)
    assert list(reader) == [1, 2]
    for _ in range(3):
        with pytest.raises(StopIteration):
            next(reader)
    reader._thread.join(JOIN_TIMEOUT)
    assert not reader._thread.is_alive()


def _fails_after(items: list[int], error: BaseException) -> Iterator[int]:
    yield from items
    raise error


def test_source_exception_reaches_the_consumer_at_its_point() -> None:
    """Items before the failure arrive first; then the consumer gets the source's own exception."""
    error = ValueError("broken manifest")
    reader = Prefetcher(_fails_after([1, 2, 3], error), size=8)
    assert [next(reader), next(reader), next(reader)] == [1, 2, 3]
    with pytest.raises(ValueError) as raised:
        next(reader)
    assert raised.value is error
    reader._thread.join(JOIN_TIMEOUT)
    assert not reader._thread.is_alive()


def test_source_exception_before_any_item() -> None:
    reader = Prefetcher(_fails_after([], KeyError("k")))
    with pytest.raises(KeyError):
        list(reader)


def test_next_after_source_exception_does_not_hang() -> None:
    """Like a generator, a Prefetcher whose source failed is finished: next() ends, it does not block."""
    reader = Prefetcher(_fails_after([1], RuntimeError("x")), size=4)
    assert next(reader) == 1
    with pytest.raises(RuntimeError):
        next(reader)
    finished, outcome = _next_within(reader)
    assert finished
    assert isinstance(outcome, StopIteration)


def test_close_stops_the_reader_thread() -> None:
    """close() lets a reader blocked on a full queue end soon, without draining an endless source."""
    source = Counting()
    reader = Prefetcher(source, size=3)
    assert next(reader) == 0
    assert _wait_until(lambda: source.taken >= 4)
    reader.close()
    reader._thread.join(JOIN_TIMEOUT)
    assert not reader._thread.is_alive()
    assert source.taken <= 1 + 3 + 1  # one consumed, 3 queued, one waiting to be put: the source was not drained


def test_close_before_consuming() -> None:
    source = Counting()
    reader = Prefetcher(source, size=2)
    reader.close()
    reader._thread.join(JOIN_TIMEOUT)
    assert not reader._thread.is_alive()
    assert source.taken <= 3


def test_close_keeps_what_was_read_ahead() -> None:
    """Items already queued when close() is called can still be taken, in order."""
    source = Counting()
    reader = Prefetcher(source, size=3)
    assert _wait_until(lambda: reader._queue.full())
    reader.close()
    reader._thread.join(JOIN_TIMEOUT)
    assert [next(reader), next(reader), next(reader)] == [0, 1, 2]


def test_next_after_close_does_not_hang() -> None:
    """After close() and the queued items, next() ends instead of waiting for a reader that is gone."""
    source = Counting()
    reader = Prefetcher(source, size=1)
    assert _wait_until(lambda: reader._queue.full())
    reader.close()
    reader._thread.join(JOIN_TIMEOUT)
    assert next(reader) == 0
    finished, outcome = _next_within(reader)
    assert finished
    assert isinstance(outcome, StopIteration)


@pytest.mark.parametrize("size", [1, 4, 16])
def test_read_ahead_is_bounded(size: int) -> None:
    """The source is never read more than size + 1 items ahead of the consumer."""
    source = Counting()
    reader = Prefetcher(source, size=size)
    try:
        assert _wait_until(lambda: source.taken == size + 1)
        assert _stuck_putting(reader), "the reader never waited for room in the queue"
        assert source.taken == size + 1  # `size` queued, one more waiting to be put
        for consumed in range(1, 2 * size + 3):
            assert next(reader) == consumed - 1
            assert source.taken <= consumed + size + 1
        assert _wait_until(lambda: source.taken == consumed + size + 1)
        assert _stuck_putting(reader), "the reader never waited for room in the queue"
        assert source.taken == consumed + size + 1
    finally:
        reader.close()
        reader._thread.join(JOIN_TIMEOUT)


def test_reader_runs_on_its_own_daemon_thread() -> None:
    """The source is iterated off the consumer's thread, on a daemon thread that cannot block exit."""
    seen: list[threading.Thread] = []

    def source() -> Iterator[int]:
        seen.append(threading.current_thread())
        yield 1

    reader = Prefetcher(source())
    assert list(reader) == [1]
    assert seen and seen[0] is not threading.current_thread()
    assert reader._thread.daemon
