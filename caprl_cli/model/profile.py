"""What caprl must know about a model before any engine starts: its image grid and rendered prompt.

Both come from the checkpoint's own processor, so CapRL-3B (28-pixel grid), CapRL-Qwen3VL (32-pixel
grid) and processors that tile images themselves (InternVL) all work without code naming them. The
profile is read in the parent process so the preprocessing pool can start decoding while the engine
loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from caprl_cli.prepare.grid import Grid
from caprl_cli.model.prompt import processor_renderer, render_prompt

# Room for the prompt's own text tokens when sizing the context; CapRL's prompt needs about 20.
_CONTEXT_MARGIN = 32


@dataclass(frozen=True)
class ModelProfile:
    """The grid images are resized to, the exact prompt text, and its text token count.

    `image_kwargs` is what the engines hand the model's processor with each image (the pixel bounds of
    Qwen-VL-style processors; nothing for tiling processors, which use their own tile settings), and
    `tiled_visual_tokens` the most visual tokens a tiling processor makes of one image.
    """

    grid: Grid
    prompt_text: str
    prompt_text_tokens: int
    image_kwargs: dict[str, Any] = field(default_factory=dict)
    tiled_visual_tokens: int | None = None

    def max_visual_tokens(self) -> int | None:
        """Visual tokens of the largest image; None when unknown here."""
        visual = self.grid.max_visual_tokens()
        return visual if visual is not None else self.tiled_visual_tokens

    def context_length(self, max_tokens: int) -> int | None:
        """Tokens one request can need: prompt text, the largest image, the longest caption.

        None when the bound is unknown here (the engine then uses the model's own limit).
        """
        visual = self.max_visual_tokens()
        if visual is None:
            return None
        return self.prompt_text_tokens + visual + max_tokens + _CONTEXT_MARGIN


def grid_factor(processor: Any) -> int | None:
    """Patch size times merge size for Qwen-VL-style processors; None for other processors."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    if isinstance(patch, int) and isinstance(merge, int):
        return patch * merge
    return None


def load_processor(model_path: str) -> Any:
    """The checkpoint's processor (tokenizer, image processor and chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path)


def tiled_visual_tokens(processor: Any) -> int | None:
    """Most visual tokens a tiling processor (InternVL) makes of one image, None if not tiling.

    Such a processor cuts an image into at most `max_patches` tiles plus a thumbnail, each
    `image_seq_length` tokens, between an image start and an image end token.
    """
    per_tile = getattr(processor, "image_seq_length", None)
    image_processor = getattr(processor, "image_processor", None)
    if not isinstance(per_tile, int) or image_processor is None:
        return None
    max_tiles = getattr(image_processor, "max_patches", None)
    tiles = max_tiles + 1 if isinstance(max_tiles, int) and max_tiles > 1 else 1
    return 2 + per_tile * tiles


def image_kwargs_for(processor: Any, grid: Grid) -> dict[str, Any]:
    """The per-image processor arguments that make the engine see exactly `grid`'s pixels.

    Qwen-VL-style processors (a grid factor) get the pixel bounds, so an image already on the grid
    passes through unchanged; tiling processors keep their own settings.
    """
    if grid.factor is None:
        return {}
    return {"size": {"shortest_edge": grid.min_pixels, "longest_edge": grid.max_pixels}}


def profile_from_processor(
    processor: Any, prompt: str, system_prompt: str | None, min_pixels: int, max_pixels: int
) -> ModelProfile:
    """Build the profile of a loaded processor.

    The grid's lower bound is at least one visual token (factor squared), whatever `--min-pixels`
    says, so a 32-pixel grid never gets a bound meant for a 28-pixel one below its smallest image.
    """
    text = render_prompt(processor_renderer(processor), prompt, system_prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    text_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    factor = grid_factor(processor)
    if factor is not None:
        min_pixels = max(min_pixels, factor * factor)
        max_pixels = max(max_pixels, min_pixels)
    grid = Grid(factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return ModelProfile(
        grid=grid,
        prompt_text=text,
        prompt_text_tokens=text_tokens,
        image_kwargs=image_kwargs_for(processor, grid),
        tiled_visual_tokens=tiled_visual_tokens(processor) if factor is None else None,
    )
