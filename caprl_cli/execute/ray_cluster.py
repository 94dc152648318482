"""The Ray cluster a `--executor ray` run works on: an existing one (`--ray-address`), or a local one
the run starts, and always ends, itself.

A local cluster gets a temporary folder of its own, no dashboard and no usage reporting, and the
engines' environment (vLLM's CPU settings and the like) is set before `ray.init`, so every Ray process
inherits it; actors on a remote cluster get the same variables through the job's runtime environment.
The cluster is shut down on every way out of the run (its end, an error, SIGINT/SIGTERM); a run
killed with SIGKILL cannot do that, so its reaper (`execute.ray_reaper`) ends the cluster's processes
then. With `--ray-address` the run only connects and disconnects: the cluster is someone else's.

A cluster with token authentication (Ray's default for `ray start --head` once a token exists) needs
`RAY_AUTH_MODE=token` in its clients, and Ray never turns it on for an address given explicitly. It
cannot be turned on whenever a token exists either: a driver in token mode on a cluster without
authentication connects, but its actors die unstarted (the driver's own server wants a token the
cluster never sends). So before connecting, a short subprocess asks the cluster's GCS, as a client
without a token, whether it answers (`probe_cluster`): if it refuses for authentication and a token
is available (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, Ray's own order), the run
uses token mode, after a second probe with the token; if none is available, or the cluster refuses
it, the run ends with one line saying what to set, and Ray's reason. The probe also ends a run on an
address nothing answers at after about 40 s, where `ray.init` would retry for many minutes. It runs
in a subprocess so that Ray's C++ warnings stay off the run's stderr and its process-wide settings
stay out of the run. A `RAY_AUTH_MODE` the user set is kept.

`ray.init` replaces the SIGTERM handler, so the run's own (`execute.stopping`) is put back afterwards;
and SIGINT is held back while the local cluster starts, so the processes it starts inherit it blocked:
a Ctrl-C, which reaches the whole process group, stops the run the normal way (drain, commit) instead
of killing the engines under it.
"""

from __future__ import annotations

import logging
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
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
AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Ray's GCS client gives up on an address that does not answer after about 40 s; the probe waits longer.
_PROBE_WAIT_S = 90.0
_TOKEN_HELP = (
    "set RAY_AUTH_TOKEN_PATH to a file holding the cluster's token (`ray get-auth-token` on its head prints it), "
    "or RAY_AUTH_TOKEN to the token, or copy it to ~/.ray/auth_token"
)
# Run as `python -c _PROBE ADDRESS`: one JSON line, {"outcome": ok|auth|unreachable|unknown, "reason": ...}.
_PROBE = r"""
import json, sys
def say(outcome, reason=""):
    print(json.dumps({"outcome": outcome, "reason": reason}), flush=True)
try:
    from ray._private.services import canonicalize_bootstrap_address
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError
except Exception as exc:
    say("unknown", repr(exc))
    sys.exit()
try:
    address = canonicalize_bootstrap_address(sys.argv[1])
    if address is None:
        say("unknown", "no address")
        sys.exit()
    GcsClient(address=address)
except AuthenticationError as exc:
    say("auth", getattr(exc, "message", str(exc)))
except RpcError as exc:
    say("unreachable", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
except Exception as exc:
    say("unknown", repr(exc))
else:
    say("ok")
"""


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
    auth_mode_before = os.environ.get(AUTH_MODE_ENV)  # a local cluster sets it too (Ray's own default)
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
            auth_mode = choose_auth_mode(address, os.environ)
            if auth_mode is not None:
                set_auth_mode(auth_mode)
            _init(ray, dict(address=address), runtime_env, verbose)
        yield ray
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            os.environ.pop(MARKER_ENV, None)
            if os.environ.get(AUTH_MODE_ENV) != auth_mode_before:
                set_auth_mode(auth_mode_before)
            if reaper is not None:
                stop_reaper(reaper)


def token_source(environ: Mapping[str, str]) -> str | None:
    """Where Ray would take a token from, in its own order, or None: `RAY_AUTH_TOKEN`, else the file
    `RAY_AUTH_TOKEN_PATH` names (Ray looks no further when it is set), else `~/.ray/auth_token`."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if named := environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({named})" if _has_text(Path(named)) else None
    default = Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
    return "~/.ray/auth_token" if _has_text(default) else None


def _has_text(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def probe_cluster(address: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """(outcome, Ray's reason) of a GCS client connecting to `address` with this environment, in a
    subprocess: "ok", "auth" (it wants a token, or another one), "unreachable", or "unknown" (the probe
    itself failed: Ray's internals moved; the caller then connects as it always did)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            env=dict(environ), capture_output=True, text=True, timeout=_PROBE_WAIT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "unreachable", f"no answer in {_PROBE_WAIT_S:.0f} s"
    except OSError as exc:
        return "unknown", str(exc)
    log.debug("Ray cluster probe of %s: %s %s", address, done.stdout.strip(), done.stderr.strip()[-2000:])
    for line in reversed(done.stdout.splitlines()):
        try:
            answer = json.loads(line)
            return str(answer["outcome"]), str(answer.get("reason", ""))
        except (ValueError, KeyError, TypeError):
            continue
    return "unknown", done.stderr.strip()[-500:]


def choose_auth_mode(address: str, environ: Mapping[str, str]) -> str | None:
    """The `RAY_AUTH_MODE` this run needs to connect to the cluster at `address` (None: leave it as it
    is), or a `CaprlError` saying why it cannot connect (see the module doc)."""
    if address.startswith("ray://"):  # Ray Client: no GCS to ask here
        return None
    chosen = environ.get(AUTH_MODE_ENV)
    outcome, reason = probe_cluster(address, {**environ, AUTH_MODE_ENV: chosen or "disabled"})
    if outcome == "ok":
        # Ray would turn token mode on by itself for `auto` when a token exists: this cluster has none
        return None if chosen else "disabled"
    if outcome == "unreachable":
        raise CaprlError(f"cannot reach the Ray cluster at {address}: {reason}")
    if outcome != "auth":
        return None
    if chosen is not None and chosen.lower() == "token":
        raise token_refused(address, token_source(environ), reason)
    if chosen is not None:
        raise CaprlError(
            f"the Ray cluster at {address} wants an authentication token, and {AUTH_MODE_ENV}={chosen} is set: "
            f"unset it or set {AUTH_MODE_ENV}=token, and {_TOKEN_HELP} (Ray: {reason})"
        )
    source = token_source(environ)
    if source is None and (named := environ.get("RAY_AUTH_TOKEN_PATH")):
        raise CaprlError(
            f"the Ray cluster at {address} wants an authentication token, and RAY_AUTH_TOKEN_PATH names {named}, "
            f"which cannot be read or is empty: {_TOKEN_HELP} (Ray: {reason})"
        )
    if source is None:
        raise token_refused(address, None, reason)
    outcome, reason = probe_cluster(address, {**environ, AUTH_MODE_ENV: "token"})
    if outcome == "auth":
        raise token_refused(address, source, reason)
    log.info("the Ray cluster at %s wants a token: using the one from %s", address, source)
    return "token"


def set_auth_mode(mode: str | None) -> None:
    """Set (None: unset) `RAY_AUTH_MODE` for this process and its children, and make Ray's C++ side,
    which read its configuration when Ray was imported, see it: `ray.init` checks tokens there."""
    if mode is None:
        os.environ.pop(AUTH_MODE_ENV, None)
    else:
        os.environ[AUTH_MODE_ENV] = mode
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")  # what Ray's own `_enable_token_auth` does
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as exc:  # Ray's internals moved: ray.init reports what follows
        log.debug("cannot refresh Ray's configuration: %s", exc)


def token_refused(address: str, source: str | None, reason: str) -> CaprlError:
    """The one line for a cluster that wants a token this run lacks, or refused the one it has."""
    if source is None:
        return CaprlError(
            f"the Ray cluster at {address} wants an authentication token and none is set: {_TOKEN_HELP} (Ray: {reason})"
        )
    return CaprlError(
        f"the Ray cluster at {address} refused the authentication token from {source}: "
        f"it is not this cluster's token; {_TOKEN_HELP} (Ray: {reason})"
    )


def _auth_reason(exc: BaseException) -> str | None:
    """Ray's authentication message somewhere in `exc`'s chain (`ray.init` wraps it in a
    ConnectionError whose cause quotes a traceback), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError":
            return str(getattr(seen, "message", seen))
        for line in str(seen).splitlines():
            if "AuthenticationError: " in line:
                return line.split("AuthenticationError: ", 1)[1].split(". ", 1)[0]
        seen = seen.__cause__ or seen.__context__
    return None


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
    except Exception as exc:  # Ray's AuthenticationError is none of the usual ones
        address = where.get("address")
        reason = _auth_reason(exc)
        if reason is not None and address is not None:
            raise token_refused(address, token_source(os.environ), reason) from None
        if reason is None and not isinstance(exc, (ConnectionError, RuntimeError, ValueError, TimeoutError)):
            raise
        where_text = f"the Ray cluster at {address}" if address is not None else "a local Ray cluster"
        raise CaprlError(f"cannot start or reach {where_text}: {reason or exc}") from None
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
