"""Where `--engine openai` takes the processor from, given what the server lists (model/served.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from caprl_cli.errors import UsageError
from caprl_cli.model.served import hub_id_named_by, processor_of_entry
from caprl_cli.settings import CaptionSettings, validate_settings


def test_a_root_that_is_a_model_folder_here_wins(tiny_model: Path) -> None:
    entry = {"id": "caprl", "root": str(tiny_model)}
    assert processor_of_entry(entry, "caprl") == str(tiny_model.resolve())


def test_a_root_elsewhere_named_like_a_catalog_model_is_its_hub_id() -> None:
    """The model card's `vllm serve /PATH/CapRL-3B --served-model-name=caprl` on another machine."""
    assert processor_of_entry({"id": "caprl", "root": "/PATH/CapRL-3B"}, "caprl") == "internlm/CapRL-3B"
    assert processor_of_entry({"id": "caprl", "root": "/models/CapRL-Qwen3VL-4B/"}, "caprl") == "internlm/CapRL-Qwen3VL-4B"


def test_a_hub_id_root_or_model_is_used_as_is() -> None:
    assert processor_of_entry({"id": "x", "root": "someone/fine-tune"}, "x") == "someone/fine-tune"
    assert processor_of_entry({"id": "internlm/CapRL-3B", "root": "/srv/weights"}, "internlm/CapRL-3B") == "internlm/CapRL-3B"


def test_nothing_known_is_none() -> None:
    assert processor_of_entry({"id": "caprl", "root": "/elsewhere/my-captioner"}, "caprl") is None
    assert processor_of_entry({"id": "caprl"}, "caprl") is None
    assert hub_id_named_by(None) is None and hub_id_named_by("  ") is None and hub_id_named_by("caprl") is None


def test_processor_only_with_the_openai_engine(tiny_model: Path, tmp_path: Path) -> None:
    settings = CaptionSettings(inputs=(str(tmp_path),), output=tmp_path / "o.parquet", output_format="parquet",
                               model=str(tiny_model), engine="transformers", processor=str(tiny_model))
    with pytest.raises(UsageError, match="--processor applies to --engine openai only"):
        validate_settings(settings)
