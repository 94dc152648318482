"""The CapRL checkpoints caprl knows by name: hub id, architecture, grid, pixel limits, GPU memory.

It is what `caprl models` prints and what lets `--model caprl-qwen3vl-4b` stand for a hub id. Nothing
here steers a run: grid and prompt always come from the checkpoint's own processor (model/profile.py);
these entries only describe the checkpoints so people can choose one and size a machine for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# One visual token per grid block; 1280 tokens is what vLLM's own Qwen-VL examples use and keeps a
# corpus run fast while detailed enough for captions. The checkpoints' own defaults allow 16,384.
RECOMMENDED_VISUAL_TOKENS = 1280
BYTES_PER_PARAM_BF16 = 2
# Room beside the weights for the KV cache, activations and CUDA graphs of a full captioning batch
# (images of ~1280 tokens, captions up to 2048): a fixed part plus a share that grows with the model.
KV_MARGIN_GIB = 4.0
KV_MARGIN_SHARE = 0.2
GIB = 1024**3


@dataclass(frozen=True)
class CatalogModel:
    """One CapRL checkpoint as published on the hub."""

    name: str  # short name accepted by --model, case-insensitive
    hub_id: str
    architecture: str
    base_model: str
    params_billion: float  # approximate parameter count of the published weights
    grid: str  # how images are cut: a pixel grid (one token per block) or fixed tiles
    grid_factor: int | None  # pixels per visual token side; None for tiling models
    default_max_pixels: int | None  # the checkpoint processor's own limit; None: tiles, no pixel limit
    recommended_max_pixels: int
    aliases: tuple[str, ...] = ()

    @property
    def weights_gib(self) -> float:
        """bf16 weights: two bytes per parameter."""
        return self.params_billion * 1e9 * BYTES_PER_PARAM_BF16 / GIB

    @property
    def gpu_memory_gib(self) -> int:
        """GPU memory one engine needs: bf16 weights plus the KV/activation margin, rounded up.

        need = weights x (1 + KV_MARGIN_SHARE) + KV_MARGIN_GIB
        """
        return math.ceil(self.weights_gib * (1 + KV_MARGIN_SHARE) + KV_MARGIN_GIB)

    def as_dict(self) -> dict[str, Any]:
        """Every field plus the derived sizes, for `caprl models --json`."""
        record = asdict(self)
        record["aliases"] = list(self.aliases)
        record["weights_gib"] = round(self.weights_gib, 1)
        record["gpu_memory_gib"] = self.gpu_memory_gib
        return record


def _tokens_to_pixels(tokens: int, factor: int) -> int:
    return tokens * factor * factor


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="caprl-3b",
        hub_id="internlm/CapRL-3B",
        architecture="Qwen2.5-VL",
        base_model="Qwen2.5-VL-3B-Instruct",
        params_billion=3.75,
        grid="28 px (14-px patches, 2x2 merge)",
        grid_factor=28,
        default_max_pixels=12_845_056,
        recommended_max_pixels=_tokens_to_pixels(RECOMMENDED_VISUAL_TOKENS, 28),
        aliases=("caprl-qwen2.5vl-3b",),
    ),
    CatalogModel(
        name="caprl-qwen3vl-2b",
        hub_id="internlm/CapRL-Qwen3VL-2B",
        architecture="Qwen3-VL",
        base_model="Qwen3-VL-2B-Instruct",
        params_billion=2.13,
        grid="32 px (16-px patches, 2x2 merge)",
        grid_factor=32,
        default_max_pixels=16_777_216,
        recommended_max_pixels=_tokens_to_pixels(RECOMMENDED_VISUAL_TOKENS, 32),
    ),
    CatalogModel(
        name="caprl-qwen3vl-4b",
        hub_id="internlm/CapRL-Qwen3VL-4B",
        architecture="Qwen3-VL",
        base_model="Qwen3-VL-4B-Instruct",
        params_billion=4.44,
        grid="32 px (16-px patches, 2x2 merge)",
        grid_factor=32,
        default_max_pixels=16_777_216,
        recommended_max_pixels=_tokens_to_pixels(RECOMMENDED_VISUAL_TOKENS, 32),
    ),
    CatalogModel(
        name="caprl-internvl3.5-8b",
        hub_id="internlm/CapRL-InternVL3.5-8B",
        architecture="InternVL3.5",
        base_model="InternVL3.5-8B",
        params_billion=8.53,
        grid="448 px tiles (up to 12 + thumbnail, 256 tokens each)",
        grid_factor=None,
        default_max_pixels=None,
        recommended_max_pixels=_tokens_to_pixels(RECOMMENDED_VISUAL_TOKENS, 28),
    ),
)


def find(name: str) -> CatalogModel | None:
    """The checkpoint a short name (or alias, or hub id) names, any case; None if none does."""
    wanted = name.strip().lower()
    for model in CATALOG:
        if wanted in (model.name, model.hub_id.lower(), *model.aliases):
            return model
    return None


def for_hub_id(hub_id: str) -> CatalogModel | None:
    """The catalog entry of a hub id, any case; None for checkpoints outside the catalog."""
    wanted = hub_id.strip().lower()
    return next((model for model in CATALOG if model.hub_id.lower() == wanted), None)


def format_table(models: tuple[CatalogModel, ...] = CATALOG) -> str:
    """The table `caprl models` prints."""
    header = ("NAME", "HUB ID", "ARCHITECTURE", "GRID", "DEFAULT MAX PIXELS", "RECOMMENDED --max-pixels", "GPU MEMORY")
    rows = [header]
    for model in models:
        rows.append(
            (
                model.name,
                model.hub_id,
                model.architecture,
                model.grid,
                f"{model.default_max_pixels:,}" if model.default_max_pixels else "tiles",
                f"{model.recommended_max_pixels:,}",
                f"{model.gpu_memory_gib} GiB",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
