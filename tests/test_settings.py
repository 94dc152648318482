"""Settings checks: every impossible value is a UsageError before anything heavy starts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from caprl_cli.errors import UsageError
from caprl_cli.settings import CaptionSettings, output_format_for, parse_duration, validate_settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("6h", 21600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        ("0.5", 0.5),
        (" 45S ", 45.0),
        ("1h 30m", 5400.0),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Plain seconds and d/h/m/s units (combined, fractional, any case) become seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "   ", "abc", "5x", "-5", "-5m", "h", "1h-30m", "1e3", "m30", "1.h", ".5h", "1h30", "inf", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything that is not a duration is a UsageError, not a ValueError or a silent zero."""
    with pytest.raises(UsageError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("name", "requested", "expected"),
    [
        ("out.parquet", None, "parquet"),
        ("out.jsonl", None, "jsonl"),
        ("OUT.PARQUET", None, "parquet"),
        ("Out.JsonL", None, "jsonl"),
        ("out.dat", "jsonl", "jsonl"),
        ("out.parquet", "parquet", "parquet"),
        ("shards/", "webdataset", "webdataset"),
        ("adir.parquet/", "webdataset", "webdataset"),
        ("train-%05d.tar", "webdataset", "webdataset"),
    ],
)
def test_output_format_for(tmp_path: Path, name: str, requested: str | None, expected: str) -> None:
    """--format (when the name does not contradict it); otherwise the output's extension, in any case, decides."""
    assert output_format_for(f"{tmp_path}/{name}", requested) == expected


@pytest.mark.parametrize("name", ["out", "out.txt", "out.csv", "out.parquet.bak", "out.json"])
def test_output_format_for_unknown_extension(tmp_path: Path, name: str) -> None:
    """An extension that names no format, without --format, is a UsageError naming --format."""
    with pytest.raises(UsageError, match="--format"):
        output_format_for(tmp_path / name, None)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def settings(tmp_path: Path, model_dir: Path) -> CaptionSettings:
    return CaptionSettings(
        inputs=("x",), output=tmp_path / "o.parquet", output_format="parquet", model=str(model_dir), workers=2,
    )


def test_valid_settings_pass(settings: CaptionSettings) -> None:
    """The defaults with a local model folder and a writable output are accepted."""
    validate_settings(settings)


@pytest.mark.parametrize(
    "changes",
    [
        {"limit": 0, "workers": 0},
        {"max_runtime": 0.001, "flush_every": 1},
        {"temperature": 0.0, "top_p": 1.0, "seed": 0},
        {"min_pixels": 10, "max_pixels": 10, "max_image_pixels": 1},
        {"decode_timeout": 0.001, "max_image_bytes": 1},
        {"batch_size": 1, "max_model_len": 1, "gpu_memory_utilization": 1.0},
        {"output_format": "jsonl", "engine": "transformers"},
    ],
)
def test_boundary_values_pass(settings: CaptionSettings, changes: dict) -> None:
    """Values on the edge of what is allowed are accepted."""
    validate_settings(dataclasses.replace(settings, **changes))


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"max_tokens": 0}, "--max-tokens"),
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": math.nan}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"min_pixels": 0}, "--min-pixels"),
        ({"min_pixels": 100, "max_pixels": 99}, "--max-pixels"),
        ({"max_image_pixels": 0}, "--max-image-pixels"),
        ({"max_image_bytes": 0}, "--max-image-bytes"),
        ({"decode_timeout": 0.0}, "--decode-timeout"),
        ({"decode_timeout": math.nan}, "--decode-timeout"),
        ({"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization"),
        ({"gpu_memory_utilization": 1.1}, "--gpu-memory-utilization"),
        ({"workers": -1}, "--workers"),
        ({"limit": -1}, "--limit"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_model_len": 0}, "--max-model-len"),
        ({"seed": -1}, "--seed"),
        ({"flush_every": 0}, "--flush-every"),
        ({"flush_every": -5}, "--flush-every"),
        ({"max_runtime": 0}, "--max-runtime"),
        ({"max_runtime": -1.0}, "--max-runtime"),
        ({"max_runtime": math.nan}, "--max-runtime"),
        ({"prompt": ""}, "--prompt"),
        ({"prompt": "  \n\t"}, "--prompt"),
        ({"output_format": "csv"}, "--format"),
        ({"engine": "onnx"}, "--engine"),
    ],
)
def test_bad_values_raise_usage_error(settings: CaptionSettings, changes: dict, option: str) -> None:
    """Each impossible value is refused with a UsageError that names its option."""
    with pytest.raises(UsageError, match=option):
        validate_settings(dataclasses.replace(settings, **changes))


def test_model_folder_without_config_is_refused(settings: CaptionSettings, tmp_path: Path) -> None:
    """A local model folder lacking config.json is a UsageError, found before any load."""
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(UsageError):
        validate_settings(dataclasses.replace(settings, model=str(empty)))


def test_missing_model_folder_is_refused(settings: CaptionSettings, tmp_path: Path) -> None:
    """A path-shaped model that does not exist is a UsageError, not a hub lookup."""
    with pytest.raises(UsageError):
        validate_settings(dataclasses.replace(settings, model=str(tmp_path / "nowhere" / "model")))


def test_output_parent_is_a_file(settings: CaptionSettings, tmp_path: Path) -> None:
    """An output whose parent folder is a regular file cannot be written: UsageError."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UsageError):
        validate_settings(dataclasses.replace(settings, output=blocker / "o.parquet"))
    assert blocker.read_text() == "a file, not a folder"


def test_output_grandparent_is_a_file(settings: CaptionSettings, tmp_path: Path) -> None:
    """A regular file further up the output's path is a UsageError too."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(UsageError):
        validate_settings(dataclasses.replace(settings, output=blocker / "sub" / "o.parquet"))


def test_output_is_a_directory(settings: CaptionSettings, tmp_path: Path) -> None:
    """An existing folder named as a file output (no trailing '/') is refused, never written into: the
    message says how to ask for a Parquet dataset folder instead (end it with '/', --format parquet)."""
    folder = tmp_path / "o.parquet"
    folder.mkdir()
    with pytest.raises(UsageError, match=r"is a directory.*end it with /.*--format parquet"):
        validate_settings(dataclasses.replace(settings, output=folder))
    for name in ("caps", "caps/"):  # a dataset folder is named with its '/'; as a file output it is refused
        (tmp_path / "caps").mkdir(exist_ok=True)
        given = dataclasses.replace(settings, output=str(tmp_path / name), output_format="jsonl")
        with pytest.raises(UsageError, match="end it with /" if name == "caps" else "folder"):
            validate_settings(given)
    validate_settings(dataclasses.replace(settings, output=f"{tmp_path / 'caps'}/"))  # the dataset folder


def test_missing_output_folders_are_created_and_no_probe_left(settings: CaptionSettings, tmp_path: Path) -> None:
    """A not-yet-existing output folder is made; the write probe leaves nothing behind."""
    output = tmp_path / "new" / "deeper" / "o.parquet"
    validate_settings(dataclasses.replace(settings, output=output))
    assert output.parent.is_dir()
    assert list(output.parent.iterdir()) == []
    assert not output.exists()


@pytest.mark.parametrize("output", ["shards/", "s3://bucket/caps/", "caps/out-%06d.tar"])
def test_folders_and_patterns_mean_webdataset(output: str) -> None:
    """A folder (ending in /) or a shard pattern is a WebDataset output without --format."""
    assert output_format_for(output, None) == "webdataset"


def test_existing_folder_means_webdataset(tmp_path: Path) -> None:
    assert output_format_for(tmp_path, None) == "webdataset"
    assert output_format_for(tmp_path / "x.parquet", None) == "parquet"
