#!/usr/bin/env python3
"""Where a profiled contender's time went: py-spy's collapsed stacks (bench/throughput.py --py-spy)
summed by process, thread and the part of the pipeline each stack is in.

    .venv/bin/python bench/profile_summary.py build/profiles/caprl.txt build/profiles/serve_concurrent.server.txt

Each stack is put in the first part whose marker one of its frames contains (the model's forward
before the vision encoder inside it, and so on); shares are of all samples of the file, so threads
that were busy at the same time add up to more than the wall time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# (part, markers): the first part any frame of a stack matches names the stack.
PARTS = (
    ("vision encoder", ("embed_multimodal", "get_multimodal_embeddings", "_process_image_input")),
    ("model forward (language model, sampling)", ("execute_model", "sample_tokens", "_model_forward", "model_runner")),
    ("scheduler", ("schedule (", "scheduler.py")),
    ("input processing (processor, rendering)", ("render_cmpl", "_process_multimodal", "process_inputs", "_rendered (")),
    ("output processing (detokenizing, outputs)", ("process_outputs", "detokenize", "output_processor")),
    ("caprl decode workers", ("prepare_image", "_decode_worker", "decode_into")),
    ("caprl rows, parts, progress", ("caprl_cli/outputs", "caprl_cli/state", "caprl_cli/runner", "progress")),
    ("HTTP front end (API server, client)", ("uvicorn", "fastapi", "starlette", "serving_", "openai/", "httpx", "httpcore")),
    ("engine-core messaging (zmq, pickling)", ("zmq", "msgspec", "serial_utils", "core_client", "run_busy_loop")),
)


def summarise(path: Path) -> list[tuple[str, int]]:
    """(part, samples) of one profile, most first; 'other' for stacks no marker matches."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        part = next((name for name, markers in PARTS if any(m in stack for m in markers)), "other")
        counts[part] += int(number)
    return counts.most_common()


def processes(path: Path) -> Counter[str]:
    """Samples per process and thread (py-spy's first two frames with --subprocesses --threads)."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if number.isdigit():
            frames = stack.split(";")
            head = ";".join(re.sub(r"\s+", " ", f)[:80] for f in frames[:2])
            counts[head] += int(number)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.profiles:
        parts = summarise(path)
        total = sum(n for _, n in parts) or 1
        print(f"## {path.name} ({total} samples)")
        for name, number in parts:
            print(f"| {name} | {number / total:.0%} |")
        for head, number in processes(path).most_common(6):
            print(f"   {number / total:5.0%}  {head}")


if __name__ == "__main__":
    main()
