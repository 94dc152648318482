"""The local executor: the engines of this machine, one in this process or several in worker processes.

One engine runs in this process with a decode pool beside it, through the same caption stream the
engine hosts use. Several engines (one per GPU) run as engine worker processes under the fleet loop
(`execute.fleet` over `execute.process`). One vLLM engine whose engine core runs in a process of its
own (on GPUs, or when VLLM_ENABLE_V1_MULTIPROCESSING=1 asks for it) also goes to a worker: that engine
core would outlive a kill -9 of this process, while an engine worker leads a process group that ends
with its driver.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from caprl_cli.engines import start_engine
from caprl_cli.engines.base import Engine
from caprl_cli.errors import EngineStartError
from caprl_cli.execute.devices import CUDA_VISIBLE_DEVICES, EnginePlacement, decode_workers_per_engine
from caprl_cli.execute.fleet import Fleet, Slot
from caprl_cli.execute.job import CaptionJob, RunOutcome
from caprl_cli.execute.process import ProcessTransport
from caprl_cli.execute.stream import caption_stream
from caprl_cli.execute.units import EngineStats
from caprl_cli.faults import pause_point
from caprl_cli.prepare.pool import Preprocessor

log = logging.getLogger("caprl")


class LocalExecutor:
    """The engines placed on this machine (`execute.devices.engine_placements`)."""

    def __init__(self, placements: list[EnginePlacement]) -> None:
        self.placements = placements

    def run(self, job: CaptionJob) -> RunOutcome:
        return run_locally(job, self.placements)


def run_locally(job: CaptionJob, placements: list[EnginePlacement]) -> RunOutcome:
    """Caption the job with the engines placed on this machine (see the module doc)."""
    if len(placements) == 1 and not engine_core_apart(job.settings.engine, placements[0], os.environ):
        devices = placements[0].devices
        if devices is not None:  # before torch or vLLM is imported here
            os.environ[CUDA_VISIBLE_DEVICES] = devices
        return run_in_process(job)
    decode_workers = decode_workers_per_engine(job.settings.workers, len(placements))
    log.info(
        "starting %d engines (%s), %d decode workers each",
        len(placements),
        ", ".join(placement.label for placement in placements),
        decode_workers,
    )
    transport = ProcessTransport(
        {p.index: job.host_config(p.index, decode_workers) for p in placements}, {p.index: p for p in placements}
    )
    slots = [Slot(p.index, p.label, EngineStats(p.index, p.devices)) for p in placements]
    return Fleet(job, transport, slots).run()


def engine_core_apart(engine: str, placement: EnginePlacement, environ: Mapping[str, str]) -> bool:
    """Whether the engine runs its core in a separate process: vLLM does on GPUs unless told not to
    (its CPU build is kept in-process by the engine itself), and wherever it is told to."""
    if engine != "vllm":
        return False
    asked = environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if asked is not None:
        return asked.strip() not in ("", "0")
    return placement.devices is not None


def run_in_process(job: CaptionJob) -> RunOutcome:
    """Caption the job's samples with one engine in this process."""
    settings, stopper = job.settings, job.stopper
    preprocessor = Preprocessor(job.decode, settings.workers)
    engine: Engine | None = None
    try:
        try:
            pause_point("model.loading")
            engine = start_engine(settings.engine, job.spec)
        except EngineStartError:
            if stopper.reason is None:
                raise
            return job.outcome(None)  # a signal during loading took the engine down
        pause_point("model.loaded")
        if stopper.should_stop():
            return job.outcome(engine.version, engine.prompt_sent)
        job.begin_captioning(engine.version)
        outcomes = preprocessor.prepare(job.samples, stopper.should_stop)
        try:
            caption_stream(engine, outcomes, job.sink, job.model, job.keep_images, stopper.should_stop)
        except Exception:
            if stopper.reason is None:
                raise
            log.debug("engine stopped with an error after %s", stopper.reason.value, exc_info=True)
        return job.outcome(engine.version, engine.prompt_sent)
    finally:
        job.sink.progress.close()
        preprocessor.close()
        if engine is not None:
            engine.close()
