"""The CapRL catalog: short names resolve to hub ids everywhere --model is taken; `caprl models` lists it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caprl_cli.errors import ModelUnavailable, UsageError
from caprl_cli.model.catalog import CATALOG, GIB, find, for_hub_id, format_table
from caprl_cli.model.profile import grid_factor, load_processor
from caprl_cli.model.source import canonical_model, local_model_folder, resolve_model


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("caprl-qwen3vl-4b", "internlm/CapRL-Qwen3VL-4B"),
        ("CapRL-Qwen3VL-2B", "internlm/CapRL-Qwen3VL-2B"),
        ("CAPRL-3B", "internlm/CapRL-3B"),
        ("caprl-qwen2.5vl-3b", "internlm/CapRL-3B"),
        ("CapRL-InternVL3.5-8B", "internlm/CapRL-InternVL3.5-8B"),
    ],
)
def test_short_names_resolve_to_hub_ids(name: str, hub_id: str) -> None:
    assert find(name).hub_id == hub_id
    assert canonical_model(name) == hub_id


def test_names_are_unique_and_hub_ids_known() -> None:
    names = [n for model in CATALOG for n in (model.name, *model.aliases)]
    assert len(names) == len(set(names))
    assert all(for_hub_id(model.hub_id.upper()) is model for model in CATALOG)
    assert for_hub_id("someone/other-model") is None


def test_other_names_stay_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert canonical_model("someone/Other-VL") == "someone/Other-VL"
    assert canonical_model("not-a-caprl-name") == "not-a-caprl-name"
    with pytest.raises(UsageError):  # as before: neither a folder nor a hub id
        local_model_folder(canonical_model("not-a-caprl-name"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "caprl-3b").mkdir()  # a local folder of that name wins over the catalog
    assert canonical_model("caprl-3b") == "caprl-3b"


def test_resolve_model_takes_short_names() -> None:
    # Offline and not cached (the suite sets HF_HUB_OFFLINE): the error names the hub id looked for.
    with pytest.raises(ModelUnavailable, match="internlm/CapRL-Qwen3VL-4B"):
        resolve_model("caprl-qwen3vl-4b")


def test_memory_need_covers_weights_and_grows_with_size() -> None:
    ordered = sorted(CATALOG, key=lambda model: model.params_billion)
    for model in ordered:
        assert model.gpu_memory_gib > model.params_billion * 1e9 * 2 / GIB
    needs = [model.gpu_memory_gib for model in ordered]
    assert needs == sorted(needs) and len(set(needs)) == len(needs)


def test_recommended_pixels_are_whole_grid_tokens() -> None:
    for model in CATALOG:
        if model.grid_factor is not None:
            tokens, rest = divmod(model.recommended_max_pixels, model.grid_factor**2)
            assert rest == 0 and tokens == 1280
            assert model.default_max_pixels > model.recommended_max_pixels


def test_catalog_grid_matches_the_architectures_processor(tiny_model: Path, tiny_qwen3_vl: Path, tiny_internvl: Path) -> None:
    by_arch = {model.architecture: model for model in CATALOG}
    assert grid_factor(load_processor(str(tiny_model))) == by_arch["Qwen2.5-VL"].grid_factor
    assert grid_factor(load_processor(str(tiny_qwen3_vl))) == by_arch["Qwen3-VL"].grid_factor
    assert grid_factor(load_processor(str(tiny_internvl))) is by_arch["InternVL3.5"].grid_factor is None


def test_table_has_a_line_per_model() -> None:
    lines = format_table().splitlines()
    assert len(lines) == 1 + len(CATALOG)
    for model, line in zip(CATALOG, lines[1:], strict=True):
        assert line.split()[:2] == [model.name, model.hub_id]


def test_cli_models_table_and_json(run_caprl) -> None:
    table = run_caprl("models")
    assert table.returncode == 0, table.stderr
    listed = [line.split()[1] for line in table.stdout.splitlines()[1:]]
    assert listed == [model.hub_id for model in CATALOG]
    as_json = run_caprl("models", "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert [record["hub_id"] for record in records] == listed
    assert all(record["gpu_memory_gib"] > record["weights_gib"] for record in records)


def test_cli_caption_resolves_a_short_name(run_caprl, tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    result = run_caprl("caption", tmp_path / "in", "-o", tmp_path / "out.parquet", "--model", "CapRL-Qwen3VL-2B", "--engine", "transformers")
    assert result.returncode == ModelUnavailable.exit_code, result.stderr
    assert "internlm/CapRL-Qwen3VL-2B" in result.stderr
    assert "Traceback" not in result.stderr
