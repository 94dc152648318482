"""When to stop: SIGINT, SIGTERM or the --max-runtime deadline, at any moment of a run.

A run has two phases. Until captioning starts (reading the state, planning, loading the model: minutes
for a large model on a GPU) there is nothing to save, so a signal, or the deadline passing, raises
`StopNow` at once: it unwinds through whatever is running (model loading included; Python runs signal
handlers between bytecodes, which loading loops reach often) and the run leaves no trace. Once
captioning has started (`begin_captioning`), the first signal asks the run to drain instead: no new
images are taken, finished rows are committed, the output is merged and the summary written. A second
signal exits at once in either phase; committed parts stay whole because each was renamed into place
complete.

The deadline is a real timer (SIGALRM), not only a poll, so it is honoured while the main thread is
busy in a long call such as loading the model.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from enum import Enum
from types import FrameType
from typing import Any

from caprl_cli import exit_codes

log = logging.getLogger("caprl")


class StopReason(str, Enum):
    SIGINT = "sigint"
    SIGTERM = "sigterm"
    DEADLINE = "deadline"


EXIT_CODE_OF = {
    StopReason.SIGINT: exit_codes.SIGINT,
    StopReason.SIGTERM: exit_codes.SIGTERM,
    StopReason.DEADLINE: exit_codes.PARTIAL,
}
_REASON_OF_SIGNAL = {signal.SIGINT: StopReason.SIGINT, signal.SIGTERM: StopReason.SIGTERM}
_WHAT_STOPPED = {
    StopReason.SIGINT: "interrupted",
    StopReason.SIGTERM: "terminated",
    StopReason.DEADLINE: "--max-runtime reached",
}


class StopNow(BaseException):
    """A stop before any row was captioned: nothing to save, so the run unwinds at once.

    A BaseException, like KeyboardInterrupt, so that the `except Exception` of a loader on the way
    does not take it for a loading error."""

    def __init__(self, reason: StopReason, when: str = "before captioning started") -> None:
        super().__init__(f"{_WHAT_STOPPED[reason]} {when}; nothing was captioned")
        self.reason = reason
        self.exit_code = EXIT_CODE_OF[reason]


def deadline_margin(max_runtime_s: float) -> float:
    """Time kept back before the deadline to commit, merge and write the summary."""
    return max(3.0, min(120.0, 0.05 * max_runtime_s))


class Stopper:
    """Collects the reason to stop; `should_stop()` is polled by the run loop once captioning runs."""

    def __init__(self, max_runtime_s: float | None = None, started: float | None = None) -> None:
        self.reason: StopReason | None = None
        start = time.monotonic() if started is None else started
        self.stop_at = None if max_runtime_s is None else start + max_runtime_s - deadline_margin(max_runtime_s)
        self.captioning = False
        self._announced = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (and SIGALRM for the deadline); call from the main thread."""
        for signum in _REASON_OF_SIGNAL:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if self.stop_at is not None:
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_deadline)
            # A zero delay would disarm the timer: a deadline already past fires at once instead.
            signal.setitimer(signal.ITIMER_REAL, max(self.stop_at - time.monotonic(), 1e-3))

    def restore(self) -> None:
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def begin_captioning(self) -> None:
        """From now on there is work to save: a first signal drains the run instead of ending it."""
        self.captioning = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        reason = _REASON_OF_SIGNAL[signal.Signals(signum)]
        if self.reason in (StopReason.SIGINT, StopReason.SIGTERM):
            os._exit(EXIT_CODE_OF[reason])
        self.reason = reason
        if not self.captioning:
            raise StopNow(reason)

    def _on_deadline(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason = StopReason.DEADLINE
        if not self.captioning and self.reason is StopReason.DEADLINE:
            raise StopNow(StopReason.DEADLINE)

    def should_stop(self) -> bool:
        if self.reason is None and self.stop_at is not None and time.monotonic() >= self.stop_at:
            self.reason = StopReason.DEADLINE
        if self.reason is not None and not self._announced:
            self._announced = True
            log.info(
                "stopping (%s): no new images; finishing those in flight, committing and merging%s",
                self.reason.value,
                "" if self.reason is StopReason.DEADLINE else " (signal again to exit at once)",
            )
        return self.reason is not None
