#!/usr/bin/env python3
"""How many images per second one engine's calling thread can feed, whatever the GPU: the input-thread
ceiling.

In offline vLLM the thread that drives `LLMEngine` also runs each request's input processing (the
processor's rescale, normalise and patchify, the packing of multimodal fields) inside `add_request`,
and each step's output processing (incremental detokenizing of every running request); caprl's own
per-request work (seeds, feeding, results) runs there too. On a GPU the model runs elsewhere (the
engine core is another process), so these are what the thread does per image, and their sum bounds
the images/s of one engine. Measured on caprl's own `VllmEngine`, per image, at CapRL's pixel budget
(at most 1280 visual tokens: 980x980 images on the grid, about 1 MP) and at 256 tokens (448x448):

    input      `add_request` of an image already on the grid (then aborted): vLLM's input processing
    caprl      caprl's work per image in `VllmEngine.caption`, outside `add_request` and `step`
               (decoding each caption's tokens once included)
    output     vLLM's output processing per output token (`process_outputs` time / tokens)

Each round measures the code before and the engine as it is, side by side. Before, the engine's
thread did all of it, and vLLM detokenized every running request at every step. Now the feeder's
thread renders each image (vLLM's processor, `_SharedImage.render`), the engine's thread only adds the
rendered input (`input` of a rendered prompt), and caprl decodes each caption once
(`VllmEngine.render_ahead`, `VllmEngine.detokenize_in_vllm`): one engine is then bound by the slower of
its two threads.

ceiling = 1 / (input + caprl + output x output tokens), beside the FLOP-count estimate of an H100
(bench/gpu/estimate.py). The model's weights do not enter any of these, so the tiny random model
measures them as CapRL-3B would (with `--model` any model folder works).

    .venv/bin/python bench/input_thread.py --quick --json build/input-thread.json
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
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from estimate import OUTPUT_TOKENS, estimate  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402



def side_for(tokens: int) -> int:
    """The side of the largest square image on the 28-pixel grid with at most `tokens` visual tokens
    (980 for 1280: 1225 tokens, 0.96 MP; 448 for 256)."""
    return int(tokens**0.5) * 28


class Timed:
    """Wraps a callable, adding its wall time to `seconds` and counting calls."""

    def __init__(self, function: Any) -> None:
        self.function, self.seconds, self.calls = function, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def measure(model: str, tokens: int, images: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """The per-image times of one setting, median over `rounds` (fresh timers each round)."""
    import numpy as np
    from PIL import Image

    from caprl_cli.engines.base import ImageRequest
    from caprl_cli.engines.vllm_engine import VllmEngine
    from caprl_cli.execute.job import engine_spec, load_model
    from caprl_cli.settings import CaptionSettings

    side = side_for(tokens)
    settings = CaptionSettings(
        inputs=(), output=None, output_format="jsonl", model=model, engine="vllm", dtype="float32",
        max_tokens=max_tokens, max_pixels=tokens * 28 * 28, temperature=1.0, top_p=1.0, seed=0, max_repeats=0,
    )
    source, profile = load_model(settings)
    engine = VllmEngine(engine_spec(settings, source, profile))
    llm_engine = engine._llm.llm_engine
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(images)]
    requests = [ImageRequest(f"img{n:05d}.jpg", picture) for n, picture in enumerate(pictures)]
    prompt_tokens = 0
    from caprl_cli.engines.vllm_engine import _SharedImage

    found: dict[str, list[float]] = {name: [] for name in (
        "input_s", "render_s", "input_rendered_s", "caprl_s", "output_s_per_token", "caprl_s_vllm_detok",
        "output_s_per_token_vllm_detok")}
    originals = llm_engine.add_request, llm_engine.step, llm_engine.output_processor.process_outputs
    prompts = [{"prompt": engine.spec.prompt_text, "multi_modal_data": {"image": r.image}} for r in requests]
    try:
        list(engine.caption(requests[:4]))  # warm-up
        for round_no in range(rounds):
            # vLLM's input processing inside add_request (the code before) ...
            add = Timed(originals[0])
            ids = [f"probe-{round_no}-{n}" for n in range(len(requests))]
            for request_id, request, prompt in zip(ids, requests, prompts):
                add(request_id, prompt, engine._sampling_params(request.key, 0))
            llm_engine.abort_request(ids)
            found["input_s"].append(add.seconds / len(requests))
            # ... and split as the engine does it now: rendered on the feeder's thread, then added.
            render = Timed(_SharedImage.render)
            rendered = [render(llm_engine, prompt, f"probe-image-{round_no}-{n}") for n, prompt in enumerate(prompts)]
            add = Timed(originals[0])
            ids = [f"probe-rendered-{round_no}-{n}" for n in range(len(requests))]
            for request_id, request, prompt in zip(ids, requests, rendered):
                add(request_id, prompt, engine._sampling_params(request.key, 0))
            llm_engine.abort_request(ids)
            found["render_s"].append(render.seconds / len(requests))
            found["input_rendered_s"].append(add.seconds / len(requests))
            # caprl's own work and vLLM's output processing on the engine's thread: with vLLM
            # detokenizing every step (before) and with caprl decoding once per caption (now). Rendering
            # stays inside add_request here, so no wait for the feeder counts as caprl's time.
            engine.render_ahead = False
            for suffix, in_vllm in (("_vllm_detok", True), ("", False)):
                engine.detokenize_in_vllm = in_vllm
                add, step, out = Timed(originals[0]), Timed(originals[1]), Timed(originals[2])
                llm_engine.add_request, llm_engine.step, llm_engine.output_processor.process_outputs = add, step, out
                start = time.perf_counter()
                captions = [caption for _, caption in engine.caption(requests)]
                total = time.perf_counter() - start
                output_tokens = sum(caption.output_tokens or 0 for caption in captions)
                prompt_tokens = captions[0].prompt_tokens or 0
                found["caprl_s" + suffix].append((total - add.seconds - step.seconds) / len(requests))
                found["output_s_per_token" + suffix].append(out.seconds / max(1, output_tokens))
                llm_engine.add_request, llm_engine.step, llm_engine.output_processor.process_outputs = originals
            del engine.detokenize_in_vllm, engine.render_ahead
    finally:
        llm_engine.add_request, llm_engine.step, llm_engine.output_processor.process_outputs = originals
        engine.close()
    per = {name: statistics.median(values) for name, values in found.items()}
    return {"visual_tokens": tokens, "image_side": side, "prompt_tokens": prompt_tokens, "images": images,
            "rounds": rounds, "max_tokens": max_tokens, **per, "all_rounds": found}


def ceilings(facts: dict[str, Any], output_tokens: int) -> dict[str, float]:
    """Images/s one engine can be fed at `output_tokens` per caption: before (everything on the engine's
    thread, vLLM detokenizing every step) and now (the engine's thread: adding a rendered input, caprl's
    work, output processing; the feeder's thread: rendering; the slower of the two bounds it)."""
    before = facts["input_s"] + facts["caprl_s_vllm_detok"] + facts["output_s_per_token_vllm_detok"] * output_tokens
    engine_thread = facts["input_rendered_s"] + facts["caprl_s"] + facts["output_s_per_token"] * output_tokens
    return {"before": 1.0 / before, "engine_thread": 1.0 / engine_thread, "feeder_thread": 1.0 / facts["render_s"],
            "now": 1.0 / max(engine_thread, facts["render_s"])}


def report(results: list[dict[str, Any]], output_tokens: int) -> list[str]:
    lines = [
        f"| visual tokens | code | engine thread: input ms/img | caprl ms/img | output µs/token | feeder thread: "
        f"render ms/img | ceiling img/s at {output_tokens} tok | H100 estimate img/s | ceiling ÷ estimate |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for facts in results:
        gpu = estimate(facts["visual_tokens"], output_tokens).images_per_s
        rates = ceilings(facts, output_tokens)
        rows = (
            ("before (one thread, vLLM detokenizing)", facts["input_s"], facts["caprl_s_vllm_detok"],
             facts["output_s_per_token_vllm_detok"], None, rates["before"]),
            ("now (rendered ahead, decoded once)", facts["input_rendered_s"], facts["caprl_s"],
             facts["output_s_per_token"], facts["render_s"], rates["now"]),
        )
        for how, add, own, out, render, rate in rows:
            lines.append(
                f"| {facts['visual_tokens']} | {how} | {add * 1e3:.2f} | {own * 1e3:.2f} | {out * 1e6:.1f} | "
                f"{'–' if render is None else f'{render * 1e3:.2f}'} | {rate:.1f} | {gpu:.1f} | "
                f"{rate / gpu:.2f}x{'' if rate >= 3 * gpu else ' (under 3x)'} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: build the tiny random Qwen2.5-VL)")
    parser.add_argument("--tokens", default="1280,256", help="visual-token settings to measure")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per caption while measuring")
    parser.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS, help="caption length of the ceiling")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="24 images, 2 rounds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    images, rounds = (24, 2) if args.quick else (args.images, args.rounds)
    with tempfile.TemporaryDirectory(prefix="caprl-input-thread-") as temp:
        model = args.model or str(build_tiny_model(Path(temp)))
        results = [measure(model, int(t), images, args.max_tokens, rounds) for t in args.tokens.split(",")]
    lines = report(results, args.output_tokens)
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "output_tokens": args.output_tokens,
                                         "table": lines, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
