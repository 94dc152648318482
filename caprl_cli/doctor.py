"""`caprl doctor`: what a GPU box needs before a long run, checked in seconds instead of found out hours in.

Each check is a small function returning a `CheckResult` (ok, warn or fail, what was found, and for a
problem the fix), so each one is tested on its own without a GPU. Only `fail` makes the command exit 1;
`warn` is worth reading but does not stop a run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caprl_cli.engines.vllm_support import installed_vllm
from caprl_cli.model.catalog import GIB, KV_MARGIN_GIB, KV_MARGIN_SHARE, for_hub_id

OK, WARN, FAIL = "ok", "warn", "fail"
DEFAULT_MIN_FREE_GIB = 5.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: which check, how it went, what was found, how to fix a problem."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    @property
    def passed(self) -> bool:
        return self.status != FAIL


@dataclass(frozen=True)
class DoctorRequest:
    """What the coming run will use."""

    model: str
    output: str | None = None
    inputs: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict)
    min_free_gib: float | None = None


@dataclass(frozen=True)
class GpuInfo:
    """One visible GPU."""

    name: str
    memory_gib: float


# -- GPUs, CUDA, driver -----------------------------------------------------------------------------


def visible_gpus() -> list[GpuInfo]:
    """GPUs torch can use; failing that, those nvidia-smi lists (torch may be a CPU build)."""
    try:
        import torch

        if torch.cuda.is_available():
            return [
                GpuInfo(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / GIB)
                for i in range(torch.cuda.device_count())
            ]
    except Exception:  # a broken CUDA install: nvidia-smi may still tell
        pass
    rows = _nvidia_smi("name,memory.total")
    gpus = []
    for row in rows:
        name, _, memory = row.rpartition(",")
        try:
            gpus.append(GpuInfo(name.strip(), float(memory.strip()) / 1024))
        except ValueError:
            continue
    return gpus


def _nvidia_smi(fields: str) -> list[str]:
    """nvidia-smi's CSV rows for `fields`, empty when it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def check_gpus(gpus: list[GpuInfo], need_gib: float | None) -> CheckResult:
    """GPUs are visible, and the largest holds the model (one engine per GPU)."""
    if not gpus:
        return CheckResult(
            "gpu", FAIL, "no GPU visible (torch.cuda finds none, nvidia-smi lists none)",
            "install the NVIDIA driver and a CUDA build of torch, check CUDA_VISIBLE_DEVICES "
            "(and --gpus in containers); without a GPU, captioning runs on the CPU (the CPU build of vLLM, or --engine transformers), slowly",
        )
    largest = max(gpu.memory_gib for gpu in gpus)
    names = ", ".join(sorted({gpu.name for gpu in gpus}))
    found = f"{len(gpus)} GPU(s): {names}; {largest:.0f} GiB on the largest"
    if need_gib is None:
        return CheckResult("gpu", WARN, f"{found}; the model's memory need is unknown", None)
    if largest < need_gib:
        return CheckResult(
            "gpu", FAIL, f"{found}; the model needs about {need_gib:.0f} GiB per engine",
            "pick a smaller model (caprl models), or spread one engine over several GPUs "
            "with --tensor-parallel-size N",
        )
    return CheckResult("gpu", OK, f"{found}; the model needs about {need_gib:.0f} GiB per engine")


def check_cuda(gpus: list[GpuInfo]) -> CheckResult:
    """torch's CUDA build and the driver's version, side by side."""
    try:
        import torch

        cuda = torch.version.cuda
    except Exception as exc:
        return CheckResult("cuda", FAIL, f"torch does not import: {exc}", 'pip install "caprl-cli[vllm]"')
    drivers = sorted(set(_nvidia_smi("driver_version")))
    driver = ", ".join(drivers) if drivers else "none found"
    if cuda is None:
        status = FAIL if gpus else WARN
        return CheckResult(
            "cuda", status, f"torch {torch.__version__} is built without CUDA; driver {driver}",
            "install a CUDA build of torch matching the driver (the vLLM wheel brings one)",
        )
    if not drivers:
        return CheckResult(
            "cuda", FAIL, f"torch built for CUDA {cuda}; no NVIDIA driver found",
            "install the NVIDIA driver (nvidia-smi must run)",
        )
    return CheckResult("cuda", OK, f"torch built for CUDA {cuda}; driver {driver}")


# -- libraries --------------------------------------------------------------------------------------


def installed_version(*names: str) -> tuple[str, str] | None:
    """(distribution, version) of the first installed distribution among `names`."""
    from importlib import metadata

    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def transformers_requirement(vllm_dist: str) -> str | None:
    """The version specifier vLLM's distribution declares for transformers, None if it declares none."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    for line in metadata.requires(vllm_dist) or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name.lower() == "transformers" and requirement.marker is None:
            return str(requirement.specifier)
    return None


def check_libraries(
    vllm: tuple[str, str] | None, transformers: tuple[str, str] | None, requirement: str | None
) -> CheckResult:
    """vLLM and transformers are installed, and transformers is a version vLLM declares it works with."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if transformers is None:
        return CheckResult("libraries", FAIL, "transformers is not installed", "pip install caprl-cli")
    if vllm is None:
        return CheckResult(
            "libraries", WARN, f"transformers {transformers[1]}; vLLM is not installed (only --engine transformers)",
            'pip install "caprl-cli[vllm]"',
        )
    found = f"{vllm[0]} {vllm[1]}, transformers {transformers[1]}"
    if not requirement:
        return CheckResult("libraries", OK, f"{found} (vLLM declares no transformers version)")
    try:
        fits = SpecifierSet(requirement).contains(transformers[1], prereleases=True)
    except InvalidSpecifier:
        return CheckResult("libraries", WARN, f"{found}; vLLM's requirement {requirement!r} does not parse")
    if not fits:
        return CheckResult(
            "libraries", FAIL, f"{found}; vLLM wants transformers{requirement}",
            f'pip install "transformers{requirement}"',
        )
    return CheckResult("libraries", OK, f"{found}; vLLM wants transformers{requirement}")


def check_vllm_release(vllm: tuple[str, str]) -> CheckResult:
    """The installed vLLM is a release caprl's vLLM engine is tested with (engines/vllm_support.py)."""
    from caprl_cli.engines.vllm_support import TESTED_VLLM, VLLM_FIX, untested_vllm

    problem = untested_vllm(vllm)
    if problem is not None:
        return CheckResult("vllm", FAIL, problem, VLLM_FIX)
    return CheckResult("vllm", OK, f"{vllm[0]} {vllm[1]} is in the tested range vllm{TESTED_VLLM}")


# -- the model --------------------------------------------------------------------------------------


def weights_bytes(folder: Path) -> int:
    """Size of the weight files in a model folder (what loading it puts on a GPU, at its dtype)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def memory_need_gib(weights: int) -> float:
    """GPU memory one engine needs for weights of this size: the catalog's rule (weights + 20% + 4 GiB)."""
    return weights / GIB * (1 + KV_MARGIN_SHARE) + KV_MARGIN_GIB


def check_model(model: str, offline: bool | None = None) -> tuple[CheckResult, float | None]:
    """The model's files are there (a folder, or the hub cache when offline) or the hub answers.

    Also returns the GPU memory the model needs (catalog entry, else the size of its weights), or None.
    """
    from caprl_cli.model.source import looks_like_path

    entry = for_hub_id(model)
    need: float | None = float(entry.gpu_memory_gib) if entry else None
    folder = Path(model).expanduser()
    if folder.is_dir() or looks_like_path(model):
        if not (folder / "config.json").is_file():
            return CheckResult(
                "model", FAIL, f"{model} is not a model folder (no config.json)",
                "point --model at a folder holding config.json and the weights, or use a hub id",
            ), need
        weights = weights_bytes(folder)
        if weights == 0:
            return CheckResult("model", FAIL, f"{model} holds no weight files", "copy the *.safetensors files in"), need
        return CheckResult("model", OK, f"local folder {model}, {weights / GIB:.2f} GiB of weights"), memory_need_gib(weights)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cached = _cached_snapshot(model)
    if cached is not None:
        weights = weights_bytes(cached)
        return CheckResult("model", OK, f"{model} is in the hub cache ({cached})"), need or (
            memory_need_gib(weights) if weights else None
        )
    if offline:
        return CheckResult(
            "model", FAIL, f"{model} is not in the hub cache and HF_HUB_OFFLINE is set",
            f"download it once with network access (huggingface-cli download {model}) or unset HF_HUB_OFFLINE",
        ), need
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        return CheckResult(
            "model", FAIL, f"{model} is not cached and the hub does not give it: {reason}",
            "check the id (caprl models), the network, and HF_TOKEN for gated models",
        ), need
    return CheckResult("model", WARN, f"{model} is reachable but not cached: the run downloads it first"), need


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


# -- output place, backends ----------------------------------------------------------------------------


def protocol_of(location: str) -> str:
    """fsspec protocol of a path or URL; `file` for local paths."""
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(location)
    return protocol or "file"


def check_backend(location: str) -> CheckResult:
    """The fsspec backend for `location`'s protocol imports."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = protocol_of(location)
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        known = known_implementations.get(protocol, {})
        hint = known.get("err") if isinstance(known, dict) else None
        fix = hint or f"install the fsspec backend for {protocol}://, or check the URL's spelling"
        return CheckResult("backend", FAIL, f"{protocol}:// for {_short(location)}: {' '.join(str(exc).split())[:160]}", fix)
    return CheckResult("backend", OK, f"{protocol}:// for {_short(location)}")


def _short(location: str) -> str:
    from caprl_cli.storage import redact

    return redact(location)


def nearest_existing(path: Path) -> Path:
    """The folder a new file at `path` would go into, or its closest existing ancestor."""
    path = path.expanduser().absolute()
    candidate = path if path.is_dir() else path.parent
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def check_writable(place: Path, label: str) -> CheckResult:
    """Write permission at `place`, proven by creating and removing a file there."""
    try:
        with tempfile.NamedTemporaryFile(dir=place, prefix=".caprl-doctor-"):
            pass
    except OSError as exc:
        return CheckResult(
            label, FAIL, f"cannot write in {place}: {exc.strerror or exc}",
            f"choose an output you can write (-o), or fix the permissions of {place}",
        )
    return CheckResult(label, OK, f"can write in {place}")


def check_free_space(place: Path, label: str, min_free_gib: float) -> CheckResult:
    """Free space at `place` (output and its state) against the threshold."""
    free = shutil.disk_usage(place).free / GIB
    if free < min_free_gib:
        return CheckResult(
            label, FAIL, f"{free:.1f} GiB free in {place}, below {min_free_gib:g} GiB",
            "free some space or write elsewhere (-o, --state-dir); --min-free-gib sets the threshold",
        )
    return CheckResult(label, OK, f"{free:.1f} GiB free in {place} (at least {min_free_gib:g} GiB wanted)")


def check_output(output: str, min_free_gib: float) -> list[CheckResult]:
    """A local output: write access and space where it goes (its state lives beside it).
    A remote output: its backend, and the local state folder under ~/.cache/caprl."""
    if protocol_of(output) != "file":
        state = nearest_existing(Path("~/.cache/caprl"))
        return [
            check_backend(output),
            check_writable(state, "state"),
            check_free_space(state, "state space", min_free_gib),
        ]
    local = output[len("file://"):] if output.startswith("file://") else output
    place = nearest_existing(Path(local))
    return [check_writable(place, "output"), check_free_space(place, "disk space", min_free_gib)]


# -- all together ---------------------------------------------------------------------------------------


def run_checks(request: DoctorRequest, gpus: Callable[[], list[GpuInfo]] = visible_gpus) -> list[CheckResult]:
    """Every check for `request`, in the order the report prints them."""
    found_gpus = gpus()
    model_result, need = check_model(request.model)
    vllm = installed_vllm()
    results = [
        check_gpus(found_gpus, need),
        check_cuda(found_gpus),
        check_libraries(vllm, installed_version("transformers"), transformers_requirement(vllm[0]) if vllm else None),
        *([check_vllm_release(vllm)] if vllm is not None else []),  # none: the libraries line says so
        model_result,
    ]
    min_free = request.min_free_gib if request.min_free_gib is not None else DEFAULT_MIN_FREE_GIB
    if request.output is not None:
        results.extend(check_output(request.output, min_free))
    for location in request.inputs:
        if protocol_of(location) != "file":
            results.append(check_backend(location))
    return results


def render(results: list[CheckResult]) -> str:
    """One line per check, and an indented fix line under each problem."""
    lines = []
    for result in results:
        lines.append(f"{result.status:<4}  {result.name}: {result.detail}")
        if result.fix and result.status != OK:
            lines.append(f"      fix: {result.fix}")
    failed = sum(not result.passed for result in results)
    lines.append("caprl: all checks passed" if not failed else f"caprl: {failed} check(s) failed")
    return "\n".join(lines)
