"""`--executor ray`: the fleet loop's engine hosts as Ray actors, on any node of a cluster.

Each actor is an engine host (`execute.host`) like a local engine worker: it loads its engine, reads
and prepares the images it captions in its own decode pool (so `--decode-timeout`, `--max-image-bytes`,
crash isolation and completion order hold on every node), and streams each row back as it finishes.
The host runs on a thread of the actor's own; the driver reaches it through one call, `exchange`, kept
outstanding per actor: it carries the driver's messages in (units, end, stop) and brings back whatever
the host has sent since (rows, beats, ready), waiting briefly when there is nothing yet. One call at a
time keeps the messages in order, and a dead actor (killed, out of memory, its node lost) shows as
that call failing, which gives its work back to the queue at once.

Engines: one per GPU of the cluster (or per `--tensor-parallel-size` GPUs), or `--num-engines`; on a
cluster without GPUs, one CPU engine unless `--num-engines` says more. Each engine keeps as many
requests in flight as it would locally (its appetite: the engine's `max_in_flight` and its decode
window), and the rows of every node are committed here, by the run's one writer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from caprl_cli.errors import UsageError
from caprl_cli.execute.devices import decode_workers_per_engine
from caprl_cli.execute.fleet import Fleet, Message, Slot
from caprl_cli.execute.job import CaptionJob, HostConfig, RunOutcome
from caprl_cli.execute.ray_cluster import ray_cluster
from caprl_cli.execute.units import EngineStats

log = logging.getLogger("caprl")

ENGINE_CPUS = 0.5  # logical CPUs one engine actor asks for (besides its GPUs); its decode workers mostly wait on I/O
EXCHANGE_WAIT_S = 0.2  # how long an exchange waits in the actor for something to bring back
_MAX_BATCH = 4096  # messages one exchange brings back at most


# -- what runs on the cluster ---------------------------------------------------------------------------


class EngineActor:
    """The body of an engine actor: an engine host on a thread of its own, and its mailbox."""

    def __init__(self, config: HostConfig) -> None:
        from caprl_cli.execute.host import EngineLink

        self._outbox: queue.Queue[Message] = queue.Queue()
        self._link = EngineLink(self._outbox.put)
        # The decode workers die with the thread that started them (PR_SET_PDEATHSIG): the host's
        # thread lives as long as the actor.
        threading.Thread(target=self._host, args=(config,), name="caprl-engine-host", daemon=True).start()

    def _host(self, config: HostConfig) -> None:
        from caprl_cli.execute.host import serve

        clean, why = False, "its engine could not start"
        try:
            clean = serve(config, self._link)
            why = "it ended"
        except BaseException as exc:
            self._outbox.put(("crashed", f"{type(exc).__name__}: {exc}"))
            why = "an exception ended it"
        self._outbox.put(("exit", clean, why))

    def exchange(self, incoming: list[Message], wait_s: float) -> list[Message]:
        """Deliver the driver's messages; return what the host sent since the last call, waiting up to
        `wait_s` for a first message."""
        for message in incoming:
            self._link.deliver(message)
        try:
            out = [self._outbox.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while len(out) < _MAX_BATCH:
            try:
                out.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        return out


# -- the driver's side ----------------------------------------------------------------------------------


@dataclass
class ActorHandle:
    """An actor, the driver's messages waiting for its next exchange, and the exchange in flight."""

    actor: Any
    outgoing: list[Message] = field(default_factory=list)
    call: Any = None  # the ObjectRef of the exchange in flight


class RayTransport:
    """Engine hosts as Ray actors (see the module doc)."""

    waiting_hint = ": the Ray cluster may lack the resources it asks for"

    def __init__(self, ray: Any, actor_class: Any, configs: dict[int, HostConfig]) -> None:
        self.ray = ray
        self.actor_class = actor_class
        self.configs = configs

    def start(self, slot: Slot) -> None:
        slot.handle = ActorHandle(self.actor_class.remote(self.configs[slot.index]))
        log.debug("started %s", slot.label)

    def receive(self, slots: list[Slot], timeout: float) -> Iterator[tuple[Slot, Message]]:
        live = [slot for slot in slots if slot.alive]
        if not live:
            time.sleep(timeout)
            return
        for slot in live:
            handle = slot.handle
            if handle.call is None:
                handle.call = handle.actor.exchange.remote(handle.outgoing, EXCHANGE_WAIT_S)
                handle.outgoing = []
        calls = {slot.handle.call: slot for slot in live}
        done, _ = self.ray.wait(list(calls), num_returns=1, timeout=timeout)
        if done:
            done, _ = self.ray.wait(list(calls), num_returns=len(calls), timeout=0)
        for ref in done:
            slot = calls[ref]
            if not slot.alive or slot.handle.call is not ref:
                continue
            slot.handle.call = None
            try:
                messages = self.ray.get(ref)
            except Exception as exc:  # the actor died, or its node: its work goes back at once
                yield slot, ("exit", False, describe_failure(exc))
                continue
            for message in messages:
                if not slot.alive:
                    break  # given up on while its messages were read
                yield slot, message

    def send(self, slot: Slot, message: Message) -> bool:
        if not slot.alive:
            return False
        slot.handle.outgoing.append(message)  # goes with the next exchange, within EXCHANGE_WAIT_S
        return True

    def kill(self, slot: Slot) -> None:
        handle, slot.handle, slot.ready = slot.handle, None, False
        if handle is None:
            return
        try:
            self.ray.kill(handle.actor, no_restart=True)
        except Exception:
            pass  # already gone


@dataclass(frozen=True)
class RayPlacement:
    """How many engines the cluster runs and what each actor asks for."""

    engines: int
    gpus_per_engine: int  # 0: CPU engines


def place_engines(cluster_gpus: int, num_engines: int | None, tensor_parallel_size: int) -> RayPlacement:
    """One engine per `tensor_parallel_size` GPUs of the cluster, or `num_engines`; CPU engines on a
    cluster without GPUs. A count the cluster cannot hold is a `UsageError` (Ray would wait forever)."""
    if cluster_gpus <= 0:
        if tensor_parallel_size > 1:
            raise UsageError("--tensor-parallel-size needs GPUs, and the Ray cluster has none")
        return RayPlacement(num_engines or 1, 0)
    fits = cluster_gpus // tensor_parallel_size
    if fits < 1:
        raise UsageError(
            f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} GPUs; the Ray cluster has {cluster_gpus}"
        )
    if num_engines is not None and num_engines > fits:
        raise UsageError(
            f"--num-engines {num_engines} needs {num_engines * tensor_parallel_size} GPUs, "
            f"but the Ray cluster has {cluster_gpus}"
        )
    return RayPlacement(num_engines or fits, tensor_parallel_size)


class RayExecutor:
    """The engines of a Ray cluster: the one at `--ray-address`, or a local one started for the run."""

    def run(self, job: CaptionJob) -> RunOutcome:
        return run_on_ray(job)


def run_on_ray(job: CaptionJob) -> RunOutcome:
    """Caption the job on a Ray cluster (see the module doc)."""
    settings = job.settings
    with ray_cluster(settings.ray_address, log.isEnabledFor(logging.DEBUG)) as ray:
        placement = place_engines(
            int(ray.cluster_resources().get("GPU", 0)), settings.num_engines, settings.tensor_parallel_size
        )
        actor_class = ray.remote(num_cpus=ENGINE_CPUS, num_gpus=placement.gpus_per_engine, max_restarts=0)(EngineActor)
        decode_workers = decode_workers_per_engine(settings.workers, 1)
        configs = {index: job.host_config(index, decode_workers) for index in range(placement.engines)}
        where = f"{placement.gpus_per_engine} GPU" if placement.gpus_per_engine else "CPU"
        slots = [Slot(index, f"engine {index} (Ray, {where})", EngineStats(index, None)) for index in configs]
        log.info("starting %d engines on Ray (%s each), %d decode workers each", len(slots), where, decode_workers)
        return Fleet(job, RayTransport(ray, actor_class, configs), slots).run(where=" (Ray)")


def describe_failure(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]
