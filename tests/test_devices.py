"""Device assignment: which engines a run starts and which GPUs each sees, without any GPU."""

from __future__ import annotations

import pytest

from caprl_cli.errors import UsageError
from caprl_cli.execute.devices import (
    EnginePlacement,
    decode_workers_per_engine,
    parse_gpus,
    plan_engines,
    visible_gpus,
)
from caprl_cli.execute.process import engine_cache_env
from caprl_cli.execute.units import unit_size
from caprl_cli.execute.units import restart_delay


def no_gpus() -> int:
    return 0


def devices_of(placements: list[EnginePlacement]) -> list[str | None]:
    return [placement.devices for placement in placements]


def test_one_engine_per_gpu_by_default() -> None:
    visible = visible_gpus({}, lambda: 4)
    assert visible == ["0", "1", "2", "3"]
    assert devices_of(plan_engines(visible, None, 1, None)) == ["0", "1", "2", "3"]


def test_an_existing_cuda_visible_devices_is_respected() -> None:
    visible = visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5,GPU-abc"}, lambda: 8)
    assert visible == ["2", "5", "GPU-abc"]
    # --gpus counts among the visible GPUs, as torch numbers them
    assert devices_of(plan_engines(visible, (1, 2), 1, None)) == ["5", "GPU-abc"]


@pytest.mark.parametrize("setting", ["", "-1", " , "])
def test_cuda_visible_devices_can_hide_every_gpu(setting: str) -> None:
    visible = visible_gpus({"CUDA_VISIBLE_DEVICES": setting}, lambda: 8)
    assert visible == []
    assert devices_of(plan_engines(visible, None, 1, None)) == [None]


def test_entries_after_minus_one_are_invisible() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,-1,4"}, lambda: 8) == ["3"]


def test_gpus_pick_devices() -> None:
    assert devices_of(plan_engines(["0", "1", "2", "3"], parse_gpus("0,1,3"), 1, None)) == ["0", "1", "3"]


def test_tensor_parallel_groups_gpus() -> None:
    placements = plan_engines(["0", "1", "2", "3"], None, 2, None)
    assert devices_of(placements) == ["0,1", "2,3"]
    assert [placement.index for placement in placements] == [0, 1]


def test_gpu_count_not_divisible_by_tensor_parallel_size_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="tensor-parallel-size"):
        plan_engines(["0", "1", "2"], None, 2, None)
    with pytest.raises(UsageError, match="tensor-parallel-size"):
        plan_engines(["0", "1", "2", "3"], (0, 1, 2), 2, None)


def test_num_engines_without_gpus_gives_cpu_engines() -> None:
    placements = plan_engines(visible_gpus({}, no_gpus), None, 1, 3)
    assert devices_of(placements) == [None, None, None]
    assert [placement.index for placement in placements] == [0, 1, 2]


def test_no_gpu_means_one_cpu_engine() -> None:
    assert devices_of(plan_engines(visible_gpus({}, no_gpus), None, 1, None)) == [None]


def test_num_engines_with_gpus_takes_the_first_groups() -> None:
    assert devices_of(plan_engines(["0", "1", "2", "3"], None, 1, 2)) == ["0", "1"]
    assert devices_of(plan_engines(["0", "1", "2", "3"], None, 2, 1)) == ["0,1"]


@pytest.mark.parametrize(
    ("visible", "gpus", "tp", "engines", "message"),
    [
        (["0", "1"], None, 1, 3, "needs 3 GPUs"),
        (["0", "1"], (2,), 1, None, "only 2 GPUs"),
        ([], (0,), 1, None, "no GPU"),
        ([], None, 2, None, "needs GPUs"),
        (["0"], None, 0, None, "at least 1"),
        (["0"], None, 1, 0, "at least 1"),
    ],
)
def test_impossible_placements_are_usage_errors(visible, gpus, tp, engines, message) -> None:
    with pytest.raises(UsageError, match=message):
        plan_engines(visible, gpus, tp, engines)


@pytest.mark.parametrize("text", ["", "a", "0,,1", "-1", "0,0", "1.5"])
def test_bad_gpu_lists_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_gpus(text)


def test_decode_workers_are_sized_from_cores_per_engine() -> None:
    assert decode_workers_per_engine(8, 8, cores=64) == 7
    assert decode_workers_per_engine(4, 8, cores=64) == 4
    assert decode_workers_per_engine(8, 2, cores=2) == 2  # one slow image must not hold up its engine
    assert decode_workers_per_engine(1, 2, cores=2) == 1
    assert decode_workers_per_engine(0, 2, cores=64) == 0


def test_each_engine_gets_its_own_compile_caches_unless_the_user_chose() -> None:
    first = engine_cache_env(EnginePlacement(0, "0"), {"HOME": "/h"})
    second = engine_cache_env(EnginePlacement(1, "1"), {"HOME": "/h"})
    assert set(first) == set(second) == {"VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    assert not set(first.values()) & set(second.values())
    chosen = engine_cache_env(EnginePlacement(0, "0"), {"VLLM_CACHE_ROOT": "/mine"})
    assert "VLLM_CACHE_ROOT" not in chosen


def test_units_are_small_enough_for_every_engine_to_get_several() -> None:
    assert unit_size(None, 2) == 32
    assert unit_size(24, 2) == 3
    assert unit_size(1, 8) == 1
    assert unit_size(100_000, 8) == 32


def test_restart_pauses_grow_and_are_capped() -> None:
    assert restart_delay(0) == 0
    assert restart_delay(1) < restart_delay(2) < restart_delay(3)
    assert restart_delay(50) == 30


def test_one_vllm_engine_with_its_core_apart_runs_in_a_worker() -> None:
    """One vLLM engine whose engine core is a process of its own (GPUs, or asked for) is run in an engine
    worker, whose process group ends with the parent; otherwise one engine stays in-process."""
    from caprl_cli.execute.devices import EnginePlacement
    from caprl_cli.execute.local import engine_core_apart

    gpu = EnginePlacement(index=0, devices="0")
    cpu = EnginePlacement(index=0, devices=None)
    assert engine_core_apart("vllm", gpu, {})
    assert not engine_core_apart("vllm", gpu, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert not engine_core_apart("vllm", cpu, {})
    assert engine_core_apart("vllm", cpu, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert not engine_core_apart("transformers", gpu, {})
