"""The Ray cluster a `--executor ray` run works on: an existing one (`--ray-address`), or a local one
the run starts, and always ends, itself.

A local cluster gets a temporary folder of its own, no dashboard and no usage reporting, and the
engines' environment (vLLM's CPU settings and the like) is set before `ray.init`, so every Ray process
inherits it; actors on a remote cluster get the same variables through the job's runtime environment.
The cluster is shut down on every way out of the run (its end, an error, SIGINT/SIGTERM); a run
killed with SIGKILL cannot do that, so its reaper (`execute.ray_reaper`) ends the cluster's processes
then. With `--ray-address` the run only connects and disconnects: the cluster is someone else's.

`ray.init` replaces the SIGTERM handler, so the run's own (`execute.stopping`) is put back afterwards;
and SIGINT is held back while the local cluster starts, so the processes it starts inherit it blocked:
a Ctrl-C, which reaches the whole process group, stops the run the normal way (drain, commit) instead
of killing the engines under it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from caprl_cli.errors import CaprlError, UsageError
from caprl_cli.execute.ray_reaper import MARKER_ENV

log = logging.getLogger("caprl")

# Environment the engines need on every node: vLLM (VLLM_CPU_KVCACHE_SPACE ...), the hub and
# transformers settings, thread counts, and the test hooks of engine workers.
ENGINE_ENV_PREFIXES = ("VLLM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "CAPRL_TEST_")
# Ray itself: no usage reporting (set before Ray is imported).
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
_REAPER_WAIT_S = 30.0


def engine_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The variables of this environment that engines on other nodes must see as well."""
    return {name: value for name, value in environ.items() if name.startswith(ENGINE_ENV_PREFIXES)}


def require_ray() -> Any:
    """Import Ray, or say how to install it (a `UsageError`: nothing has started)."""
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import ray
    except ImportError as exc:
        raise UsageError(f'--executor ray needs Ray ({exc}); install it with: pip install "caprl-cli[ray]"') from None
    return ray


@contextmanager
def ray_cluster(address: str | None, verbose: bool = False) -> Iterator[Any]:
    """Ray, connected to the cluster at `address`, or to a local cluster started here; yields the
    `ray` module. Disconnects (and a local cluster ends) on the way out, whatever ends the run."""
    ray = require_ray()
    if not verbose:  # Ray's notices (token authentication, ...) are not the run's
        logging.getLogger("ray").setLevel(logging.ERROR)
    runtime_env = {"env_vars": engine_env(os.environ)}
    reaper: subprocess.Popen | None = None
    temp_dir: str | None = None
    try:
        if address is None:
            temp_dir = tempfile.mkdtemp(prefix="caprl-ray-")
            marker = uuid.uuid4().hex
            reaper = start_reaper(marker, temp_dir)
            os.environ[MARKER_ENV] = marker
            log.info("starting a local Ray cluster (%s)", temp_dir)
            _init(ray, dict(_temp_dir=temp_dir, include_dashboard=False, num_cpus=local_cpus()), runtime_env, verbose)
        else:
            log.info("connecting to the Ray cluster at %s", address)
            _init(ray, dict(address=address), runtime_env, verbose)
        yield ray
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            os.environ.pop(MARKER_ENV, None)
            if reaper is not None:
                stop_reaper(reaper)


def local_cpus() -> int:
    """Logical CPUs of a local cluster: the machine's, and never fewer than 2, so engine actors and the
    preparation tasks beside them always fit (Ray waits silently for a CPU that never frees)."""
    return max(2, os.cpu_count() or 1)


def _init(ray: Any, where: dict[str, Any], runtime_env: dict[str, Any], verbose: bool) -> None:
    """`ray.init`, keeping the run's SIGTERM handler, with SIGINT held back while it runs."""
    previous_term = signal.getsignal(signal.SIGTERM)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        ray.init(
            **where,
            runtime_env=runtime_env,
            log_to_driver=verbose,
            configure_logging=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
        )
    except SystemExit:  # Ray's own SIGTERM handler ran while it started
        signal.signal(signal.SIGTERM, previous_term)
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler decides what a SIGTERM now means
        raise CaprlError("terminated while Ray started") from None
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where_text = f"the Ray cluster at {where['address']}" if "address" in where else "a local Ray cluster"
        raise CaprlError(f"cannot start or reach {where_text}: {exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held back arrives now


def start_reaper(marker: str, temp_dir: str) -> subprocess.Popen:
    """The process that ends the local cluster once this one is gone (see `execute.ray_reaper`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "caprl_cli.execute.ray_reaper", marker, temp_dir, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the run's process group does not reach it
        close_fds=True,
    )


def stop_reaper(reaper: subprocess.Popen) -> None:
    """Close the reaper's pipe (its signal to sweep) and wait for the sweep."""
    try:
        assert reaper.stdin is not None
        reaper.stdin.close()
    except OSError:
        pass
    try:
        reaper.wait(timeout=_REAPER_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning("the Ray cluster's clean-up is still running (pid %d)", reaper.pid)
