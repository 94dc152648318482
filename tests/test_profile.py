"""Grid and context size come from the checkpoint's processor, not from hard-wired numbers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from caprl_cli.model.profile import grid_factor, load_processor, profile_from_processor
from caprl_cli.settings import DEFAULT_PROMPT


def test_tiny_qwen25_profile(tiny_model: Path) -> None:
    profile = profile_from_processor(load_processor(str(tiny_model)), DEFAULT_PROMPT, None, 3136, 1280 * 28 * 28)
    assert profile.grid.factor == 28
    assert profile.grid.max_visual_tokens() == 1280
    assert profile.prompt_text.startswith("<|im_start|>user\n")
    assert 0 < profile.prompt_text_tokens < 64
    assert profile.context_length(2048) >= profile.prompt_text_tokens + 1280 + 2048


def test_grid_factor_follows_patch_and_merge() -> None:
    qwen3_like = SimpleNamespace(image_processor=SimpleNamespace(patch_size=16, merge_size=2))
    assert grid_factor(qwen3_like) == 32
    tiling = SimpleNamespace(image_processor=SimpleNamespace(size={"height": 448, "width": 448}))
    assert grid_factor(tiling) is None


def test_tiny_qwen3_vl_profile(tiny_qwen3_vl: Path) -> None:
    profile = profile_from_processor(load_processor(str(tiny_qwen3_vl)), DEFAULT_PROMPT, None, 28 * 28, 1280 * 32 * 32)
    assert profile.grid.factor == 32
    assert profile.grid.min_pixels == 32 * 32  # never below one visual token of this grid
    assert profile.image_kwargs == {"size": {"shortest_edge": 32 * 32, "longest_edge": 1280 * 32 * 32}}
    assert profile.context_length(2048) >= profile.prompt_text_tokens + 1280 + 2048


def test_tiny_internvl_profile(tiny_internvl: Path) -> None:
    processor = load_processor(str(tiny_internvl))
    profile = profile_from_processor(processor, DEFAULT_PROMPT, None, 3136, 1280 * 28 * 28)
    assert profile.grid.factor is None
    assert profile.image_kwargs == {}  # the processor tiles with its own settings
    tiles = processor.image_processor.max_patches + 1  # the tiles and a thumbnail
    assert profile.max_visual_tokens() == 2 + processor.image_seq_length * tiles
    assert profile.context_length(8) > profile.prompt_text_tokens + profile.max_visual_tokens() + 8
