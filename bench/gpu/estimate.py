"""What an H100 should caption with CapRL-3B, by counting FLOPs: the figure the input thread must beat.

Each image costs the vision tower over its patches, the language model's prefill over the prompt
(visual tokens + CapRL's text), and one language-model forward per output token over a growing
context. Matrix multiplies cost 2 FLOPs per weight per token; attention costs 4 * length * width per
token and layer (scores and the weighted sum). Divided into the GPU's dense bf16 rate times an
efficiency, that is images per second. The parameter counts come from the config (and the tests
check them against a built model's), so the estimate is the real model's, not a rounded "3B".

    python bench/gpu/estimate.py                       # CapRL's defaults: 1280 visual tokens
    python bench/gpu/estimate.py --visual-tokens 256 --output-tokens 1024 --efficiency 0.4
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caprl3b import configs  # noqa: E402

H100_BF16_DENSE = 790e12  # FLOP/s, measured on the lent H100s (the figure)
EFFICIENCY = 0.5  # a stated guess: large batches of a 3B model keep about half the tensor cores busy
TEXT_TOKENS = 24  # CapRL's prompt around the image: the chat markers and "Please describe this image in detail."
OUTPUT_TOKENS = 512  # the GPU kit's fixed caption length (CapRL allows 2048; its captions end well before)


def vision_params(vision: dict[str, Any]) -> dict[str, int]:
    """Weights of Qwen2.5-VL's vision tower, by part (HF's module shapes, biases included)."""
    h, inter = vision["hidden_size"], vision["intermediate_size"]
    patch = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2 * h
    attention = h * 3 * h + 3 * h + h * h + h  # qkv and proj, with biases
    mlp = 2 * (h * inter + inter) + inter * h + h  # gate, up, down, with biases
    block = attention + mlp + 2 * h  # two RMSNorms
    merged = h * vision["spatial_merge_size"] ** 2
    merger = h + merged * merged + merged + merged * vision["out_hidden_size"] + vision["out_hidden_size"]
    return {"patch_embed": patch, "blocks": vision["depth"] * block, "merger": merger}


def text_params(text: dict[str, Any]) -> dict[str, int]:
    """Weights of the language model, by part (q, k, v with biases; o and the MLP without)."""
    h, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head = h // heads
    attention = h * heads * head + heads * head + 2 * (h * kv * head + kv * head) + heads * head * h
    mlp = 3 * h * text["intermediate_size"]
    layers = text["num_hidden_layers"] * (attention + mlp + 2 * h)
    embed = text["vocab_size"] * h
    lm_head = 0 if text["tie_word_embeddings"] else embed
    return {"embed": embed, "layers": layers, "norm": h, "lm_head": lm_head}


@dataclass(frozen=True)
class Estimate:
    visual_tokens: int
    prompt_tokens: int
    output_tokens: int
    vision_params: int
    text_params: int
    vision_tflop: float
    prefill_tflop: float
    decode_tflop: float
    total_tflop: float
    rate_tflops: float
    efficiency: float
    images_per_s: float


def estimate(visual_tokens: int = 1280, output_tokens: int = OUTPUT_TOKENS, text_tokens: int = TEXT_TOKENS,
             rate: float = H100_BF16_DENSE, efficiency: float = EFFICIENCY, reduced: bool = False) -> Estimate:
    """FLOPs per image and images/s for one image of `visual_tokens` merged tokens."""
    text, vision = configs(reduced)
    v, t = vision_params(vision), text_params(text)
    merge = vision["spatial_merge_size"] ** 2
    patches = visual_tokens * merge
    h = vision["hidden_size"]
    window = (vision["window_size"] // vision["patch_size"]) ** 2  # patches attended in a window layer
    full = len(vision["fullatt_block_indexes"])
    vision_flop = (
        2 * patches * (v["patch_embed"] + v["blocks"])
        + 2 * visual_tokens * v["merger"]
        + 4 * patches * h * (full * patches + (vision["depth"] - full) * min(window, patches))
    )
    width = text["num_attention_heads"] * (text["hidden_size"] // text["num_attention_heads"])
    layers = text["num_hidden_layers"]
    dense = t["layers"]  # weights every token multiplies; the embedding is a lookup
    prompt = visual_tokens + text_tokens
    logits = 2 * text["hidden_size"] * text["vocab_size"]
    prefill = 2 * prompt * dense + 2 * prompt * prompt * width * layers + logits  # causal: mean length prompt/2
    decode = output_tokens * (2 * dense + logits) + 4 * width * layers * sum(
        prompt + step for step in range(output_tokens))
    total = vision_flop + prefill + decode
    return Estimate(
        visual_tokens=visual_tokens, prompt_tokens=prompt, output_tokens=output_tokens,
        vision_params=sum(v.values()), text_params=sum(t.values()),
        vision_tflop=vision_flop / 1e12, prefill_tflop=prefill / 1e12, decode_tflop=decode / 1e12,
        total_tflop=total / 1e12, rate_tflops=rate / 1e12, efficiency=efficiency,
        images_per_s=rate * efficiency / total,
    )


def describe(e: Estimate) -> str:
    return (f"{e.visual_tokens} visual tokens, {e.prompt_tokens} prompt + {e.output_tokens} output tokens: "
            f"vision {e.vision_tflop:.2f} + prefill {e.prefill_tflop:.2f} + decode {e.decode_tflop:.2f} = "
            f"{e.total_tflop:.2f} TFLOP per image; at {e.rate_tflops:.0f} TFLOP/s x {e.efficiency:.0%}: "
            f"{e.images_per_s:.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual-tokens", type=int, default=1280)
    parser.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS)
    parser.add_argument("--efficiency", type=float, default=EFFICIENCY)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = estimate(args.visual_tokens, args.output_tokens, efficiency=args.efficiency)
    print(json.dumps(asdict(found), indent=1) if args.json else describe(found))


if __name__ == "__main__":
    main()
