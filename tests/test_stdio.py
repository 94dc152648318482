"""Writing to a pipe whose reader has gone: dropped quietly, never a traceback or a changed exit code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# stdout is a real pipe whose reading end is closed before anything is written (`| head` gone).
_CLOSED_READER = """
import logging, os, sys
from caprl_cli.stdio import PipeSafeHandler, say, settle
read_end, write_end = os.pipe()
os.close(read_end)
os.dup2(write_end, 1)
log = logging.getLogger("pipe-test")
log.addHandler(PipeSafeHandler(sys.stdout))
log.propagate = False
{body}
settle()
sys.exit(7)
"""


def _run(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(_CLOSED_READER).format(body=textwrap.dedent(body))
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # stdout buffered
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def test_say_to_a_closed_pipe_is_dropped() -> None:
    done = _run("say('one', err=False)\nsay('two', err=False)")
    assert (done.returncode, done.stderr) == (7, "")


def test_log_lines_to_a_closed_pipe_are_dropped_without_a_logging_error() -> None:
    done = _run("log.warning('one')\nlog.warning('two')")
    assert (done.returncode, done.stderr) == (7, "")


def test_buffered_output_flushed_at_exit_keeps_the_exit_code() -> None:
    """Python's own flush of stdout at exit would fail (exit 120, 'Exception ignored'): settle() first."""
    done = _run("print('buffered, not yet written')")
    assert (done.returncode, done.stderr) == (7, "")


def test_other_write_errors_are_not_hidden(tmp_path: Path) -> None:
    """Only EPIPE is taken for a reader gone: a full disk still shows (here: /dev/full, ENOSPC)."""
    if not Path("/dev/full").exists():
        return
    script = "import sys\nsys.stdout = open('/dev/full', 'w')\nfrom caprl_cli.stdio import say\nsay('x', err=False)"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "No space left" in done.stderr
