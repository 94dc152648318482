"""When a run stops taking work: the --max-runtime deadline, a first signal, and a second signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from caprl_cli.execute.stopping import StopNow, Stopper, StopReason, deadline_margin

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("runtime", "margin"),
    [(0.5, 3.0), (10, 3.0), (60, 3.0), (100, 5.0), (600, 30.0), (2400, 120.0), (86400, 120.0), (1e9, 120.0)],
)
def test_deadline_margin_bounds(runtime: float, margin: float) -> None:
    """5% of the runtime, never under 3 s nor over 120 s."""
    assert deadline_margin(runtime) == pytest.approx(margin)


def test_deadline_margin_grows_with_runtime() -> None:
    """A longer runtime never keeps back less time."""
    values = [deadline_margin(s) for s in (1, 30, 60, 61, 100, 1000, 2400, 2401, 10**6)]
    assert values == sorted(values)
    assert all(3.0 <= v <= 120.0 for v in values)


def test_stop_at_is_start_plus_runtime_minus_margin() -> None:
    """The deadline is the start plus --max-runtime less the margin kept for committing."""
    stopper = Stopper(max_runtime_s=1000, started=500.0)
    assert stopper.stop_at == pytest.approx(500.0 + 1000 - 50)
    assert Stopper().stop_at is None


def test_should_stop_false_before_deadline() -> None:
    """Before stop_at nothing asks the run to stop."""
    stopper = Stopper(max_runtime_s=3600, started=time.monotonic())
    assert not stopper.should_stop()
    assert stopper.reason is None


def test_should_stop_true_after_deadline() -> None:
    """Once stop_at has passed `should_stop` is true with reason DEADLINE, and stays so."""
    runtime = 100.0
    stopper = Stopper(max_runtime_s=runtime, started=time.monotonic() - runtime + deadline_margin(runtime) - 0.01)
    assert stopper.should_stop()
    assert stopper.reason is StopReason.DEADLINE
    assert stopper.should_stop()


def test_deadline_reached_while_running() -> None:
    """A run started just now with a tiny runtime (margin >= 3 s) is past its deadline at once."""
    stopper = Stopper(max_runtime_s=3.01, started=time.monotonic())
    assert _poll(stopper.should_stop), "the deadline 10 ms ahead never passed"
    assert stopper.reason is StopReason.DEADLINE


def test_no_deadline_never_stops_by_itself() -> None:
    """Without --max-runtime only a signal stops the run."""
    stopper = Stopper(started=0.0)
    assert not stopper.should_stop()
    assert stopper.reason is None


@pytest.fixture
def installed():
    """A stopper whose run is captioning: a first signal drains."""
    stopper = Stopper()
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stopper.begin_captioning()
    stopper.install()
    try:
        yield stopper
    finally:
        stopper.restore()
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _poll(condition, timeout: float = 60.0) -> bool:
    """Whether `condition()` became true; polled, with a bound generous for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _wait_for_reason(stopper: Stopper) -> None:
    assert _poll(lambda: stopper.reason is not None), "the signal handler never ran"


def test_sigterm_sets_reason_without_killing(installed: Stopper) -> None:
    """A first SIGTERM only asks the run to stop: reason SIGTERM, process alive (the exit codes are
    checked on a real process in test_second_signal_exits_at_once)."""
    assert not installed.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    _wait_for_reason(installed)
    assert installed.reason is StopReason.SIGTERM
    assert installed.should_stop()


def test_sigint_sets_reason_without_raising(installed: Stopper) -> None:
    """A first SIGINT (Ctrl-C) does not raise KeyboardInterrupt; it sets reason SIGINT."""
    os.kill(os.getpid(), signal.SIGINT)
    _wait_for_reason(installed)
    assert installed.reason is StopReason.SIGINT


def test_signal_after_deadline_replaces_reason_without_exiting() -> None:
    """After the deadline a first signal is still a first signal: it sets its reason and the process lives."""
    stopper = Stopper(max_runtime_s=10, started=time.monotonic() - 100)
    before = signal.getsignal(signal.SIGTERM)
    stopper.begin_captioning()
    stopper.install()
    try:
        assert stopper.should_stop() and stopper.reason is StopReason.DEADLINE
        os.kill(os.getpid(), signal.SIGTERM)
        assert _poll(lambda: stopper.reason is not StopReason.DEADLINE), "the signal handler never ran"
        assert stopper.reason is StopReason.SIGTERM
    finally:
        stopper.restore()
        signal.signal(signal.SIGTERM, before)


def test_restore_puts_previous_handlers_back() -> None:
    """`install` replaces the SIGINT and SIGTERM handlers; `restore` puts back whatever was there."""
    def custom(signum, frame):  # pragma: no cover - never delivered
        pass

    original = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, custom)
    try:
        stopper = Stopper()
        stopper.install()
        assert signal.getsignal(signal.SIGINT) == stopper._on_signal
        assert signal.getsignal(signal.SIGTERM) == stopper._on_signal
        stopper.restore()
        assert signal.getsignal(signal.SIGINT) == original[signal.SIGINT]
        assert signal.getsignal(signal.SIGTERM) is custom
        stopper.restore()  # a second restore changes nothing
        assert signal.getsignal(signal.SIGTERM) is custom
    finally:
        for signum, handler in original.items():
            signal.signal(signum, handler)


_TWO_SIGNALS = """
import os, signal, sys, time
from caprl_cli.execute.stopping import Stopper
stopper = Stopper()
stopper.begin_captioning()
stopper.install()
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
deadline = time.monotonic() + 60
while stopper.reason is None and time.monotonic() < deadline:
    time.sleep(0.001)
print("first:", stopper.reason.value if stopper.reason else None, flush=True)
os.kill(os.getpid(), getattr(signal, sys.argv[2]))
time.sleep(60)  # the second signal's handler exits the process during this sleep
print("still running", flush=True)
sys.exit(0)
"""


@pytest.mark.parametrize(
    ("first", "second", "code", "reason"),
    [("SIGINT", "SIGINT", 130, "sigint"), ("SIGTERM", "SIGTERM", 143, "sigterm"), ("SIGTERM", "SIGINT", 130, "sigterm")],
)
def test_second_signal_exits_at_once(first: str, second: str, code: int, reason: str) -> None:
    """In a child process: the first signal only sets the reason; the second exits at once with its code."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TWO_SIGNALS), first, second],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == code, done.stderr
    assert done.stdout.splitlines() == [f"first: {reason}"]


def _sleep_until_stopped(seconds: float = 60.0) -> None:
    """Stand-in for a long start-up step (model loading): a loop of short Python calls."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.fixture
def starting_up():
    """A stopper installed before captioning started, with the handlers restored afterwards."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    before = {signum: signal.getsignal(signum) for signum in signums}
    made: list[Stopper] = []

    def make(**kwargs) -> Stopper:
        stopper = Stopper(**kwargs)
        stopper.install()
        made.append(stopper)
        return stopper

    try:
        yield make
    finally:
        for stopper in made:
            stopper.restore()
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize(("signum", "reason", "code"), [(signal.SIGTERM, StopReason.SIGTERM, 143),
                                                        (signal.SIGINT, StopReason.SIGINT, 130)])
def test_signal_before_captioning_raises_at_once(starting_up, signum: int, reason: StopReason, code: int) -> None:
    """Before captioning starts there is nothing to drain: the signal unwinds the running step."""
    stopper = starting_up()
    with pytest.raises(StopNow) as stopped:
        os.kill(os.getpid(), signum)
        _sleep_until_stopped()
    assert stopped.value.reason is reason and stopped.value.exit_code == code
    assert stopper.reason is reason


def test_stop_now_is_not_an_exception() -> None:
    """`except Exception` in a model loader must not swallow the stop."""
    assert not issubclass(StopNow, Exception)


def test_deadline_before_captioning_raises_from_a_timer(starting_up) -> None:
    """The deadline is a timer: it interrupts a long step that never polls `should_stop`."""
    runtime = 3.2  # the margin is 3 s: the deadline is 0.2 s after the start
    stopper = starting_up(max_runtime_s=runtime, started=time.monotonic())
    with pytest.raises(StopNow) as stopped:
        _sleep_until_stopped()
    assert stopped.value.reason is StopReason.DEADLINE and stopped.value.exit_code == 3
    assert stopper.reason is StopReason.DEADLINE


def test_deadline_already_past_fires_at_once(starting_up) -> None:
    """A deadline gone by the time the stopper is installed (a slow start) still fires."""
    with pytest.raises(StopNow):
        starting_up(max_runtime_s=10, started=time.monotonic() - 100)
        _sleep_until_stopped()


def test_deadline_timer_while_captioning_only_sets_the_reason(starting_up) -> None:
    """Once captioning runs, the timer asks for a drain like the poll does; nothing is raised."""
    stopper = Stopper(max_runtime_s=3.2, started=time.monotonic())
    stopper.begin_captioning()
    stopper.install()
    try:
        assert _poll(lambda: stopper.reason is not None), "the deadline timer never fired"
        assert stopper.reason is StopReason.DEADLINE
    finally:
        stopper.restore()


def test_restore_disarms_the_deadline_timer(starting_up) -> None:
    """After `restore` no SIGALRM is left armed to fire into whatever runs next."""
    stopper = starting_up(max_runtime_s=3600, started=time.monotonic())
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    stopper.restore()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
