"""The feeder that lets a stepping engine take requests without waiting on a slow one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from caprl_cli.engines.feeding import ENDED, NOTHING, Feeder


def blocked_after(first: list[str], release: threading.Event, last: str) -> Iterator[str]:
    yield from first
    assert release.wait(timeout=300), "never released"
    yield last


def test_ready_items_are_taken_while_the_iterator_is_blocked() -> None:
    release = threading.Event()
    feeder = Feeder(blocked_after(["a", "b"], release, "c"), capacity=8)
    assert [feeder.take(timeout=60), feeder.take(timeout=60)] == ["a", "b"]
    assert feeder.take() is NOTHING  # at once: the iterator is blocked, the caller is not
    release.set()
    assert feeder.take(timeout=60) == "c"
    assert feeder.take(timeout=60) is ENDED
    feeder.close()


def test_an_error_of_the_iterator_is_raised_in_the_taking_thread() -> None:
    def failing() -> Iterator[str]:
        yield "a"
        raise OSError("disk gone")

    feeder = Feeder(failing(), capacity=4)
    assert feeder.take(timeout=60) == "a"
    with pytest.raises(OSError, match="disk gone"):
        feeder.take(timeout=60)
    feeder.close()


def test_the_queue_is_bounded_and_close_ends_the_thread() -> None:
    pulled: list[int] = []

    def endless() -> Iterator[int]:
        for number in range(1_000_000):
            pulled.append(number)
            yield number

    feeder = Feeder(endless(), capacity=3)
    assert feeder.take(timeout=60) == 0
    deadline = time.monotonic() + 60
    while len(pulled) < 5 and time.monotonic() < deadline:  # until the thread waits on a full queue
        time.sleep(0.01)
    time.sleep(0.2)  # a thread not held back by the queue would pull far more meanwhile
    assert len(pulled) == 5  # the one taken, three queued, one in hand
    feeder.close()
    assert not feeder._thread.is_alive()
