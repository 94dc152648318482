"""When to stop taking work: SIGINT, SIGTERM or the --max-runtime deadline.

The first signal asks the run to stop: no new images are taken, finished rows are committed, the output
is merged and the summary written. A second signal exits at once; committed parts stay whole because
each was renamed into place complete.
"""

from __future__ import annotations

import os
import signal
import time
from enum import Enum
from types import FrameType
from typing import Any

from caprl_cli import exit_codes


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


def deadline_margin(max_runtime_s: float) -> float:
    """Time kept back before the deadline to commit, merge and write the summary."""
    return max(3.0, min(120.0, 0.05 * max_runtime_s))


class Stopper:
    """Collects the reason to stop; `should_stop()` is polled by the run loop."""

    def __init__(self, max_runtime_s: float | None = None, started: float | None = None) -> None:
        self.reason: StopReason | None = None
        start = time.monotonic() if started is None else started
        self.stop_at = None if max_runtime_s is None else start + max_runtime_s - deadline_margin(max_runtime_s)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in _REASON_OF_SIGNAL:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.reason in (StopReason.SIGINT, StopReason.SIGTERM):
            os._exit(EXIT_CODE_OF[_REASON_OF_SIGNAL[signal.Signals(signum)]])
        self.reason = _REASON_OF_SIGNAL[signal.Signals(signum)]

    def should_stop(self) -> bool:
        if self.reason is None and self.stop_at is not None and time.monotonic() >= self.stop_at:
            self.reason = StopReason.DEADLINE
        return self.reason is not None
