#!/usr/bin/env python3
"""Captioning throughput of `caprl caption` side by side with a bare `vllm.LLM.generate` loop.

All contenders run in one invocation, on the same images, model, prompt and sampling settings, each in
its own process, and are reported as images/s and as a ratio to the bare baseline, so the numbers are
comparable within a run even on a noisy machine:

- `caprl` — the CLI as users run it (decoding pool, continuous feeding, committed parts, merge).
- `caprl-multiprocess` — the same with vLLM's multiprocess engine forced on (its default on GPUs).
- `bare-generate` — the best case of a hand-written script: every image decoded and resized first,
  then one `LLM.generate` call with all prompts (CapRL's prompt, one seed per request).

Only the captioning phase is timed (model loading excluded): caprl's own images/s from its summary,
and the `generate` call for the baseline. Without a model path, a tiny random Qwen2.5-VL is built, so
the figures measure pipeline overhead on this machine, not CapRL-3B on a GPU.

    .venv/bin/python bench/throughput.py --images 96
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "bare-generate"


def build_tiny_model(folder: Path) -> Path:
    """The random Qwen2.5-VL of examples/make_tiny_model.py."""
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "examples" / "make_tiny_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(folder / "tiny-model")


def make_images(folder: Path, count: int) -> Path:
    """Photo-sized JPEGs (1024x768 and 768x1024) with varied content, so decoding costs what it costs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        size = (1024, 768) if index % 2 else (768, 1024)
        gradient = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
        noise = rng.normal(0, 25, (size[1], size[0], 3)).astype(np.float32)
        pixels = np.clip(gradient * rng.uniform(0.3, 1.0, 3) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:05d}.jpg", quality=90)
    return folder


def run_caprl(images: Path, model: Path, work: Path, name: str, args: argparse.Namespace, env: dict) -> float:
    """images/s of one `caprl caption` run, read from its summary."""
    output = work / f"{name}.parquet"
    command = [
        sys.executable, "-m", "caprl_cli", "caption", str(images), "-o", str(output), "--model", str(model),
        "--max-tokens", str(args.max_tokens), "--dtype", args.dtype, "--no-progress", "-q", "--overwrite",
    ]
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    summary = json.loads(output.with_name(output.name + ".summary.json").read_text())
    return float(summary["run"]["images_per_s"])


BARE_SCRIPT = r"""
import json, sys, time
from PIL import Image
from vllm import LLM, SamplingParams
from caprl_cli.prepare.grid import Grid
from caprl_cli.model.profile import load_processor, profile_from_processor
from caprl_cli.engines.seeding import request_seed
from caprl_cli.settings import DEFAULT_PROMPT
from caprl_cli.inputs.resolve import list_samples

model, images, max_tokens, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
max_pixels = 1280 * 28 * 28
profile = profile_from_processor(load_processor(model), DEFAULT_PROMPT, None, 3136, max_pixels)
# enable_chunked_prefill=False: vLLM's CPU build cannot rewind seeded generators after partial prefills.
llm = LLM(model, dtype=dtype, max_model_len=profile.context_length(max_tokens), enforce_eager=True,
          enable_chunked_prefill=False,
          limit_mm_per_prompt={"image": 1, "video": 0},
          mm_processor_kwargs={"size": {"shortest_edge": 3136, "longest_edge": max_pixels}})
samples = list_samples([images])
start = time.perf_counter()
prompts = []
for sample in samples:
    with Image.open(sample.path) as img:
        prompts.append({"prompt": profile.prompt_text, "multi_modal_data": {"image": img.convert("RGB")}})
params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=request_seed(0, s.key))
          for s in samples]
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
print(json.dumps({"images_per_s": len(outputs) / elapsed}))
"""


def run_bare(images: Path, model: Path, args: argparse.Namespace, env: dict) -> float:
    """images/s of decoding everything, then one `LLM.generate` call (the bare-script baseline)."""
    result = subprocess.run(
        [sys.executable, "-c", BARE_SCRIPT, str(model), str(images), str(args.max_tokens), args.dtype],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if result.returncode != 0:
        sys.exit(f"the bare baseline failed:\n{result.stderr[-3000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="synthetic images to caption")
    parser.add_argument("--image-dir", type=Path, help="caption these images instead of synthetic ones")
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny random model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="caprl-bench-") as temp:
        work = Path(temp)
        model = args.model or build_tiny_model(work)
        images = args.image_dir or make_images(work / "images", args.images)
        results = {
            BASELINE: run_bare(images, model, args, env),
            "caprl": run_caprl(images, model, work, "caprl", args, env),
            "caprl-multiprocess": run_caprl(
                images, model, work, "caprl-mp", args, {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
            ),
        }
    baseline = results[BASELINE]
    print(f"{'contender':<22}{'images/s':>10}{'vs bare':>10}")
    for name, rate in results.items():
        print(f"{name:<22}{rate:>10.2f}{rate / baseline:>9.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": results, "args": vars(args)}, default=str, indent=2))


if __name__ == "__main__":
    main()
