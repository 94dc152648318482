"""Loop detection with the real CLI: the tiny random model repeats itself under greedy decoding, so its
captions are stopped early with finish_reason `repetition` and fewer tokens than --max-tokens; with
--max-repeats 0 the same captions run to --max-tokens (`length`). One vLLM run checks that engine's
path, with two captions per image."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

MAX_TOKENS = 128
ARGS = ("--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--no-progress")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loop-images")
    for i in range(3):
        Image.new("RGB", (56 + 28 * i, 84), (70 * i, 120, 200 - 60 * i)).save(root / f"{i}.png")
    return root


def caption_rows(run_caprl, images: Path, tiny_model: Path, output: Path, *extra: str) -> dict[str, dict]:
    result = run_caprl("caption", images, "-o", output, "--model", tiny_model, *ARGS, *extra)
    assert result.returncode == 0, result.stderr
    return {row["key"]: row for row in pq.read_table(output).to_pylist()}


def test_looping_captions_stop_early_and_say_so(run_caprl, images: Path, tiny_model: Path, tmp_path: Path) -> None:
    engine = ("--engine", "transformers")
    stopped = caption_rows(run_caprl, images, tiny_model, tmp_path / "on.parquet", *engine)
    looping = {key for key, row in stopped.items() if row["finish_reason"] == "repetition"}
    assert looping, stopped
    for key in looping:
        assert 64 <= stopped[key]["output_tokens"] < MAX_TOKENS
    full = caption_rows(run_caprl, images, tiny_model, tmp_path / "off.parquet", *engine, "--max-repeats", "0")
    assert "repetition" not in {row["finish_reason"] for row in full.values()}
    for key in looping:  # the same greedy caption, no longer stopped, goes on past where it was stopped
        assert full[key]["output_tokens"] > stopped[key]["output_tokens"]
    assert any(full[key]["finish_reason"] == "length" and full[key]["output_tokens"] == MAX_TOKENS for key in looping)


@pytest.mark.vllm
def test_vllm_stops_looping_captions_of_every_sample(run_caprl, images: Path, tiny_model: Path, tmp_path: Path) -> None:
    rows = caption_rows(
        run_caprl, images, tiny_model, tmp_path / "vllm.parquet",
        "--engine", "vllm", "--dtype", "float32", "--num-captions", "2",
    )
    assert sorted(rows) == ["0.png", "1.png", "2.png"]
    reasons = [reason for row in rows.values() for reason in row["finish_reasons"]]
    assert "repetition" in reasons
    for row in rows.values():
        assert len(row["captions"]) == 2 and row["captions"][0] == row["caption"]
        for reason, tokens in zip(row["finish_reasons"], row["output_token_counts"], strict=True):
            assert tokens < MAX_TOKENS if reason == "repetition" else reason in ("stop", "length")
