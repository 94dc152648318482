"""Progress on stderr: a live bar in a terminal, a log line every few seconds in cron logs."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("caprl")

LOG_INTERVAL_S = 5.0
_BAR_POSTFIX_INTERVAL_S = 0.5


def format_duration(seconds: float) -> str:
    """`1h02m`, `4m05s` or `12s`: short enough for a progress line."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts finished images, errors and output tokens; shows rates and an ETA.

    `total` is None while it is unknown (tar shards and manifests are counted as they are read)."""

    def __init__(
        self, total: int | None, enabled: bool = True, stream: TextIO | None = None, interval: float = LOG_INTERVAL_S
    ) -> None:
        self.total = total
        self.done = 0
        self.errors = 0
        self.tokens = 0
        self.started = time.monotonic()
        self.interval = interval
        self._last_report = self.started
        stream = stream or sys.stderr
        self._bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, tokens: int = 0, error: bool = False) -> None:
        """One image finished (captioned, or an error row)."""
        self.done += 1
        self.tokens += tokens
        self.errors += int(error)
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(1)
            if now - self._last_report >= _BAR_POSTFIX_INTERVAL_S:
                self._set_postfix(now)
                self._last_report = now
        elif now - self._last_report >= self.interval:
            log.info(self.line(now))
            self._last_report = now

    def _set_postfix(self, now: float) -> None:
        assert self._bar is not None
        self._bar.set_postfix_str(f"{self.tokens / self._elapsed(now):.0f} tok/s, {self.errors} errors")

    def _elapsed(self, now: float) -> float:
        return max(now - self.started, 1e-9)

    def rate(self) -> float:
        """Images per second since this progress started."""
        return self.done / self._elapsed(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """`120/1000 images, 3 errors, 4.1 img/s, 530 tok/s, ETA 3m35s`."""
        now = time.monotonic() if now is None else now
        elapsed = self._elapsed(now)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.done} images, {self.errors} errors, {rate:.1f} img/s, {self.tokens / elapsed:.0f} tok/s"
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.done}/{self.total} images, {self.errors} errors, {rate:.1f} img/s, "
            f"{self.tokens / elapsed:.0f} tok/s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._set_postfix(time.monotonic())  # the last update may have skipped the postfix
            self._bar.close()
            self._bar = None
