"""The reaper of a local Ray cluster: ends every process of it once the run that started it is gone.

`ray.init()` without an address starts a GCS server, a raylet, agents and worker processes. A run that
ends normally shuts them down; a run killed with SIGKILL cannot, and Ray then leaves some of them
behind (its agents outlive the raylet). So before starting the cluster the run starts this small
process in a session of its own, holding the write end of its stdin. Whenever that pipe closes (the
run ended, however it ended: the kernel closes the pipe of a killed process too), the reaper kills
every process of the cluster and removes the cluster's temporary folder. A process is the cluster's
when its environment carries the run's marker (`CAPRL_RAY_RUN=<marker>`, set before `ray.init` so
every Ray process inherits it), or when it holds a file open in the cluster's folder: Ray's Python
processes rename themselves (`ray::DashboardAgent`), which overwrites the environment the kernel
shows, but each keeps its log files in that folder open.

Linux only (it reads /proc); elsewhere it does nothing and a killed run may leave Ray processes behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

MARKER_ENV = "CAPRL_RAY_RUN"
_SWEEPS = 20  # a process may start another while it is being killed: look again until none is left
_SWEEP_PAUSE_S = 0.1


def cluster_processes(marker: str, folder: str | None, spare: set[int]) -> list[int]:
    """Pids of the processes whose environment holds `CAPRL_RAY_RUN=<marker>` or that hold a file open
    under `folder`, other than `spare`."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") or (folder is not None and holds_file_under(entry, folder)):
            found.append(int(entry.name))
    return found


def holds_file_under(process: Path, folder: str) -> bool:
    """Whether the process (its /proc entry) has a file open under `folder`."""
    prefix = folder.rstrip("/") + "/"
    try:
        for fd in (process / "fd").iterdir():
            try:
                if os.readlink(fd).startswith(prefix):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def sweep(marker: str, folder: str | None, spare: set[int]) -> int:
    """SIGKILL every process of the cluster (again and again until none is left); returns how many."""
    killed: set[int] = set()
    for _ in range(_SWEEPS):
        pids = cluster_processes(marker, folder, spare)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(_SWEEP_PAUSE_S)
    return len(killed)


def main(argv: list[str]) -> int:
    """`python -m caprl_cli.execute.ray_reaper MARKER TEMP_DIR DRIVER_PID`: wait for stdin to close,
    then sweep."""
    marker, temp_dir, driver = argv[0], argv[1], int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the end of the run ends the wait
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    if sys.platform.startswith("linux"):
        sweep(marker, temp_dir, {os.getpid(), driver})
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
