#!/usr/bin/env python3
"""The multi-engine executor measured on its own: can the driver feed a big box, and do engines scale?

Two figures, each from real runs of `caprl_cli.runner.run_caption` (the code path of
`caprl caption ... --num-engines N`: planning, the driver's queue, the fleet loop, committed parts,
the final merge):

1. **Routing ceiling, per transport.** Images/s through the driver when engines cost nothing: a
   stand-in engine defined here (`InstantEngine`) returns a fixed caption for every image at once, on
   small pre-resized images, so what is left is planning, handing out units, rows coming back, committing
   parts and merging. Measured side by side, over the same stand-in engines and images, for both
   transports of the fleet loop: engine worker processes over pipes (`--executor local`) and Ray actors
   on a local Ray cluster (`--executor ray`), with their ratio. Target: at least 2,000 images/s for
   each (8 GPUs at 30 images/s each are far from it).
2. **Scaling efficiency.** The same images captioned by the transformers engine with the tiny random
   Qwen2.5-VL, by 2 engines each held to one core (`os.sched_setaffinity` in its worker, one torch
   thread) against 1 engine held to one core. Target: at least 1.8x.

The stand-in engines are named `executor:<factory>` (`caprl_cli.engines.load_engine` imports a
`module:factory` engine where the engine runs): this folder is on the PYTHONPATH of every measured run,
so engine worker processes and Ray actors alike import them from here. No CLI option exists for them.

Each measurement runs in a fresh interpreter (this script calls itself with `--phase`), so pinning one
run to a core never touches another. Results are printed as JSON with the machine's details.

    .venv/bin/python bench/executor.py
    .venv/bin/python bench/executor.py --routing-images 50000 --scaling-images 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from caprl_cli.engines.base import Caption, Engine, EngineSpec, ImageRequest

ROOT = Path(__file__).resolve().parents[1]

from tiny_model import build_tiny_model  # noqa: E402  (bench/ is the script's own folder on sys.path)

INSTANT = "executor:InstantEngine"
ONE_CORE_TRANSFORMERS = "executor:one_core_transformers"
ROUTING_TARGET = 2000.0
SCALING_TARGET = 1.8


class InstantEngine(Engine):
    """A stand-in engine that captions every image at once with the same words: the executor's cost
    is then all there is."""

    name = "bench-instant"

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    @property
    def version(self) -> str:
        return "bench instant engine"

    def caption(
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        for item in items:
            if should_stop():
                return
            yield item.key, Caption("a fixed caption", "stop", 1, 4)

    def close(self) -> None:
        pass


def engine_index() -> int:
    """This engine's number: engine workers are processes named `caprl-engine-<n>`; a single engine
    runs in the main process (number 0)."""
    name = multiprocessing.current_process().name
    return int(name.rsplit("-", 1)[1]) if name.startswith("caprl-engine-") else 0


def one_core_transformers(spec: EngineSpec) -> Engine:
    """The transformers engine held to one core (engine n on the n-th core this run may use) and one
    torch thread."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[engine_index() % len(cores)]})
    import torch

    torch.set_num_threads(1)
    from caprl_cli.engines.transformers_engine import TransformersEngine

    return TransformersEngine(spec)


# -- inputs --------------------------------------------------------------------------------------------


def make_images(folder: Path, count: int, size: int) -> Path:
    """`count` JPEGs of `size`x`size` pixels (a multiple of the 28-pixel grid: already resized), in
    folders of 1,000 like a real corpus."""
    from PIL import Image

    for index in range(count):
        sub = folder / f"part{index // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        shade = (index * 37 % 256, index * 11 % 256, 128)
        Image.new("RGB", (size, size), shade).save(sub / f"img{index:07d}.jpg", quality=85)
    return folder


# -- one measurement (in a fresh interpreter) ----------------------------------------------------------


def run_phase(args: argparse.Namespace) -> dict:
    """One `run_caption` with the engine and engine count asked for; its wall time and summary."""
    from caprl_cli.runner import run_caption
    from caprl_cli.settings import CaptionSettings

    if args.pin_process is not None:  # the whole run, parent included, on one core
        os.sched_setaffinity(0, {args.pin_process})
    output = Path(args.output)
    settings = CaptionSettings(
        inputs=(args.images,),
        output=output,
        output_format="parquet",
        model=args.model,
        engine=args.engine,
        dtype="float32",
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        workers=args.workers,
        num_engines=args.engines,
        executor=args.executor,
        flush_every=args.flush_every,
        progress=False,
        overwrite=True,
    )
    started = time.perf_counter()
    run_caption(settings, time.monotonic())
    wall = time.perf_counter() - started
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    run = summary["run"]
    rows = _row_count(output)
    if rows != args.expect or run["ok"] != args.expect:
        raise SystemExit(f"expected {args.expect} ok rows, the output holds {rows} ({run['ok']} ok)")
    return {
        "executor": args.executor,
        "engines": args.engines,
        "images": run["images"],
        "wall_s": round(wall, 3),
        "images_per_s_end_to_end": round(run["images"] / wall, 1),
        "images_per_s_captioning": run["images_per_s"],
        "per_engine": [
            {key: engine[key] for key in ("engine", "images", "units", "images_per_s", "restarts")}
            for engine in run.get("engines") or []
        ],
    }


def _row_count(output: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(output).metadata.num_rows


def measure(
    images: Path, model: Path, work: Path, name: str, engine: str, engines: int, count: int,
    args: argparse.Namespace, pin_process: int | None = None, batch_size: int | None = None, executor: str = "local",
) -> dict:
    """Run one phase in its own interpreter and return what it printed."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--phase",
        "--images", str(images), "--model", str(model), "--output", str(work / name / "out.parquet"),
        "--engine", engine, "--engines", str(engines), "--workers", "0", "--expect", str(count),
        "--max-tokens", str(args.max_tokens), "--flush-every", str(args.flush_every), "--executor", executor,
    ]
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    if pin_process is not None:
        command += ["--pin-process", str(pin_process)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0"}
    (work / name).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: say how much there was
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average_before": round(load_before, 2)}


# -- the machine ------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "pyarrow"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routing-images", type=int, default=20_000)
    parser.add_argument("--routing-engines", type=int, default=2)
    parser.add_argument("--scaling-images", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--flush-every", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default: a temp dir, deleted")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--skip", choices=("routing", "scaling"), action="append", default=[])
    parser.add_argument(
        "--transports", nargs="+", choices=("local", "ray"), default=["local", "ray"],
        help="the executors whose routing ceiling is measured, side by side",
    )
    # A single measurement, run by this script in a fresh interpreter:
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    for name in ("--images", "--model", "--output", "--engine", "--executor"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--engines", "--workers", "--expect", "--batch-size", "--pin-process"):
        parser.add_argument(name, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return

    with tempfile.TemporaryDirectory(prefix="caprl-bench-executor-") as temp:
        work = args.workdir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_tiny_model(work)
        result: dict = {"machine": machine()}
        if "routing" not in args.skip:
            count = args.routing_images
            images = make_images(work / "routing-images", count, 56)
            runs = {
                executor: measure(
                    images, model, work, f"routing-{executor}", INSTANT, args.routing_engines, count, args,
                    batch_size=64, executor=executor,
                )
                for executor in args.transports
            }
            result["routing"] = {
                "what": f"{count} pre-resized 56x56 JPEGs, stand-in engine that answers at once, "
                f"{args.routing_engines} engines decoding in their own process, per transport",
                "target_images_per_s": ROUTING_TARGET,
                **runs,
            }
            if {"local", "ray"} <= set(runs):
                result["routing"]["ray_over_local"] = round(
                    runs["ray"]["images_per_s_captioning"] / runs["local"]["images_per_s_captioning"], 2
                )
        if "scaling" not in args.skip:
            count = args.scaling_images
            images = make_images(work / "scaling-images", count, 224)
            first_core = sorted(os.sched_getaffinity(0))[0]
            one = measure(images, model, work, "scaling-1", ONE_CORE_TRANSFORMERS, 1, count, args, pin_process=first_core)
            two = measure(images, model, work, "scaling-2", ONE_CORE_TRANSFORMERS, 2, count, args)
            result["scaling"] = {
                "what": f"{count} 224x224 JPEGs, tiny random Qwen2.5-VL, transformers engine, float32, "
                f"--max-tokens {args.max_tokens}, batch 8, decoding in the engine's process; each engine "
                "on one core with one torch thread (the 1-engine run, parent included, on one core)",
                "target_speedup": SCALING_TARGET,
                "one_engine": one,
                "two_engines": two,
                "speedup": round(two["images_per_s_captioning"] / one["images_per_s_captioning"], 2),
                "speedup_end_to_end": round(two["images_per_s_end_to_end"] / one["images_per_s_end_to_end"], 2),
            }
        text = json.dumps(result, indent=2)
        print(text)
        if args.json is not None:
            args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
