"""Fault injection for crash tests: a named point in a write where the process can be killed for real.

Every step that writes state or output calls `crash_point("<step>")`. When the environment variable
`CAPRL_CRASH_AT` names that step (`part.temp`), or names it with a count (`sidecar.txt:3`: its third
occurrence in this process), the process sends itself SIGKILL right there. Nothing runs after it: no
`except`, no `finally`, no atexit, no buffered write; exactly what a power loss or the OOM killer leaves.
That is the point: an exception raised in a test would run the cleanup a real crash skips.

The variable is read once, when this module is imported; unset (every normal run), a point costs one
dict lookup. It is a developer tool, documented in the README's Development section.
"""

from __future__ import annotations

import os
import signal

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
