#!/usr/bin/env python3
"""`--num-captions N`: captions of one image sharing its work, against each caption as its own request.

Two of caprl's `VllmEngine`s on the same model, loaded side by side in one process, caption the same
images with N captions each, alternating round after round (ratios within a round are what to read on
a shared machine):

    separate   each caption its own request (the code before sharing: prefix caching off, the image
               rendered by vLLM's processor N times, vision encoder and prefill run N times)
    shared     the image rendered once, its first caption prefilled before its N - 1 siblings, prefix
               caching on (on a GPU; on the CPU build only with --prefix-caching): the siblings reuse
               the image's encoder output and prompt KV

Both must give the same captions, seed for seed; the script checks every caption's text and token
count and exits non-zero if any differs.

    .venv/bin/python bench/shared_captions.py --quick --json build/shared-captions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tiny_model import build_tiny_model  # noqa: E402


def images_of(count: int, side: int) -> list[Any]:
    """Photo-like images (the throughput corpus's drawing) already on the model's grid."""
    import numpy as np

    from throughput import draw_photo

    rng = np.random.default_rng(0)
    return [draw_photo(rng, (side, side)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: build the tiny random Qwen2.5-VL)")
    parser.add_argument("--num-captions", type=int, default=4)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=1008, help="image side on the grid (1008: 1296 visual tokens)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 images of 448x448 (256 tokens), 16 tokens, 2 rounds")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="on the CPU build too (off there by default: see VllmEngine; it can fail on many images)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.images, args.side, args.max_tokens, args.rounds = 32, 448, 16, 2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from caprl_cli.engines.base import ImageRequest
    from caprl_cli.engines.vllm_engine import VllmEngine
    from caprl_cli.execute.job import engine_spec, load_model
    from caprl_cli.settings import CaptionSettings

    with tempfile.TemporaryDirectory(prefix="caprl-shared-") as temp:
        model = args.model or str(build_tiny_model(Path(temp)))
        settings = CaptionSettings(
            inputs=(), output=None, output_format="jsonl", model=model, engine="vllm", dtype="float32",
            max_tokens=args.max_tokens, max_pixels=args.side * args.side, temperature=1.0, top_p=1.0, seed=0,
            max_repeats=0, num_captions=args.num_captions,
        )
        source, profile = load_model(settings)
        spec = engine_spec(settings, source, profile)
        engines = {"separate": VllmEngine(spec, share_captions=False), "shared": VllmEngine(spec, share_captions=True, prefix_caching=True if args.prefix_caching else None)}
        pictures = images_of(args.images, args.side)
        round_no = [0]

        def run(engine: Any) -> tuple[float, dict[str, Any]]:
            # Keys new every round, so no round finds the last one's images in the prefix cache.
            requests = [ImageRequest(f"r{round_no[0]}-{n:05d}.jpg", p) for n, p in enumerate(pictures)]
            start = time.perf_counter()
            captions = dict(engine.caption(requests))
            return len(captions) / (time.perf_counter() - start), captions

        run(engines["separate"])  # warm-up, untimed, for both alike
        run(engines["shared"])
        rates: dict[str, list[float]] = {name: [] for name in engines}
        identical = True
        for number in range(args.rounds):
            round_no[0] = number
            outputs = {}
            for name, engine in engines.items():
                rate, outputs[name] = run(engine)
                rates[name].append(rate)
            texts = {name: {key: [(c.text, c.output_tokens, c.finish_reason) for c in caption.all]
                            for key, caption in found.items()} for name, found in outputs.items()}
            identical &= texts["separate"] == texts["shared"]
            print(f"round {number + 1}: separate {rates['separate'][-1]:.2f}, shared {rates['shared'][-1]:.2f} "
                  f"images/s ({rates['shared'][-1] / rates['separate'][-1]:.2f}x); captions identical: "
                  f"{texts['separate'] == texts['shared']}", flush=True)
        caching = engines["shared"]._llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        for engine in engines.values():
            engine.close()
    ratio = statistics.median(s / p for s, p in zip(rates["shared"], rates["separate"]))
    print(f"prefix caching of the shared engine: {caching}")
    print(f"--num-captions {args.num_captions}, {args.images} images of {args.side}x{args.side}, "
          f"{args.max_tokens} tokens: shared ÷ separate {ratio:.2f}x (median of {args.rounds} rounds); "
          f"captions identical seed for seed: {identical}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "images_per_s": rates,
                                         "shared_over_separate": ratio, "identical": identical, "prefix_caching": caching,
                                         "load_average": os.getloadavg()}, indent=2))
    if not identical:
        raise SystemExit("captions differ between shared and separate requests")


if __name__ == "__main__":
    main()
