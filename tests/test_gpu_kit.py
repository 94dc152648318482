"""The GPU kit (bench/gpu/), tested here without a GPU: the random-weight CapRL-3B builder at a reduced
size, the FLOP count's parameter arithmetic against a built model, the wheel carry sets, and the driver
on the vLLM CPU build."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "bench" / "gpu"


def kit_module(name: str) -> ModuleType:
    sys.path.insert(0, str(KIT))
    spec = importlib.util.spec_from_file_location(name, KIT / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


caprl3b = kit_module("caprl3b")
estimate = kit_module("estimate")
carry = kit_module("carry")


@pytest.fixture(scope="module")
def reduced_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return caprl3b.build(tmp_path_factory.mktemp("kit") / "caprl3b-reduced", reduced=True, device="cpu")


# -- the model builder -------------------------------------------------------------------------------


def test_the_reduced_model_changes_only_widths_and_depths(reduced_model: Path) -> None:
    config = json.loads((reduced_model / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    for key, value in caprl3b.TEXT_CONFIG.items():
        if key not in caprl3b.REDUCED_TEXT:
            assert text[key] == value, key
    for key, value in caprl3b.VISION_CONFIG.items():
        if key not in caprl3b.REDUCED_VISION:
            assert vision[key] == value, key
    assert text["vocab_size"] == 151_936
    assert (config["image_token_id"], config["vision_start_token_id"], config["vision_end_token_id"]) == (
        151_655, 151_652, 151_653)


def test_the_tokenizer_has_qwens_ids_and_encodes_any_text(reduced_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reduced_model)
    assert len(tokenizer) == 151_665
    assert [tokenizer.convert_tokens_to_ids(t) for t in caprl3b.SPECIAL_TOKENS] == list(range(151_643, 151_665))
    text = "A red car, parked near 3 trees — «ünïcode» 漢字 🚗.\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert max(ids) < 151_643 and tokenizer.decode(ids) == text
    assert len(set(tokenizer.get_vocab().values())) == 151_665


def test_the_parameter_count_of_the_flop_estimate_is_the_models(reduced_model: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(reduced_model / "model.safetensors"), "pt") as weights:
        counted = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    total = 0
    for shape in counted.values():
        size = 1
        for dim in shape:
            size *= dim
        total += size
    text, vision = caprl3b.configs(reduced=True)
    assert total == sum(estimate.vision_params(vision).values()) + sum(estimate.text_params(text).values())
    full_text, full_vision = caprl3b.configs()
    # Qwen2.5-VL-3B: 0.67B in the vision tower, 3.09B in the language model (tied embeddings).
    assert sum(estimate.vision_params(full_vision).values()) == 668_684_288
    assert sum(estimate.text_params(full_text).values()) == 3_085_938_688


def test_the_estimate_adds_up_its_parts() -> None:
    found = estimate.estimate(1280, 512, efficiency=0.5)
    assert found.total_tflop == pytest.approx(found.vision_tflop + found.prefill_tflop + found.decode_tflop)
    assert found.images_per_s == pytest.approx(790 * 0.5 / found.total_tflop)
    longer = estimate.estimate(1280, 1024, efficiency=0.5)
    assert longer.vision_tflop == found.vision_tflop and longer.decode_tflop > 2 * found.decode_tflop * 0.99


# -- the carry sets ----------------------------------------------------------------------------------


def fake_wheel(folder: Path, name: str, size: int, requires: list[str] = ()) -> Path:
    """A wheel-shaped zip with a METADATA and `size` bytes of incompressible payload."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        lines = [f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(lines) + "\n")
        archive.writestr(f"{name}/payload.bin", os.urandom(size))
    return path


def test_sets_stay_under_the_limit_and_join_back_to_the_same_wheels(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    made = [fake_wheel(wheels, "big", 5_000), fake_wheel(wheels, "mid", 1_500), fake_wheel(wheels, "tiny", 10)]
    limit = 2_000
    folders = carry.plan(made, tmp_path / "carry", limit)
    for folder in folders:
        pieces = [p for p in folder.iterdir() if p.name != carry.MANIFEST]
        assert sum(p.stat().st_size for p in pieces) <= limit
    assert len(folders) == 4  # 6.7 kB in pieces of at most 2 kB, packed first fit
    ready = carry.assemble(tmp_path / "carry", tmp_path / "ready")
    assert sorted(p.name for p in ready) == sorted(w.name for w in made)
    assert all((tmp_path / "ready" / w.name).read_bytes() == w.read_bytes() for w in made)


def test_a_missing_set_or_a_damaged_piece_is_named(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    made = [fake_wheel(wheels, "big", 5_000)]
    folders = carry.plan(made, tmp_path / "carry", 2_000)
    piece = next(p for p in folders[1].iterdir() if p.name != carry.MANIFEST)
    piece.write_bytes(piece.read_bytes()[:-1])
    with pytest.raises(SystemExit, match="SHA-256"):
        carry.assemble(tmp_path / "carry", tmp_path / "ready")
    for path in folders[0].iterdir():
        path.unlink()
    folders[0].rmdir()
    with pytest.raises(SystemExit, match=r"sets missing: \[0\]"):
        carry.assemble(tmp_path / "carry", tmp_path / "ready")


def test_unmet_requirements_skip_the_image_and_follow_markers_and_extras(tmp_path: Path) -> None:
    made = [
        fake_wheel(tmp_path, "vllm", 10, ["numpy", "blake3", "fastapi[standard]>=0.1", "winonly; sys_platform == 'win32'",
                                          "flashinfer-python==1", "oldpy; python_version < '3.10'"]),
        fake_wheel(tmp_path, "fastapi", 10, ["starlette>=1", "uvicorn; extra == 'standard'", "never; extra == 'all'"]),
    ]
    needed = carry.unmet(made, have=frozenset({"numpy"}), skip=frozenset({"flashinfer_python"}))
    assert needed == {"blake3": "blake3", "starlette": "starlette>=1", "uvicorn": "uvicorn"}


# -- the driver on the vLLM CPU build -----------------------------------------------------------------


@pytest.mark.vllm
def test_the_driver_runs_every_part_and_prints_one_table_last(reduced_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "kit"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run(
        [sys.executable, str(KIT / "drive.py"), "--out", str(out), "--model", str(reduced_model), "--images", "4",
         "--max-tokens", "4", "--max-pixels", str(16 * 28 * 28), "--thread-tokens", "16", "--thread-images", "4",
         "--shared-images", "4"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tail = done.stdout.strip().splitlines()
    table_start = next(i for i, line in enumerate(tail) if line.startswith("| figure |"))
    rows = tail[table_start + 2:]
    assert [r.split("|")[1].strip() for r in rows[:3]] == ["`bare_vllm_predecoded`", "`caprl`", "`serve_concurrent`"]
    assert sum("input-thread ceiling, 16 visual tokens" in r for r in rows) == 2  # before and now
    assert any(r.startswith("| FLOP estimate") for r in rows)
    assert any("identical: True" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["throughput"]["images_per_s"]) == {"bare_vllm_predecoded", "caprl", "serve_concurrent"}
    assert summary["throughput"]["settings"]["max_tokens"] == 4
    assert summary["shared_captions"]["identical"] is True
    assert [r["visual_tokens"] for r in summary["input_thread"]["results"]] == [16]
