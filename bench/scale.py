#!/usr/bin/env python3
"""Scale checks: what planning and resuming cost as inputs and outputs grow, each at two sizes.

Every check runs the product's own functions, each timed phase in a fresh interpreter so its peak
memory is its own (measured as in bench/resume_scan.py: RSS just before, peak `ru_maxrss` after, the
peak reset at the start of the phase), and is reported at a small and a large size, ten times apart,
so the growth can be read off: linear cost gives a time ratio near 10.

- `folder`: planning a folder of N files (100,000 and 1,000,000 empty `.jpg` files in nested folders of
  1,000; a plan never opens an image, so empty files cost it exactly what real ones do):
  `resolve_inputs([folder])` (the walk of `inputs/walk.py`, keys and signatures of `inputs/resolve.py`)
  then `plan_run()` against an empty state.
- `shards`: planning a list of N shards (1,000 and 10,000) named by one brace pattern, half of them
  finished by an earlier run (a shard record in the state). Planning a shard stats it (a FIFO or
  device is never opened) but never opens it: the shards are empty files. Timed: `resolve_inputs`,
  `RunState.finished_shards()` and `plan_run()`.
- `resume`: the resume scan and the final merge of 100,000 and 1,000,000 committed rows, by
  bench/resume_scan.py itself (called with `--rows N --parts N/1000`), which checks its own results.

    .venv/bin/python bench/scale.py                     # every check at both sizes
    .venv/bin/python bench/scale.py --only folder,shards --small   # the small sizes only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZES = {"folder": (100_000, 1_000_000), "shards": (1_000, 10_000), "resume": (100_000, 1_000_000)}
PER_FOLDER = 1_000
LIMIT_S, LIMIT_MIB = 60.0, 1024.0  # issue 11: each under a minute and 1 GB on the 2-core machine


# -- building the inputs (not timed) ---------------------------------------------------------------


def make_folder(root: Path, files: int) -> Path:
    """`files` empty images, 1,000 to a folder: `d0000/000000000.jpg`, ..."""
    folder = root / f"folder-{files}"
    if (folder / ".complete").is_file():
        return folder
    for start in range(0, files, PER_FOLDER):
        sub = folder / f"d{start // PER_FOLDER:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for number in range(start, min(files, start + PER_FOLDER)):
            os.close(os.open(sub / f"{number:09d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    (folder / ".complete").write_text("")
    return folder


def make_shards(root: Path, shards: int) -> tuple[str, Path]:
    """`shards` empty .tar files, a brace pattern naming them, and an output whose state records the
    first half as finished by an earlier run."""
    from caprl_cli.inputs.resolve import shard_ref
    from caprl_cli.state.folder import RunState

    folder = root / f"shards-{shards}"
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(shards):
        os.close(os.open(folder / f"s-{number:05d}.tar", os.O_CREAT | os.O_WRONLY, 0o644))
    output = folder / "out.parquet"
    state = RunState(output)
    state.create()
    finished = {shard_ref(str(folder / f"s-{n:05d}.tar")).source: {"samples": 1000, "errors": 0} for n in range(shards // 2)}
    state.record_finished_shards("earlier-run", finished)
    return str(folder / f"s-{{00000..{shards - 1:05d}}}.tar"), output


# -- the timed phases (each in its own interpreter) -------------------------------------------------


def phase_folder(folder: Path, files: int) -> dict[str, Any]:
    from resume_scan import check, measured

    from caprl_cli.inputs.resolve import resolve_inputs
    from caprl_cli.state.folder import RunState
    from caprl_cli.state.plan import plan_run

    index = RunState(folder.parent / "nothing.parquet").committed()  # no state: an empty index
    with measured() as m:
        inputs = resolve_inputs([str(folder)])
        m.mark("resolve_inputs (walk)")
        plan = plan_run(inputs, index)
        m.mark("plan_run")
    check(len(plan.listed.todo) == files, f"planned {len(plan.listed.todo)} of {files} files")
    return {"seconds": m.seconds, "peak_delta_mib": m.peak_delta_kib / 1024, "steps": m.steps}


def phase_shards(pattern: str, output: Path, shards: int) -> dict[str, Any]:
    from resume_scan import check, measured

    from caprl_cli.inputs.resolve import resolve_inputs
    from caprl_cli.state.folder import RunState
    from caprl_cli.state.plan import plan_run

    state = RunState(output)
    state.committed()  # warm-up outside the clock: Arrow's compute functions load on first use
    with measured() as m:
        inputs = resolve_inputs([pattern])
        m.mark("resolve_inputs (expand, stat)")
        index = state.committed()
        finished = state.finished_shards()
        m.mark("committed() + finished_shards()")
        plan = plan_run(inputs, index, finished_shards=finished)
        m.mark("plan_run")
    left = sum(1 for shard in plan.shards if shard.source in plan.tallies)
    check(len(inputs.shards) == shards, f"resolved {len(inputs.shards)} of {shards} shards")
    check(left == shards - shards // 2, f"{left} shards left, expected {shards - shards // 2}")
    return {"seconds": m.seconds, "peak_delta_mib": m.peak_delta_kib / 1024, "steps": m.steps}


def run_child(arguments: list[str]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_resume(rows: int, work: Path) -> dict[str, Any]:
    """bench/resume_scan.py at `rows` rows (parts of 1,000 rows): its scan and Parquet merge."""
    result_path = work / f"resume-{rows}.json"
    command = [sys.executable, str(ROOT / "bench" / "resume_scan.py"), "--rows", str(rows),
               "--parts", str(max(1, rows // 1000)), "--json", str(result_path),
               "--workdir", str(work / f"resume-{rows}")]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    phases = {phase["name"]: phase for phase in json.loads(result_path.read_text())["phases"]}
    return {
        name: {"seconds": phases[name]["seconds"], "peak_delta_mib": phases[name]["peak_delta_mib"]}
        for name in ("scan", "merge-parquet", "merge-jsonl")
        if name in phases
    }


# -- the report ------------------------------------------------------------------------------------


def rows_of(check_name: str, sizes: tuple[int, ...], results: dict[int, dict[str, Any]]) -> list[str]:
    lines = []
    for size in sizes:
        r = results[size]
        ok = r["seconds"] < LIMIT_S and r["peak_delta_mib"] < LIMIT_MIB
        lines.append(
            f"| {check_name} | {size:,} | {r['seconds']:.2f} | {r['seconds'] / size * 1e6:.1f} | "
            f"{r['peak_delta_mib']:.0f} | {'yes' if ok else 'NO'} |"
        )
    if len(sizes) == 2:
        small, large = (results[s] for s in sizes)
        growth = large["seconds"] / small["seconds"] if small["seconds"] else float("nan")
        memory = large["peak_delta_mib"] / small["peak_delta_mib"] if small["peak_delta_mib"] else float("nan")
        lines.append(f"| {check_name}: large ÷ small ({sizes[1] // sizes[0]}x the size) | | {growth:.1f}x | | {memory:.1f}x | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="folder,shards,resume", help="checks to run (comma-separated)")
    parser.add_argument("--small", action="store_true", help="only the smaller size of each check")
    parser.add_argument("--workdir", type=Path, help="where inputs are built (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        kind, *rest = args.phase
        if kind == "folder":
            result = phase_folder(Path(rest[0]), int(rest[1]))
        else:
            result = phase_shards(rest[0], Path(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return

    import shutil

    temporary = args.workdir is None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="caprl-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",")
    table = ["| check | size | seconds | µs per item | peak − baseline MiB | under 1 min and 1 GB |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    found: dict[str, Any] = {}
    try:
        for check_name in ("folder", "shards"):
            if check_name not in wanted:
                continue
            sizes = SIZES[check_name][:1] if args.small else SIZES[check_name]
            results = {}
            for size in sizes:
                print(f"{check_name} {size:,}: building ...", flush=True)
                built = time.perf_counter()
                if check_name == "folder":
                    arguments = ["--phase", "folder", str(make_folder(work, size)), str(size)]
                else:
                    pattern, output = make_shards(work, size)
                    arguments = ["--phase", "shards", pattern, str(output), str(size)]
                print(f"  built in {time.perf_counter() - built:.0f}s; planning ...", flush=True)
                results[size] = run_child(arguments)
            found[check_name] = results
            table += rows_of(check_name, sizes, results)
        if "resume" in wanted:
            sizes = SIZES["resume"][:1] if args.small else SIZES["resume"]
            by_phase: dict[str, dict[int, Any]] = {}
            for size in sizes:
                print(f"resume {size:,} rows ...", flush=True)
                for phase, result in check_resume(size, work).items():
                    by_phase.setdefault(phase, {})[size] = result
            found["resume"] = by_phase
            for phase, results in by_phase.items():
                table += rows_of(f"resume: {phase}", sizes, results)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({"results": found, "table": table}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
