"""User mistakes end as one line on stderr and exit code 2, before any model loads; help is instant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.outputs.rows import COLUMNS


def assert_usage_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("caprl: error: ")
    assert "Traceback" not in result.stderr


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(folder / "green.png")
    return folder


def test_help_does_not_import_engines() -> None:
    code = (
        "import sys\n"
        "from caprl_cli.cli import cli\n"
        "for args in (['--help'], ['caption', '--help']):\n"
        "    cli.main(args=args, prog_name='caprl', standalone_mode=False)\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers', 'PIL', 'pyarrow') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout


def test_help_lists_every_documented_option(run_caprl) -> None:
    result = run_caprl("caption", "--help")
    assert result.returncode == 0
    for option in (
        "--output", "--format", "--model", "--prompt", "--system-prompt", "--max-tokens", "--temperature",
        "--top-p", "--seed", "--min-pixels", "--max-pixels", "--max-image-pixels", "--engine", "--dtype",
        "--max-model-len", "--gpu-memory-utilization", "--workers", "--limit", "--no-progress", "--quiet",
        "--verbose", "CAPRL_MAX_TOKENS",
    ):
        assert option in result.stdout, option


def test_missing_input(run_caprl, tmp_path: Path) -> None:
    assert_usage_error(run_caprl("caption", tmp_path / "nope", "-o", tmp_path / "out.parquet"))


def test_no_input_at_all(run_caprl, tmp_path: Path) -> None:
    assert_usage_error(run_caprl("caption", "-o", tmp_path / "out.parquet"))


def test_output_directory_not_writable(run_caprl, images: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_usage_error(run_caprl("caption", images, "-o", blocker / "out.parquet", "--model", images))


def test_model_folder_missing(run_caprl, images: Path, tmp_path: Path) -> None:
    assert_usage_error(run_caprl("caption", images, "-o", tmp_path / "o.parquet", "--model", tmp_path / "no-model"))


def test_model_folder_without_config(run_caprl, images: Path, tmp_path: Path) -> None:
    assert_usage_error(run_caprl("caption", images, "-o", tmp_path / "o.parquet", "--model", images))


@pytest.mark.parametrize(
    "args",
    [
        ["--max-tokens", "0"],
        ["--temperature", "warm"],
        ["--top-p", "1.5"],
        ["--max-pixels", "100", "--min-pixels", "200"],
        ["--engine", "onnx"],
        ["--dtype", "float8"],
        ["--max-runtime", "soon"],
        ["--flush-every", "0"],
        ["--format", "xml"],
        ["--workers", "-1"],
    ],
)
def test_bad_option_values(run_caprl, images: Path, tmp_path: Path, args: list[str]) -> None:
    assert_usage_error(run_caprl("caption", images, "-o", tmp_path / "out.parquet", *args))


def test_unknown_output_extension(run_caprl, images: Path, tmp_path: Path) -> None:
    assert_usage_error(run_caprl("caption", images, "-o", tmp_path / "out.csv"))


def test_options_come_from_environment(run_caprl, images: Path, tmp_path: Path) -> None:
    result = run_caprl("caption", images, "-o", tmp_path / "out.parquet", env={"CAPRL_MAX_TOKENS": "0"})
    assert_usage_error(result)
    assert "--max-tokens" in result.stderr


def test_empty_folder_writes_an_empty_output(run_caprl, tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0\1")
    output = tmp_path / "out.parquet"
    result = run_caprl("caption", empty, "-o", output, "--model", tiny_model)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(output)
    assert table.num_rows == 0
    assert tuple(table.column_names) == COLUMNS
