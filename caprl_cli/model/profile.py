"""What caprl must know about a model before any engine starts: its image grid and rendered prompt.

Both come from the checkpoint's own processor, so CapRL-3B (28-pixel grid), CapRL-Qwen3VL (32-pixel
grid) and processors that tile images themselves (InternVL) all work without code naming them. The
profile is read in the parent process so the preprocessing pool can start decoding while the engine
loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from caprl_cli.prepare.grid import Grid
from caprl_cli.model.prompt import processor_renderer, render_prompt

# Room for the prompt's own text tokens when sizing the context; CapRL's prompt needs about 20.
_CONTEXT_MARGIN = 32


@dataclass(frozen=True)
class ModelProfile:
    """The grid images are resized to, the exact prompt text, and its text token count."""

    grid: Grid
    prompt_text: str
    prompt_text_tokens: int

    def context_length(self, max_tokens: int) -> int | None:
        """Tokens one request can need: prompt text, the largest image, the longest caption.

        None when the processor tiles images itself and the bound is unknown here.
        """
        visual = self.grid.max_visual_tokens()
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


def profile_from_processor(
    processor: Any, prompt: str, system_prompt: str | None, min_pixels: int, max_pixels: int
) -> ModelProfile:
    """Build the profile of a loaded processor."""
    text = render_prompt(processor_renderer(processor), prompt, system_prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    text_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ModelProfile(
        grid=Grid(grid_factor(processor), min_pixels=min_pixels, max_pixels=max_pixels),
        prompt_text=text,
        prompt_text_tokens=text_tokens,
    )
