"""Where caprl's vLLM pipeline loses time against the engine's ceiling, measured in one process.

One model load, then the same images captioned, round after round, by:

    ceiling       `LLM.generate` over images already on the model's grid in memory (what
                  bench/throughput.py calls bare_vllm_predecoded), on caprl's own `LLM`
    feeding       caprl's `VllmEngine.caption` over the same in-memory images: the cost of feeding the
                  engine request by request (the feeder thread, per-step adds, outputs, seeds)
    workers=N     caprl's `VllmEngine.caption` fed by caprl's `Preprocessor` with N decode processes
                  from the files on disk: what `caprl caption` does minus planning and writing rows

Alternating the systems within one process makes their ratios comparable on a machine that other
work shares (absolute figures move with the load; ratios within a round much less).

    .venv/bin/python bench/engine_feed.py --images build/bench-corpus/320img-0.3-3mp-ff565e5ebb \\
        --model build/tiny-model --rounds 2 --workers 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (e.g. the bench corpus)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-pixels", type=int, default=256 * 28 * 28)
    parser.add_argument("--max-repeats", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1", help="comma-separated decode worker counts to run")
    parser.add_argument("--unseeded", action="store_true", help="also run `feeding` without per-request seeds")
    parser.add_argument("--unwatched", action="store_true",
                        help="also run `feeding` without loop detection (whole captions, no per-step token stream)")
    parser.add_argument("--nice", type=int, default=0, help="lower the decode workers' priority by this much")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from caprl_cli.engines.base import ImageRequest
    from caprl_cli.engines.vllm_engine import VllmEngine
    from caprl_cli.execute.job import engine_spec, load_model
    from caprl_cli.execute.stream import image_requests, images_only
    from caprl_cli.inputs.resolve import list_samples
    from caprl_cli.prepare.images import prepare_image
    from caprl_cli.prepare.pool import DecodeSettings, Preprocessor
    from caprl_cli.settings import CaptionSettings

    settings = CaptionSettings(
        inputs=(str(args.images),), output=None, output_format="jsonl", model=args.model, engine="vllm",
        dtype="float32", max_tokens=args.max_tokens, max_pixels=args.max_pixels, temperature=1.0, top_p=1.0,
        seed=0, max_repeats=args.max_repeats,
    )
    source, profile = load_model(settings)
    spec = engine_spec(settings, source, profile)
    engine = VllmEngine(spec)
    samples = sorted(list_samples([str(args.images)]), key=lambda s: s.key)
    decoded = [prepare_image(Path(s.path).read_bytes(), profile.grid, 10**9).image for s in samples]
    keys = [s.key for s in samples]
    config = engine._llm.llm_engine.vllm_config
    print(f"{len(samples)} images, engine {engine.version}, max_num_seqs {config.scheduler_config.max_num_seqs}, "
          f"prefix caching {config.cache_config.enable_prefix_caching}, loop detection {engine._watch}", flush=True)

    def ceiling() -> int:
        from vllm import SamplingParams

        prompts = [{"prompt": spec.prompt_text, "multi_modal_data": {"image": img}} for img in decoded]
        params = [engine._sampling_params(key, 0) for key in keys]
        params = [SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed)
                  for p in params]
        return len(engine._llm.generate(prompts, params, use_tqdm=False))

    def feeding() -> int:
        requests = (ImageRequest(key, img) for key, img in zip(keys, decoded))
        return sum(1 for _ in engine.caption(requests))

    def unseeded() -> int:
        original = engine._sampling_params

        def without_seed(key: str, index: int, streamed: bool = False) -> Any:
            params = original(key, index, streamed)
            params.seed = None
            return params

        engine._sampling_params = without_seed  # type: ignore[method-assign]
        try:
            return feeding()
        finally:
            del engine._sampling_params

    def from_files(workers: int) -> int:
        pre = Preprocessor(DecodeSettings(profile.grid, settings.max_image_pixels), workers)
        for worker in pre._pool:
            if args.nice:
                os.setpriority(os.PRIO_PROCESS, worker.process.pid, args.nice)
        try:
            waiting: dict[str, Any] = {}
            never = lambda: False  # noqa: E731
            requests = image_requests(images_only(pre.prepare(iter(samples), never), None, "", never), waiting)
            return sum(1 for _ in engine.caption(requests))
        finally:
            pre.close()

    def unwatched() -> int:
        watch, engine._watch = engine._watch, None
        try:
            return feeding()
        finally:
            engine._watch = watch

    systems: dict[str, Any] = {"ceiling": ceiling, "feeding": feeding}
    if args.unwatched:
        systems["feeding_unwatched"] = unwatched
    if args.unseeded:
        systems["feeding_unseeded"] = unseeded
    for n in [int(w) for w in args.workers.split(",") if w != ""]:
        systems[f"workers={n}"] = lambda n=n: from_files(n)
    ceiling()  # warm-up, untimed: the first batch of a fresh engine is slower for every system alike
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for round_no in range(args.rounds):
        line = []
        for name, run in systems.items():
            start = time.perf_counter()
            done = run()
            rate = done / (time.perf_counter() - start)
            rates[name].append(rate)
            line.append(f"{name} {rate:.2f}")
        ratios = ", ".join(f"{n} {rates[n][-1] / rates['ceiling'][-1]:.2f}x" for n in systems if n != "ceiling")
        print(f"round {round_no + 1}: " + ", ".join(line) + f" images/s | of ceiling: {ratios}", flush=True)
    summary = {
        name: {"images_per_s": values, "of_ceiling": [v / c for v, c in zip(values, rates["ceiling"])]}
        for name, values in rates.items()
    }
    for name, facts in summary.items():
        print(f"{name}: median of ceiling {statistics.median(facts['of_ceiling']):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"images": str(args.images), "json": None},
                                         "systems": summary}, indent=2, default=str))
    engine.close()


if __name__ == "__main__":
    main()
