"""One image-decoding worker process, and the parent's handle on it.

Each worker holds at most one image at a time, handed over on its own pipe, so when a worker dies
(a decoder segfault, `kill -9`, the OOM killer) or has to be killed (it passed `--decode-timeout`) the
parent knows exactly which image it was on. Workers are started with `spawn`: the parent holds an
engine with threads and device handles that must not be forked.

Workers never outlive the run: each asks Linux to SIGKILL it when its parent goes (PR_SET_PDEATHSIG;
note that this fires when the *thread* that started the worker ends, so a `Preprocessor` belongs to
the thread that runs it), and also leaves when its pipe to the parent closes. Ctrl-C reaches the whole
process group: workers ignore SIGINT and the parent decides how to stop. In `ps` (`comm`) a worker is
`caprl decode`, so an operator can tell it from an engine worker.

Test hooks (never set in normal runs; read only inside workers, so `--workers 0` ignores them):
`CAPRL_TEST_DECODER_CRASH=<text>` makes a worker SIGKILL itself when it is handed an image whose key
contains <text>, every time (a decoder that segfaults on that file); `CAPRL_TEST_DECODER_HANG=<text>`
makes it wait forever instead (a decoder stuck in a loop, a read that never returns).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.prepare.outcomes import DecodeSettings, Failed, Outcome, prepare_sample, without_bytes

CRASH_ENV = "CAPRL_TEST_DECODER_CRASH"
HANG_ENV = "CAPRL_TEST_DECODER_HANG"
PROCESS_NAME = "caprl decode"
READY = "ready"  # a worker's first message: it started and can take images
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


class DecodeWorker:
    """The parent's side of one worker: its process, its pipe, and the image it holds, if any."""

    def __init__(self, context: SpawnContext, settings: DecodeSettings) -> None:
        parent_end, worker_end = context.Pipe(duplex=True)
        self.process = context.Process(
            target=worker_main,
            args=(worker_end, settings, os.getpid()),
            name=PROCESS_NAME,
            # ended at exit by multiprocessing too; a daemonic process (an engine worker) may not have any
            daemon=not multiprocessing.current_process().daemon,
        )
        self.process.start()
        worker_end.close()
        self.conn: Connection = parent_end
        self.ready = False
        self.sample: Sample | None = None  # the image the worker is on
        self.since = 0.0  # when it was handed that image (time.monotonic)

    @property
    def idle(self) -> bool:
        return self.ready and self.sample is None

    def hand(self, sample: Sample) -> None:
        """Give the worker one image. A worker that died in the meantime raises OSError here or shows
        up dead at the next wait; either way the image is still `self.sample`."""
        self.sample = sample
        self.since = time.monotonic()
        self.conn.send(sample)

    def stop(self) -> None:
        """End the worker now: ask an idle one to leave, kill a busy or stuck one."""
        if self.process.is_alive():
            if self.idle:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
                self.process.join(2)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(5)
        self.conn.close()

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


def worker_main(conn: Connection, settings: DecodeSettings, parent_pid: int) -> None:
    """A worker's whole life: say ready, then prepare one image per message until told to stop."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_process_name(PROCESS_NAME)
    crash_on = os.environ.get(CRASH_ENV) or None
    hang_on = os.environ.get(HANG_ENV) or None
    conn.send(READY)
    while True:
        try:
            sample = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if sample is None:
            return
        if crash_on is not None and crash_on in sample.key:
            os.kill(os.getpid(), signal.SIGKILL)
        if hang_on is not None and hang_on in sample.key:
            while True:
                time.sleep(3600)
        _send(conn, prepare_sample(sample, settings))


def _send(conn: Connection, outcome: Outcome) -> None:
    """Send the outcome; one that cannot be pickled becomes a decode failure rather than a dead worker."""
    try:
        conn.send(outcome)
    except (EOFError, BrokenPipeError):
        sys.exit(0)
    except Exception as exc:
        conn.send(Failed(without_bytes(outcome.sample), ErrorKind.DECODE, f"{type(exc).__name__}: {exc}"))


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the run: a kill -9'd parent must not leave idle decoders behind (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def _set_process_name(name: str) -> None:
    """The name `ps -o comm` and /proc/<pid>/comm show (Linux; 15 bytes at most)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        except (OSError, AttributeError):
            pass
