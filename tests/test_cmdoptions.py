"""Options shared by several commands are defined once: the same name, help, default and environment
variable in every command that takes them, and each shared default written in one place."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from conftest import ROOT

from caprl_cli import defaults
from caprl_cli.cli import cli
from caprl_cli.settings import CaptionSettings

SHARED = ("output_format", "storage_options", "state_dir", "model", "quiet", "verbose")


def options_named(name: str) -> dict[str, click.Option]:
    """Every command's option of that parameter name, by command."""
    found = {}
    for command_name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name == name:
                found[command_name] = param
    return found


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_option_is_the_same_in_every_command(name: str) -> None:
    found = options_named(name)
    assert len(found) >= 2, f"{name} is taken by {sorted(found)} only"
    shapes = {
        command: (tuple(option.opts), option.envvar, option.help, option.default, option.multiple, option.count)
        for command, option in found.items()
        if not (name == "output_format" and command == "merge")  # merge writes no sidecars: fewer choices
    }
    assert len(set(shapes.values())) == 1, shapes
    assert all(option.envvar == f"CAPRL_{option.opts[-1].lstrip('-').upper().replace('-', '_')}" for option in found.values())


def test_status_reads_the_state_dir_a_cron_job_set_for_caption(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    """CAPRL_STATE_DIR set once for a cron job reaches both `caption` and `status`."""
    env = {"CAPRL_STATE_DIR": str(tmp_path / "elsewhere")}
    images = tmp_path / "images"
    images.mkdir()
    output = tmp_path / "out.parquet"
    made = run_caprl("caption", images, "-o", output, "--model", tiny_model, "--engine", "transformers", "--limit", "0", env=env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "elsewhere").is_dir() and not (tmp_path / "out.parquet.caprl").exists()
    found = run_caprl("status", output, "--json", env=env)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["done"] == 0


def test_shared_defaults_agree_between_the_cli_and_the_settings() -> None:
    caption = {param.name: param.default for param in cli.commands["caption"].params}
    merge = {param.name: param.default for param in cli.commands["merge"].params}
    plain = CaptionSettings(inputs=(), output=None, output_format="parquet")
    expected = {
        "max_tokens": defaults.DEFAULT_MAX_TOKENS,
        "retries": defaults.DEFAULT_RETRIES,
        "shard_size": defaults.DEFAULT_SHARD_SIZE,
        "rows_per_file": defaults.DEFAULT_ROWS_PER_FILE,
        "concurrency": defaults.DEFAULT_CONCURRENCY,
        "model": defaults.DEFAULT_MODEL,
    }
    for name, value in expected.items():
        assert caption[name] == getattr(plain, name) == value, name
    assert merge["shard_size"] == defaults.DEFAULT_SHARD_SIZE and merge["rows_per_file"] == defaults.DEFAULT_ROWS_PER_FILE


@pytest.mark.parametrize(
    ("name", "literal"),
    [("max_tokens", "2048"), ("retries", "3"), ("shard_size", "10_?000"), ("rows_per_file", "250_?000"), ("concurrency", "32")],
)
def test_a_shared_default_is_written_once(name: str, literal: str) -> None:
    """Outside caprl_cli/defaults.py no option, field or parameter of that name spells the number."""
    option = name.replace("_", "-")
    pattern = re.compile(
        rf"(\b{name}\b[^=\n]*=\s*{literal}\b)|(--{option}\"[^\n]*default={literal}\b)|(^DEFAULT_{name.upper()}\s*=)",
        re.MULTILINE | re.IGNORECASE,
    )
    hits = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in sorted((ROOT / "caprl_cli").rglob("*.py"))
        if path.name != "defaults.py"
        for match in pattern.finditer(path.read_text())
    ]
    assert hits == []
