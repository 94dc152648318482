"""The CapRL family beyond Qwen2.5-VL, end to end: a tiny Qwen3-VL (CapRL-Qwen3VL-2B/4B) and a tiny
transformers-native InternVL3.5 (CapRL-InternVL3.5-8B) through the real CLI on both local engines.

Token counts are the oracle: a prompt of CapRL's exact shape (user turn only, no system turn) plus the
visual tokens the architecture gives an image of a known size. An injected system turn, an image not
resized to the model's grid, or the wrong processor arguments all change the count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from contract import read_rows
from PIL import Image

from caprl_cli.settings import DEFAULT_PROMPT

MAX_TOKENS = 8

# (width, height) -> visual tokens. Qwen3-VL: 16-pixel patches merged 2x2, one token per 32x32 block
# after rounding each side to a multiple of 32 (100x70 -> 96x64).
QWEN3_VL_IMAGES = {(96, 64): 3 * 2, (64, 64): 2 * 2, (160, 96): 5 * 3, (100, 70): 3 * 2}
# InternVL: 56-pixel tiles of 4 tokens each; a non-square image gets its tiles plus a thumbnail tile,
# a square one a single tile; <img> and </img> around them.
INTERNVL_IMAGES = {(64, 64): 2 + 4 * 1, (96, 64): 2 + 4 * 3, (64, 128): 2 + 4 * 3}

PROMPT_SHAPES = {
    # CapRL's eval prompt shape: the user turn straight away, then the assistant's turn.
    "qwen3-vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
}


def _images(root: Path, sizes: dict[tuple[int, int], int]) -> dict[str, int]:
    """Write one PNG per size; returns key -> expected visual tokens."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for index, ((width, height), tokens) in enumerate(sizes.items()):
        name = f"{index}-{width}x{height}.png"
        Image.new("RGB", (width, height), (40 * index, 90, 200)).save(root / name)
        expected[name] = tokens
    return expected


def _text_tokens(model: Path, arch: str) -> int:
    """Tokens of CapRL's prompt, image placeholder counted as one token."""
    from transformers import AutoTokenizer

    text = PROMPT_SHAPES[arch].format(prompt=DEFAULT_PROMPT)
    return len(AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"])


def _run(run_caprl, model: Path, arch: str, engine: str, tmp: Path) -> None:
    sizes = QWEN3_VL_IMAGES if arch == "qwen3-vl" else INTERNVL_IMAGES
    expected_visual = _images(tmp / "images", sizes)
    output = tmp / "captions.parquet"
    extra = ("--dtype", "float32") if engine == "vllm" else ()
    result = run_caprl(
        "caption", tmp / "images", "-o", output, "--model", model, "--engine", engine,
        "--max-tokens", str(MAX_TOKENS), "--no-progress", *extra,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["key"]: row for row in read_rows(output)}
    assert sorted(rows) == sorted(expected_visual)
    text_tokens = _text_tokens(model, arch)
    for key, visual in expected_visual.items():
        row = rows[key]
        assert row["status"] == "ok", row["error"]
        assert row["error"] is None and row["caption"] is not None
        assert row["finish_reason"] in ("stop", "length")
        assert 1 <= row["output_tokens"] <= MAX_TOKENS
        assert (row["width"], row["height"]) == tuple(int(n) for n in key.split("-")[1][:-4].split("x"))
        assert row["model"] == str(model)
        # The placeholder token in the text is replaced by the image's visual tokens.
        assert row["prompt_tokens"] == text_tokens - 1 + visual, key
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    assert summary["prompt_text"] == PROMPT_SHAPES[arch].format(prompt=DEFAULT_PROMPT)
    assert summary["pixels"]["grid_factor"] == (32 if arch == "qwen3-vl" else None)


@pytest.fixture(params=["qwen3-vl", "internvl"])
def family_model(request: pytest.FixtureRequest) -> tuple[str, Path]:
    fixture = "tiny_qwen3_vl" if request.param == "qwen3-vl" else "tiny_internvl"
    return request.param, request.getfixturevalue(fixture)


def test_family_on_transformers(family_model, run_caprl, tmp_path: Path) -> None:
    arch, model = family_model
    _run(run_caprl, model, arch, "transformers", tmp_path)


@pytest.mark.vllm
def test_family_on_vllm(family_model, run_caprl, tmp_path: Path) -> None:
    arch, model = family_model
    _run(run_caprl, model, arch, "vllm", tmp_path)
