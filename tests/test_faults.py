"""The crash-point hook: a named point kills the process with SIGKILL at the occurrence asked for, and
nothing after it runs (no `finally`); unnamed points do nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from caprl_cli.faults import CRASH_ENV, parse_crash_at

# Prints each step it passes; the `finally` would print "cleanup" if any cleanup ran.
SCRIPT = """
from caprl_cli.faults import crash_point
try:
    for step in range(1, 5):
        crash_point("other.point")
        crash_point("test.point")
        print(step, flush=True)
finally:
    print("cleanup", flush=True)
"""


def run_points(crash_at: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": "", **({CRASH_ENV: crash_at} if crash_at is not None else {})}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize(("crash_at", "printed"), [("test.point", []), ("test.point:1", []),
                                                    ("test.point:3", ["1", "2"])])
def test_the_named_occurrence_kills_without_cleanup(crash_at: str, printed: list[str]) -> None:
    result = run_points(crash_at)
    assert result.returncode == -9
    assert result.stdout.split() == printed


@pytest.mark.parametrize("crash_at", [None, "", "elsewhere", "test.point:9"])
def test_points_not_named_or_not_reached_do_nothing(crash_at: str | None) -> None:
    result = run_points(crash_at)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "2", "3", "4", "cleanup"]


def test_parse_reads_a_count_only_after_the_last_colon() -> None:
    assert parse_crash_at("sidecar.txt:3") == {"sidecar.txt": 3}
    assert parse_crash_at(" part.temp ") == {"part.temp": 1}
    assert parse_crash_at("a:b") == {"a:b": 1}
    assert parse_crash_at("a:0") == {"a:0": 1}
    assert parse_crash_at("") == {}
