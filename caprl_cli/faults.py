"""Fault injection for crash tests: a named point in a write where the process can be killed for real.

Every step that writes state or output calls `crash_point("<step>")`. When the environment variable
`CAPRL_CRASH_AT` names that step (`part.temp`), or names it with a count (`sidecar.txt:3`: its third
occurrence in this process), the process sends itself SIGKILL right there. Nothing runs after it: no
`except`, no `finally`, no atexit, no buffered write; exactly what a power loss or the OOM killer leaves.
That is the point: an exception raised in a test would run the cleanup a real crash skips.

The variable is read once, when this module is imported; unset (every normal run), a point costs one
dict lookup. It is a developer tool, documented in the README's Development section.

`pause_point("<moment>")` is its companion for signal tests: with `CAPRL_PAUSE_AT` naming the moment
the process waits there (see `pause_point`), so a test can send SIGTERM at a known moment without
sleeping and hoping.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_ENV = "CAPRL_CRASH_AT"


def parse_crash_at(value: str) -> dict[str, int]:
    """`name` or `name:N` as {name: N} (N counts from 1; `name` alone is its first occurrence)."""
    value = value.strip()
    if not value:
        return {}
    name, sep, count = value.rpartition(":")
    if sep and count.isdigit() and int(count) >= 1 and name:
        return {name: int(count)}
    return {value: 1}


_armed: dict[str, int] = parse_crash_at(os.environ.get(CRASH_ENV, ""))


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if `CAPRL_CRASH_AT` names this point (and this occurrence)."""
    remaining = _armed.get(name)
    if remaining is None:
        return
    if remaining > 1:
        _armed[name] = remaining - 1
        return
    os.kill(os.getpid(), signal.SIGKILL)


PAUSE_ENV = "CAPRL_PAUSE_AT"
PAUSE_FILE_ENV = "CAPRL_PAUSE_FILE"
_PAUSE_POLL_S = 0.05


def pause_point(name: str) -> None:
    """Test hook: hold this process at a named moment the test chooses, so a signal lands there.

    When `CAPRL_PAUSE_AT` names this point, the process writes its pid to the file `CAPRL_PAUSE_FILE`
    (the "ready" file) and waits until the test removes it. The wait is a sleep loop, so signal
    handlers run during it exactly as they would in the work the point stands in for. Only the first
    occurrence pauses. Unset (every normal run), a point costs one comparison."""
    if _pause_at != name or not _pause_file:
        return
    _forget_pause()
    ready = _pause_file
    temporary = f"{ready}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(temporary, ready)  # the test sees the file whole or not at all
    while os.path.exists(ready):
        time.sleep(_PAUSE_POLL_S)


def _forget_pause() -> None:
    global _pause_at
    _pause_at = ""


_pause_at = os.environ.get(PAUSE_ENV, "").strip()
_pause_file = os.environ.get(PAUSE_FILE_ENV, "")
