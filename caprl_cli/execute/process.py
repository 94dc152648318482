"""The process transport: each engine host in a worker process of its own on this machine, over a pipe.

The driver starts one worker per engine with the spawn method, after putting the engine's
`CUDA_VISIBLE_DEVICES` (and compile cache folders of its own) in the environment, so torch and vLLM,
imported only there, see just that engine's GPUs. A worker shows in `ps` as `caprl engine <n>`, dies
with the driver, and leaves SIGINT and SIGTERM to the driver, which decides how the run stops. What a
worker does is `execute.host.serve`; this module only starts, reaches and ends it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from caprl_cli.execute.devices import CUDA_VISIBLE_DEVICES, EnginePlacement
from caprl_cli.execute.fleet import Message, Slot
from caprl_cli.execute.job import HostConfig

log = logging.getLogger("caprl")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
# The parent-death signal of a worker: caught, to end the worker's whole process group.
_PARENT_DIED = signal.SIGUSR1
_WATCH_PARENT_S = 0.5
_JOIN_S = 10.0
# Compile caches that concurrent engines must not share (vLLM's and torch.compile's, Triton's).
_CACHE_VARIABLES = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


@dataclass
class WorkerHandle:
    """A worker process and the driver's end of its pipe."""

    process: Any
    conn: Connection


class ProcessTransport:
    """Engine hosts as local worker processes (see the module doc)."""

    waiting_hint = ""

    def __init__(self, configs: dict[int, HostConfig], placements: dict[int, EnginePlacement]) -> None:
        self.configs = configs
        self.placements = placements
        self._context = multiprocessing.get_context("spawn")

    def start(self, slot: Slot) -> None:
        placement = self.placements[slot.index]
        parent_end, child_end = self._context.Pipe(duplex=True)
        changes = engine_cache_env(placement, os.environ)
        if placement.devices is not None:
            changes[CUDA_VISIBLE_DEVICES] = placement.devices
        process = self._context.Process(
            target=worker_main,
            args=(self.configs[slot.index], child_end, os.getpid()),
            name=f"caprl-engine-{placement.index}",
        )
        with environment(changes):
            process.start()
        child_end.close()
        slot.handle = WorkerHandle(process, parent_end)
        log.debug("started %s (pid %d)", slot.label, process.pid)

    def receive(self, slots: list[Slot], timeout: float) -> Iterator[tuple[Slot, Message]]:
        by_conn = {slot.handle.conn: slot for slot in slots if slot.alive}
        if not by_conn:
            time.sleep(timeout)
            return
        for conn in wait(list(by_conn), timeout=timeout):
            slot = by_conn[conn]
            while slot.alive and slot.handle.conn is conn:
                try:
                    if not conn.poll():
                        break
                    message = conn.recv()
                except (EOFError, OSError):
                    yield slot, self._exit(slot.handle)
                    break
                yield slot, message
        for slot in slots:  # a worker that died without closing its pipe (it cannot, but its children may hold it)
            if slot.alive and not slot.handle.process.is_alive() and not _readable(slot.handle.conn):
                yield slot, self._exit(slot.handle)

    def send(self, slot: Slot, message: Message) -> bool:
        if not slot.alive:
            return False
        try:
            slot.handle.conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    def kill(self, slot: Slot) -> None:
        handle, slot.handle, slot.ready = slot.handle, None, False
        if handle is None:
            return
        end_engine_process(handle.process.pid, handle.process.is_alive())  # with its engine core
        handle.process.join(timeout=30)
        handle.conn.close()

    @staticmethod
    def _exit(handle: WorkerHandle) -> Message:
        """The worker closed its end of the pipe: it is exiting, as told or not."""
        handle.process.join(timeout=_JOIN_S)
        code = handle.process.exitcode
        return ("exit", code == 0, f"its process ended with {describe_exit(code)}")


def _readable(conn: Connection) -> bool:
    try:
        return conn.poll()
    except (EOFError, OSError):
        return False


# -- the worker process ---------------------------------------------------------------------------------


def worker_main(config: HostConfig, conn: Connection, parent_pid: int) -> None:
    """Process entry point: serve the engine, then exit 0 when it ended as told. Any failure ends the
    process with a non-zero code, which the driver treats like a crash (its unfinished images go back
    on the queue)."""
    try:
        become_engine_process(config.index, parent_pid)
        from caprl_cli.verbosity import apply_in_child

        apply_in_child()  # -q/-v/-vv as the driver was given, before torch or vLLM is imported here
        from caprl_cli.execute.host import EngineLink, serve

        link = EngineLink(conn.send)
        threading.Thread(target=_inbox, args=(conn, link), name="caprl-engine-inbox", daemon=True).start()
        ended_as_told = serve(config, link)
    except BaseException as exc:
        try:
            conn.send(("crashed", f"{type(exc).__name__}: {exc}"))
        except Exception:
            pass
        os._exit(1)
    os._exit(0 if ended_as_told else 1)


def _inbox(conn: Connection, link: Any) -> None:
    """Deliver the driver's messages to the link; a closed pipe (the driver is gone) is a stop."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # PR_SET_PDEATHSIG ends us too
            link.deliver(("stop",))
            return
        link.deliver(message)
        if message[0] != "unit":
            return


def process_title(index: int) -> str:
    return f"caprl engine {index}"


def become_engine_process(index: int, parent_pid: int) -> None:
    """Name this process `caprl engine <n>`, die with the parent (and take everything it started
    along), leave signals to the parent.

    The worker leads a process group of its own, which its engine core (vLLM runs it in a process of
    its own on GPUs), that one's workers and the decode workers join. Its death is the end of the whole
    group: when the parent dies (the kernel's parent-death signal, and a thread that watches for it in
    case the main thread is inside a long native call), and when the parent kills it
    (`end_engine_process`). Killing the worker alone would orphan an engine core that holds the GPU.
    """
    title = process_title(index)
    try:
        import setproctitle  # installed with vLLM; optional

        setproctitle.setproctitle(title)
    except ImportError:
        pass
    os.setpgid(0, 0)
    signal.signal(_PARENT_DIED, _end_own_group)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)  # what `ps -o comm` and /proc/<pid>/comm show
            libc.prctl(_PR_SET_PDEATHSIG, _PARENT_DIED, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="caprl-engine-watch", daemon=True).start()
    # Ctrl-C reaches the whole process group and a scheduler may signal it too: the parent decides
    # how the run stops and tells this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _end_own_group(*_: object) -> None:
    """The parent is gone: end this worker and every process it started, at once."""
    os.killpg(0, signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_PARENT_S)
    _end_own_group()


def end_engine_process(pid: int, alive: bool) -> None:
    """SIGKILL an engine worker and whatever it started (its process group, which outlives a worker that
    died by itself while its engine core or decode workers still run). `alive`: the worker itself has not
    been reaped yet, so its pid is still its own (it may not lead its group yet)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the environment a worker starts with ---------------------------------------------------------------


def engine_cache_env(placement: EnginePlacement, environ: Mapping[str, str]) -> dict[str, str]:
    """Compile cache folders of this engine's own, unless the user chose them: concurrent engines
    writing one cache corrupt it. Named by the engine's devices, so a later run (or a restarted worker)
    on the same GPUs reuses what was compiled."""
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caprl" / "engines"
    name = f"gpu-{placement.devices.replace(',', '-')}" if placement.devices is not None else f"cpu-{placement.index}"
    return {var: str(base / name / sub) for var, sub in _CACHE_VARIABLES.items() if var not in environ}


@contextmanager
def environment(changes: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a child process started inside the block, then restore them."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
