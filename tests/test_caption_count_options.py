"""`--num-captions` and `--max-repeats`: refused when impossible, recorded in the fingerprint so a
changed value is refused (an old state, made before either existed, is not a change), and turned into
the engine's settings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from caprl_cli.errors import UsageError
from caprl_cli.settings import CaptionSettings, validate_settings
from caprl_cli.state.fingerprint import fingerprint_changes, fingerprint_of


@pytest.fixture
def settings(tmp_path: Path) -> CaptionSettings:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return CaptionSettings(inputs=("x",), output=tmp_path / "o.parquet", output_format="parquet", model=str(model))


@pytest.mark.parametrize(
    ("changes", "option"),
    [({"num_captions": 0}, "--num-captions"), ({"max_repeats": 1}, "--max-repeats"), ({"max_repeats": -1}, "--max-repeats")],
)
def test_impossible_values_are_usage_errors(settings: CaptionSettings, changes: dict, option: str) -> None:
    with pytest.raises(UsageError, match=option):
        validate_settings(replace(settings, **changes))


def test_boundary_values_pass(settings: CaptionSettings) -> None:
    validate_settings(replace(settings, num_captions=1, max_repeats=0))
    validate_settings(replace(settings, num_captions=16, max_repeats=2))


def test_one_caption_records_nothing_new_so_old_states_match(settings: CaptionSettings) -> None:
    current = fingerprint_of(settings)
    assert "num_captions" not in current
    old_state = {name: value for name, value in current.items() if name != "max_repeats"}
    assert fingerprint_changes(old_state, current) == []


def test_changed_values_are_changes(settings: CaptionSettings) -> None:
    one = fingerprint_of(settings)
    assert fingerprint_changes(one, fingerprint_of(replace(settings, num_captions=3))) == ["--num-captions"]
    assert fingerprint_changes(fingerprint_of(replace(settings, num_captions=3)), one) == ["--num-captions"]
    assert fingerprint_changes(one, fingerprint_of(replace(settings, max_repeats=0))) == ["--max-repeats"]

