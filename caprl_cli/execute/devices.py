"""Which engines a run starts and which GPUs each one sees: pure functions, testable without a GPU.

One engine per visible GPU (or per group of `--tensor-parallel-size` GPUs) is the shape that fills a
box: engines are independent, so an uneven finish never hangs anyone. Each engine is told its devices
through `CUDA_VISIBLE_DEVICES`, set before its worker imports torch or vLLM. GPUs are counted here
without importing torch (`nvidia-smi -L`, else the driver's /proc entries), so the parent never
initialises CUDA itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from caprl_cli.errors import UsageError

if TYPE_CHECKING:
    from caprl_cli.settings import CaptionSettings

log = logging.getLogger("caprl")

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
_PROC_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class EnginePlacement:
    """One engine of the run: its number and the `CUDA_VISIBLE_DEVICES` it is started with (None: a
    CPU engine, started with the environment as it is)."""

    index: int
    devices: str | None

    @property
    def label(self) -> str:
        return f"engine {self.index} ({'GPU ' + self.devices if self.devices is not None else 'CPU'})"


def parse_gpus(text: str) -> tuple[int, ...]:
    """`--gpus 0,1,3` as (0, 1, 3): positions among the visible GPUs, each once."""
    parts = [part.strip() for part in text.split(",")]
    if not parts or any(not part.isdigit() for part in parts):
        raise UsageError(f"--gpus takes GPU numbers separated by commas (0,1,3), not {text!r}")
    gpus = tuple(int(part) for part in parts)
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus names a GPU twice: {text!r}")
    return gpus


def detect_gpu_count() -> int:
    """NVIDIA GPUs on this machine, found without importing torch: `nvidia-smi -L` if present, else the
    driver's /proc entries, else 0."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            listing = None
        if listing is not None and listing.returncode == 0:
            return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    try:
        return sum(1 for _ in _PROC_GPUS.iterdir())
    except OSError:
        return 0


def visible_gpus(environ: Mapping[str, str], count_gpus: Callable[[], int] = detect_gpu_count) -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` entries: an existing setting is kept
    as it is (numbers, UUIDs or MIG names; empty or -1: none), else every GPU the machine has."""
    setting = environ.get(CUDA_VISIBLE_DEVICES)
    if setting is not None:
        devices = [entry.strip() for entry in setting.split(",") if entry.strip()]
        # CUDA stops at the first invalid entry; -1 is the usual way to hide every GPU.
        if "-1" in devices:
            devices = devices[: devices.index("-1")]
        return devices
    return [str(number) for number in range(count_gpus())]


def plan_engines(
    visible: list[str], gpus: tuple[int, ...] | None, tensor_parallel_size: int, num_engines: int | None
) -> list[EnginePlacement]:
    """The engines to start. `gpus` picks visible GPUs by position; each engine takes
    `tensor_parallel_size` of them; `num_engines` sets the count (the only way to get several engines
    without GPUs: CPU engines). Anything no run can use is a `UsageError`."""
    if tensor_parallel_size < 1:
        raise UsageError("--tensor-parallel-size must be at least 1")
    if num_engines is not None and num_engines < 1:
        raise UsageError("--num-engines must be at least 1")
    if gpus is not None:
        if not visible:
            raise UsageError(f"--gpus {','.join(map(str, gpus))} was given but no GPU is visible")
        missing = [gpu for gpu in gpus if gpu >= len(visible)]
        if missing:
            raise UsageError(f"--gpus names GPU {missing[0]}, but only {len(visible)} GPUs are visible (0-{len(visible) - 1})")
        chosen = [visible[gpu] for gpu in gpus]
    else:
        chosen = list(visible)
    if not chosen:
        if tensor_parallel_size > 1:
            raise UsageError("--tensor-parallel-size needs GPUs, and none is visible")
        return [EnginePlacement(index, None) for index in range(num_engines or 1)]
    if len(chosen) % tensor_parallel_size:
        raise UsageError(
            f"{len(chosen)} GPUs cannot be split into engines of --tensor-parallel-size {tensor_parallel_size}"
        )
    groups = [chosen[start : start + tensor_parallel_size] for start in range(0, len(chosen), tensor_parallel_size)]
    if num_engines is not None:
        if num_engines > len(groups):
            raise UsageError(
                f"--num-engines {num_engines} needs {num_engines * tensor_parallel_size} GPUs, "
                f"but {len(chosen)} are available"
            )
        groups = groups[:num_engines]
    return [EnginePlacement(index, ",".join(group)) for index, group in enumerate(groups)]


def decode_workers_per_engine(workers: int, engines: int, cores: int | None = None) -> int:
    """Decoding processes for each engine: `--workers`, at most the cores each engine has (less one
    for the engine itself), but never fewer than two when `--workers` allows two: with a single one,
    an image whose read or decode is slow (a slow URL, a huge TIFF) would hold up every other image
    of its engine until `--decode-timeout`. A worker waiting on a read costs no core. 0 stays 0
    (decode in the engine's own process)."""
    if workers <= 0:
        return 0
    cores = cores or os.cpu_count() or 1
    return max(min(workers, 2), min(workers, cores // max(engines, 1) - 1))


def engine_placements(settings: CaptionSettings, environ: Mapping[str, str] | None = None) -> list[EnginePlacement]:
    """The engines a run starts, from its settings and the GPUs this machine shows."""
    if settings.engine == "openai":  # the server runs the model: one engine, in this process, no GPU
        return [EnginePlacement(0, None)]
    environ = os.environ if environ is None else environ
    placements = plan_engines(
        visible_gpus(environ), settings.gpus, settings.tensor_parallel_size, settings.num_engines
    )
    if placements[0].devices is None and settings.num_engines is None:
        log.info("no GPU found: captioning with one engine on the CPU")
    return placements
