#!/usr/bin/env python3
"""The GPU kit's one driver: every throughput figure of a lent H100, ending with one table.

On a machine where vLLM is importable (after bench/gpu/carry.py's wheels are installed):

    PYTHONPATH=.:/tmp/site python3 bench/gpu/drive.py --out $OUT/kit

1. builds the random-weight CapRL-3B (bench/gpu/caprl3b.py; skipped when `--model` names one);
2. runs bench/throughput.py's GPU contenders at CapRL's defaults (1280x28x28 max_pixels, temperature
   1.0, top_p 1.0) with the output length fixed (`--max-tokens`, 512 by default; `ignore_eos` where the
   contender takes it, and the random model practically never stops early): `bare_vllm_predecoded`
   (bare `LLM.generate` on pre-decoded images), `caprl` (`caprl caption`) and `serve_concurrent`
   (`vllm serve`, 32 requests in flight);
3. runs bench/input_thread.py (the engine thread's time per image outside the model, at 1280 and 256
   visual tokens) and bench/shared_captions.py (`--num-captions 4`, shared against separate);
4. prints one Markdown table of all of it, beside the FLOP-count estimate (bench/gpu/estimate.py),
   and writes `summary.json` with every figure.

`--reduced`, `--images`, `--max-tokens` and `--max-pixels` make the same run small enough for the vLLM
CPU build, which is how the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from estimate import estimate  # noqa: E402

CONTENDERS = ("bare_vllm_predecoded", "caprl", "serve_concurrent")


def step(name: str, command: list[str], log: Path, env: dict[str, str]) -> None:
    """Run one part of the kit, its output in `log`; a failure stops the kit and shows the log's end."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command[1:4])} ...", flush=True)
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(log.read_text(errors="replace")[-6000:], flush=True)
        raise SystemExit(f"{name} exited {code} (log: {log})")


def table(throughput: dict[str, Any], thread: dict[str, Any], shared: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The kit's one table: measured images/s, the input-thread ceiling and the FLOP estimate."""
    tokens = args.max_pixels // (28 * 28)
    gpu = estimate(tokens, args.max_tokens)
    lines = [
        f"device: {', '.join(throughput['machine']['gpus']) or 'no GPU (' + throughput['machine']['cpu'] + ')'}; "
        f"model {throughput['settings']['model']}; {throughput['corpus']['images']} images; "
        f"max_pixels {args.max_pixels} ({tokens} visual tokens at most); {args.max_tokens} output tokens",
        "",
        "| figure | images/s | ÷ FLOP estimate |",
        "| --- | ---: | ---: |",
    ]
    for name in CONTENDERS:
        if name in throughput["images_per_s"]:
            rate = throughput["images_per_s"][name]
            lines.append(f"| `{name}` | {rate:.2f} | {rate / gpu.images_per_s:.2f}x |")
    sys.path.insert(0, str(ROOT / "bench"))
    from input_thread import ceilings

    for facts in thread["results"]:
        rates = ceilings(facts, args.max_tokens)
        gpu_rate = estimate(facts["visual_tokens"], args.max_tokens).images_per_s
        for name, label in (("before", "one thread, vLLM detokenizing (before)"),
                            ("now", "rendered ahead, decoded once (now)")):
            lines.append(f"| input-thread ceiling, {facts['visual_tokens']} visual tokens, {label} | "
                         f"{rates[name]:.2f} | {rates[name] / gpu_rate:.2f}x |")
    lines.append(f"| FLOP estimate ({gpu.total_tflop:.2f} TFLOP/image at {gpu.rate_tflops:.0f} TFLOP/s x "
                 f"{gpu.efficiency:.0%}) | {gpu.images_per_s:.2f} | 1.00x |")
    sep, sha = shared["images_per_s"]["separate"], shared["images_per_s"]["shared"]
    lines.append(f"| `--num-captions 4`: separate / shared requests (median ratio {shared['shared_over_separate']:.2f}x; "
                 f"identical: {shared['identical']}) | {sorted(sep)[len(sep) // 2]:.2f} / {sorted(sha)[len(sha) // 2]:.2f} | |")
    ratios = throughput.get("caprl_over", {})
    if "serve_concurrent" in ratios:
        lines.append("")
        lines.append(f"caprl ÷ serve_concurrent: {ratios['serve_concurrent']:.2f}x; "
                     f"caprl ÷ bare_vllm_predecoded: {ratios.get('bare_vllm_predecoded', float('nan')):.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-kit")
    parser.add_argument("--model", help="a model folder (default: build the random-weight CapRL-3B in --out)")
    parser.add_argument("--reduced", action="store_true", help="build the reduced model (CPU tests)")
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--max-mp", type=float, default=3.0, help="largest corpus image, megapixels")
    parser.add_argument("--max-tokens", type=int, default=512, help="the fixed caption length")
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    parser.add_argument("--thread-tokens", default="1280,256", help="visual-token settings of the input-thread run")
    parser.add_argument("--thread-images", type=int, default=64)
    parser.add_argument("--shared-images", type=int, default=64)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    python = sys.executable
    model = args.model
    if model is None:
        model = str(out / ("caprl3b-reduced" if args.reduced else "caprl3b-random"))
        step("model", [python, str(HERE / "caprl3b.py"), model, *(["--reduced"] if args.reduced else [])],
             out / "model.log", env)
    side = int((args.max_pixels // (28 * 28)) ** 0.5) * 28
    step("throughput", [python, str(ROOT / "bench" / "throughput.py"), "--model", model, "--only", ",".join(CONTENDERS),
                        "--images", str(args.images), "--max-mp", str(args.max_mp), "--max-tokens", str(args.max_tokens),
                        "--max-pixels", str(args.max_pixels), "--json", str(out / "throughput.json"), "--no-extras"],
         out / "throughput.log", env)
    step("input thread", [python, str(ROOT / "bench" / "input_thread.py"), "--model", model,
                          "--tokens", args.thread_tokens, "--images", str(args.thread_images),
                          "--output-tokens", str(args.max_tokens), "--rounds", "2", "--json", str(out / "input-thread.json")],
         out / "input-thread.log", env)
    step("shared captions", [python, str(ROOT / "bench" / "shared_captions.py"), "--model", model,
                             "--images", str(args.shared_images), "--side", str(side), "--rounds", "2",
                             "--max-tokens", str(min(args.max_tokens, 128)), "--json", str(out / "shared-captions.json")],
         out / "shared-captions.log", env)
    throughput = json.loads((out / "throughput.json").read_text())
    thread = json.loads((out / "input-thread.json").read_text())
    shared = json.loads((out / "shared-captions.json").read_text())
    lines = table(throughput, thread, shared, args)
    (out / "summary.json").write_text(json.dumps({"throughput": throughput, "input_thread": thread,
                                                  "shared_captions": shared, "table": lines}, indent=2))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
