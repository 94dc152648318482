"""CapRL-3B's architecture and sizes, and a random-weight model of it built here, with no download.

CapRL-3B is a Qwen2.5-VL-3B fine-tune, so its compute per token is Qwen2.5-VL-3B's. The GPU kit
measures throughput on a model of exactly that shape (every size of the config, the full 151,936-row
vocabulary, a tokenizer whose ids cover Qwen2.5's and its special tokens at Qwen's ids), with random
weights: what it captions is noise, but every matrix the GPU multiplies is the real model's size.

    python bench/gpu/caprl3b.py build/caprl3b-random            # the real sizes (7.5 GB in bf16)
    python bench/gpu/caprl3b.py --reduced build/caprl3b-reduced  # small layers, same vocabulary and grid

`--reduced` keeps the vocabulary, tokenizer, grid and every structural setting and shrinks only the
widths and depths; the tests build it to check the builder on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# Qwen2.5's tokenizer: 151,643 byte-level BPE tokens, then these 22 special tokens, in this order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
REGULAR_TOKENS = 151_643
VOCAB_ROWS = 151_936  # the embedding's rows: Qwen pads the vocabulary past the tokenizer's 151,665

# Qwen2.5-VL-3B-Instruct's config (CapRL-3B's), the fields that decide shapes and compute.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_ROWS,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "max_window_layers": 70,
    "attention_dropout": 0.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "out_hidden_size": 2048,
}
# What --reduced changes: widths and depths only (head_dim 32, the smallest vLLM's CPU attention takes:
# mrope sections sum to 16).
REDUCED_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}}
REDUCED_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                  "fullatt_block_indexes": [1], "out_hidden_size": 128}


def configs(reduced: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text and vision configs, CapRL-3B's or the reduced ones."""
    text, vision = copy.deepcopy(TEXT_CONFIG), copy.deepcopy(VISION_CONFIG)
    if reduced:
        text.update(copy.deepcopy(REDUCED_TEXT))
        vision.update(copy.deepcopy(REDUCED_VISION))
    return text, vision


def byte_level_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary of exactly REGULAR_TOKENS tokens, with the merges that make them.

    Qwen's own merges come from training on a corpus this machine does not have; these are made up
    (every byte pair, then pairs extended by a byte), which gives the same vocabulary size and the
    same id range, so embedding, sampling and detokenizing cost what they cost with the real one.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    pairs = [(a, b) for a in alphabet for b in alphabet]
    for left, right in pairs:
        if len(vocab) == REGULAR_TOKENS:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    for left, _ in ((a + b, None) for a, b in pairs):
        for right in alphabet:
            if len(vocab) == REGULAR_TOKENS:
                return vocab, merges
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    return vocab, merges


def build_tokenizer() -> Any:
    """A fast tokenizer with Qwen2.5's 151,665 ids: 151,643 byte-level tokens, then its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = byte_level_vocabulary()
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def build(out: Path, reduced: bool = False, seed: int = 0, device: str | None = None) -> Path:
    """Write a random-weight CapRL-3B (bf16; float32 when reduced, for the CPU) with its processor,
    tokenizer and chat template to `out`; return `out`. `device` defaults to CUDA when there is one."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    sys.path.insert(0, str(ROOT / "examples"))
    from make_tiny_model import CHAT_TEMPLATE, _save

    tokenizer = build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text, vision = configs(reduced)
    text |= {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
             "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    dtype = torch.float32 if reduced else torch.bfloat16
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype)
    image_processor = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=12845056
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    return _save(model.to("cpu"), ids, out, processor, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reduced", action="store_true", help="small widths and depths (tests, CPU)")
    parser.add_argument("--device", help="where to initialise the weights (default: cuda if present)")
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        print(f"{args.out}: already built")
        return
    print(build(args.out, reduced=args.reduced, device=args.device))


if __name__ == "__main__":
    main()
