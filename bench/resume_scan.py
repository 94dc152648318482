"""Benchmark what a resumed run pays before its first caption, and what every run pays at its end.

A resumed run first reads the key index of every committed part (`RunState.committed`) and plans
against it (`plan_run`); every run ends by rebuilding the output from all parts (`merge_output`).
Both grow with the whole history of the output, not with the work of the run, so on a large output
they decide how long `caprl` takes to start and to finish. This script builds a state folder the way a
real run leaves it, then times each step in a fresh interpreter so that peak memory is the step's own.

    .venv/bin/python bench/resume_scan.py                      # 1,000,000 rows in 1,000 parts
    .venv/bin/python bench/resume_scan.py --parts 10000        # what --flush-every 100 leaves
    .venv/bin/python bench/resume_scan.py --json result.json --keep

Figures are warm-cache: the parts were just written, so they are read from the page cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.table import merge_output
from caprl_cli.state.parts import PartWriter, new_run_id
from caprl_cli.state.plan import plan_run
from caprl_cli.inputs.resolve import InputSet
from caprl_cli.outputs.rows import Row, caption_row, error_row
from caprl_cli.state.folder import RunState

MANIFEST = "manifest.json"
OUTPUT_NAME = "out.parquet"
MODEL = "internlm/CapRL-3B"
IMAGE_ROOT = "/data/images"
NEW_FRACTION = 0.01  # inputs added since the last run: what the plan must find
ERROR_FRACTION = 0.02
KEYS_PER_SHARD = 10_000
INDEX_COLUMNS = ["key", "status", "error"]

# Words a captioning model uses; captions are random sentences of them, so text varies row to row
# and compresses roughly like real captions rather than like one repeated string.
VOCABULARY = """
the a an this that of in on at with and or but while near behind beside above below under over
between across along through around against into onto from by its their his her several many two
three four five few some large small tall short wide narrow old young bright dark pale vivid
colorful muted wooden metal glass stone brick concrete plastic fabric leather paper red orange yellow
green blue purple pink brown black white gray golden silver beige turquoise man woman child boy girl
person people group crowd dog cat horse bird cow sheep car truck bus bicycle motorcycle train boat
airplane building house tower bridge road street sidewalk path field meadow forest tree trees bush
flower flowers grass sky cloud clouds sun moon mountain hill river lake sea ocean beach sand rock
rocks wave waves snow rain fog window door roof wall fence sign table chair sofa bed lamp shelf book
books cup plate bowl bottle glass food bread fruit apple orange banana vegetable kitchen room office
street market shop store park garden city town village countryside background foreground center left
right corner edge top bottom side surface texture pattern shadow shadows light reflection sunlight
standing sitting walking running holding wearing looking smiling talking playing riding driving
parked lying hanging leaning reading eating drinking carrying pointing facing covered surrounded
filled lined scattered arranged stacked visible blurred detailed sharp soft warm cold calm busy
quiet empty crowded modern traditional rustic elegant simple ornate industrial natural urban rural
shirt jacket coat dress hat cap glasses shoes jeans uniform helmet bag backpack umbrella phone camera
screen computer keyboard poster painting photograph logo text letters words numbers label scene image
photo picture view composition atmosphere mood lighting evening morning afternoon night daytime
sunset sunrise winter summer autumn spring indoor outdoor distant close appears seems suggests shows
depicts features includes captures displays
""".split()
ERROR_MESSAGES: list[tuple[ErrorKind, str, float]] = [
    (ErrorKind.DECODE, "cannot identify image file '{source}'", 0.55),
    (ErrorKind.READ, "[Errno 13] Permission denied: '{source}'", 0.15),
    (ErrorKind.TOO_LARGE, "{pixels} pixels is more than --max-image-pixels 89478485", 0.10),
    (ErrorKind.ASPECT_RATIO, "{width}x{height} has an aspect ratio over 200", 0.08),
    (ErrorKind.ENGINE, "request failed: prompt of {tokens} tokens is longer than --max-model-len", 0.07),
    (ErrorKind.SHARD, "tar shard {shard}.tar is truncated at member {key}", 0.05),
]


# -- the workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the state folder holds; written to the manifest so that every phase agrees on it.

    Committed keys and new keys interleave (inputs are sorted by key), so the plan cannot find the new
    keys by looking at the end of the list. `retried` error keys are committed a second time as ok rows
    by a later run, as `--retry-errors` does, so some keys have two rows and the newest must win.
    """

    rows: int  # committed rows, counting retried keys twice
    parts: int  # parts the first run is asked to leave; `part_files` is what it did leave
    retried: int = 0
    seed: int = 0
    part_files: int = 0  # filled in by synthesis
    error_rows: int = 0  # filled in by synthesis: error rows of the first run

    @property
    def distinct_keys(self) -> int:
        return self.rows - self.retried

    @property
    def new_keys(self) -> int:
        return max(1, round(self.distinct_keys * NEW_FRACTION))

    @property
    def flush_rows(self) -> int:
        return max(1, self.rows // self.parts)

    def new_ids(self) -> set[int]:
        """Ids (positions in the sorted input list) of the inputs that are not committed yet."""
        total = self.distinct_keys + self.new_keys
        return set(random.Random(self.seed + 1).sample(range(total), self.new_keys))

    def committed_ids(self) -> Iterator[int]:
        new = self.new_ids()
        return (i for i in range(self.distinct_keys + self.new_keys) if i not in new)

    def input_ids(self) -> range:
        return range(self.distinct_keys + self.new_keys)


def key_of(sample_id: int) -> str:
    """A key like a sharded dataset's, fixed width, so sorting keys sorts ids."""
    return f"shard-{sample_id // KEYS_PER_SHARD:05d}/{sample_id:09d}.jpg"


def source_of(key: str) -> str:
    return f"{IMAGE_ROOT}/{key}"


def sample_of(sample_id: int) -> Sample:
    """An input as `list_samples` would give it for an image on disk."""
    key = key_of(sample_id)
    return Sample(key=key, source=source_of(key), path=source_of(key))


# -- synthesis -------------------------------------------------------------------------------------


def make_caption(rng: random.Random) -> str:
    """600-1200 characters of sentences, like a detailed caption."""
    target = rng.randint(600, 1200)
    sentences: list[str] = []
    length = 0
    while length < target:
        words = rng.choices(VOCABULARY, k=rng.randint(8, 22))
        if len(words) > 12 and rng.random() < 0.5:
            words[rng.randint(4, len(words) - 4)] += ","
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        length += len(sentence) + 1
    return " ".join(sentences)


def make_ok_row(rng: random.Random, key: str) -> Row:
    """A captioned row with every column filled as the runner fills it."""
    caption = make_caption(rng)
    width, height = rng.choice([(1024, 768), (768, 1024), (1920, 1080), (640, 480), (1280, 1280)])
    return caption_row(
        key=key,
        source=source_of(key),
        model=MODEL,
        caption=caption,
        finish_reason="stop" if rng.random() < 0.99 else "length",
        prompt_tokens=rng.randint(300, 1400),
        output_tokens=len(caption) // 4,
        width=width,
        height=height,
    )


def make_error_row(rng: random.Random, key: str) -> Row:
    """An error row of a random kind, weighted roughly as they occur (undecodable files most)."""
    kind, template, _ = rng.choices(ERROR_MESSAGES, weights=[w for *_, w in ERROR_MESSAGES])[0]
    message = template.format(
        source=source_of(key),
        pixels=rng.randint(90_000_000, 400_000_000),
        width=rng.randint(8000, 20000),
        height=rng.randint(10, 40),
        tokens=rng.randint(33_000, 90_000),
        shard=key.split("/", 1)[0],
        key=key,
    )
    return error_row(key=key, source=source_of(key), model=MODEL, kind=kind, message=message)


def commit_run(parts_dir: Path, flush_rows: int, rows: Iterable[Row]) -> int:
    """Commit rows as one run does: a PartWriter of its own run id, a part every `flush_rows` rows.

    The timer is pushed out of reach so that parts hold exactly `flush_rows` rows, whatever the speed
    of this machine. Returns how many parts were written.
    """
    writer = PartWriter(parts_dir, new_run_id(), flush_rows=flush_rows, flush_seconds=1e9)
    try:
        for row in rows:
            writer.add(row)
    finally:
        writer.close()
    return len(writer.written)


def first_run_rows(workload: Workload, rng: random.Random, error_ids: list[int]) -> Iterator[Row]:
    """Every committed key once, about 2% of them as errors (their ids are appended to `error_ids`)."""
    for sample_id in workload.committed_ids():
        if rng.random() < ERROR_FRACTION:
            error_ids.append(sample_id)
            yield make_error_row(rng, key_of(sample_id))
        else:
            yield make_ok_row(rng, key_of(sample_id))


def synthesise(output: Path, workload: Workload) -> Workload:
    """Leave the state folder a run (and, with `retried`, a later --retry-errors run) would leave."""
    state = RunState(output)
    state.create()
    state.write_fingerprint({"model": MODEL, "prompt": "Please describe this image in detail.", "seed": 0})
    rng = random.Random(workload.seed)
    error_ids: list[int] = []
    written = commit_run(state.parts_dir, workload.flush_rows, first_run_rows(workload, rng, error_ids))
    if workload.retried > len(error_ids):
        raise SystemExit(f"--retried {workload.retried} is more than the {len(error_ids)} error rows")
    if workload.retried:
        # A later run id (they sort by start time), so these parts sort after the first run's.
        retried = sorted(rng.sample(error_ids, workload.retried))
        written += commit_run(state.parts_dir, workload.flush_rows, (make_ok_row(rng, key_of(i)) for i in retried))
    return replace(workload, part_files=written, error_rows=len(error_ids))


# -- measuring -------------------------------------------------------------------------------------


def current_rss_kib() -> int:
    """Resident memory now (not the peak), from /proc."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> bool:
    """Make ru_maxrss start again from the current RSS, so it reports this phase's peak only.

    Without this, memory freed before the phase (the sample list's temporaries) would still count.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    """Wall time and peak memory of one timed block, with the time and peak of each step in it."""

    baseline_rss_kib: int
    peak_reset: bool
    seconds: float = 0.0
    peak_rss_kib: int = 0
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    _started: float = 0.0
    _last: float = 0.0

    @property
    def peak_delta_kib(self) -> int:
        return max(0, self.peak_rss_kib - self.baseline_rss_kib)

    def mark(self, step: str) -> None:
        """End a step: its seconds, and the peak RSS over the baseline reached so far."""
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.steps[step] = {
            "seconds": round(now - self._last, 4),
            "peak_delta_mib_so_far": round(max(0, peak - self.baseline_rss_kib) / 1024, 1),
        }
        self._last = now


@contextmanager
def measured() -> Iterator[Measurement]:
    """Time a block with perf_counter; ru_maxrss after it, against the RSS just before it."""
    gc.collect()
    result = Measurement(baseline_rss_kib=current_rss_kib(), peak_reset=reset_peak_rss())
    result._started = result._last = time.perf_counter()
    yield result
    result.seconds = time.perf_counter() - result._started
    result.peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check(condition: bool, message: str) -> None:
    """Correctness checks hold under `python -O` too, so no `assert`."""
    if not condition:
        raise SystemExit(f"check failed: {message}")


# -- phases (each runs in its own interpreter) -----------------------------------------------------


@dataclass
class PhaseResult:
    """One phase's figures, as the child process prints them for the parent."""

    name: str
    what: str
    rows: int
    measurement: Measurement
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "name": self.name,
            "what": self.what,
            "rows": self.rows,
            "seconds": round(m.seconds, 4),
            "rows_per_s": round(self.rows / m.seconds) if m.seconds else None,
            "baseline_rss_mib": round(m.baseline_rss_kib / 1024, 1),
            "peak_rss_mib": round(m.peak_rss_kib / 1024, 1),
            "peak_delta_mib": round(m.peak_delta_kib / 1024, 1),
            "peak_reset": m.peak_reset,
            "steps": m.steps,
            "facts": self.facts,
        }


def phase_scan(workdir: Path, workload: Workload) -> PhaseResult:
    """The resume scan: committed(), then plan_run() over every committed key plus 1% new inputs.

    The sample list is built before the clock starts (a real run lists its inputs first, too) but is
    in the baseline RSS, which is reported, together with the RSS of the bare interpreter.
    """
    interpreter_kib = current_rss_kib()
    samples = [sample_of(i) for i in workload.input_ids()]
    expected_todo = [key_of(i) for i in sorted(workload.new_ids())]
    with measured() as m:
        index = RunState(workdir / OUTPUT_NAME).committed()
        m.mark("committed")
        plan = plan_run(InputSet(listed=samples), index)
        m.mark("plan_run")
    check(index.size == workload.distinct_keys, f"index.size {index.size} != {workload.distinct_keys} distinct keys")
    check([s.key for s in plan.listed.todo] == expected_todo, "plan.listed.todo is not exactly the new keys")
    check(plan.already_done == workload.distinct_keys, f"already_done {plan.already_done}")
    return PhaseResult(
        name="scan",
        what="RunState.committed() + plan_run()",
        rows=workload.rows,
        measurement=m,
        facts={
            "interpreter_rss_mib": round(interpreter_kib / 1024, 1),
            "samples": len(samples),
            "index_size": index.size,
            "todo": len(plan.listed.todo),
            "index_nbytes_mib": round(index.latest.nbytes / 2**20, 1),
        },
    )


def phase_merge(workdir: Path, workload: Workload, output_format: str) -> PhaseResult:
    """The final merge into one output file, on a copy of the state folder: a merge of many parts also
    compacts them into one, which would change the workload of the phases after it. The copy and the
    index the merge needs are made before the clock starts."""
    scratch = workdir / f"merge-{output_format}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    state = RunState(scratch / f"out.{output_format}")
    shutil.copytree(RunState(workdir / OUTPUT_NAME).dir, state.dir)
    index = state.committed()
    with measured() as m:
        merge_output(state, index, output_format, {"bench": True})
    facts: dict[str, Any] = {
        "output_mib": round(state.output.stat().st_size / 2**20, 1),
        "parts_after": len(state.part_paths()),
    }
    if output_format == "parquet":
        facts.update(check_parquet_output(state.output, workload))
    else:
        with open(state.output, "rb") as handle:
            lines = sum(1 for _ in handle)
        check(lines == workload.distinct_keys, f"{lines} JSONL lines != {workload.distinct_keys} keys")
    shutil.rmtree(scratch)
    return PhaseResult(
        name=f"merge-{output_format}",
        what=f'merge_output(..., "{output_format}", ...)',
        rows=workload.rows,
        measurement=m,
        facts=facts,
    )


def check_parquet_output(path: Path, workload: Workload) -> dict[str, Any]:
    """One row per key, and the newest row of a retried key (ok) won over its error row."""
    metadata = pq.ParquetFile(path).metadata
    table = pq.read_table(path, columns=["key", "status"])
    distinct = pc.count_distinct(table["key"]).as_py()
    check(table.num_rows == workload.distinct_keys, f"{table.num_rows} rows != {workload.distinct_keys} keys")
    check(distinct == table.num_rows, f"{table.num_rows - distinct} duplicate keys in the output")
    errors = pc.sum(pc.equal(table["status"], "error")).as_py() or 0
    expected_errors = workload.error_rows - workload.retried
    check(errors == expected_errors, f"{errors} error rows in the output, expected {expected_errors}")
    return {"row_groups": metadata.num_row_groups, "footer_kib": round(metadata.serialized_size / 1024, 1)}


def phase_read_floor(workdir: Path, workload: Workload, columns: list[str] | None) -> PhaseResult:
    """Reference: only read the parts (listing included), one ParquetFile at a time, nothing else.

    What the scan or merge costs beyond this is the product's own work, not I/O or decoding.
    """
    state = RunState(workdir / OUTPUT_NAME)
    tables: list[pa.Table] = []
    with measured() as m:
        for path in state.part_paths():
            table = pq.ParquetFile(path).read(columns=columns)
            if columns is not None:
                tables.append(table)  # the scan keeps its columns; the merge drops each part
    name = "read-index-columns" if columns else "read-all-columns"
    what = "ParquetFile.read(key, status, error) of every part" if columns else "ParquetFile.read() of every part"
    return PhaseResult(name=name, what=what, rows=workload.rows, measurement=m, facts={"tables": len(tables)})


PHASES: dict[str, Callable[[Path, Workload], PhaseResult]] = {
    "read-index-columns": lambda workdir, w: phase_read_floor(workdir, w, INDEX_COLUMNS),
    "scan": phase_scan,
    "read-all-columns": lambda workdir, w: phase_read_floor(workdir, w, None),
    "merge-parquet": lambda workdir, w: phase_merge(workdir, w, "parquet"),
    "merge-jsonl": lambda workdir, w: phase_merge(workdir, w, "jsonl"),
}


def run_phase_in_child(name: str, workdir: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter, so that its peak RSS is its own; it prints one JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--workdir", str(workdir)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (the machine may be shared), with every run's time and peak kept."""
    chosen = sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]
    return {
        **chosen,
        "runs_seconds": [run["seconds"] for run in runs],
        "runs_peak_delta_mib": [run["peak_delta_mib"] for run in runs],
    }


# -- reporting -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Enough about the machine to compare figures across runs."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "cpus": os.cpu_count(),
    }
    with open("/proc/meminfo", encoding="ascii") as handle:
        info["mem_gib"] = round(int(handle.readline().split()[1]) / 2**20, 1)
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    return info


def folder_mib(path: Path) -> float:
    """Bytes on disk of the parts, to show how much data each phase reads."""
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def print_table(workload: Workload, synthesis_s: float, parts_mib: float, phases: list[dict[str, Any]]) -> None:
    print(
        f"\n{workload.rows:,} committed rows ({workload.distinct_keys:,} keys, {workload.error_rows:,} errors, "
        f"{workload.retried:,} retried) in {workload.part_files:,} parts, {parts_mib:,} MiB; "
        f"synthesis {synthesis_s:.1f} s (not counted)"
    )
    header = f"{'phase':<20} {'seconds':>9} {'rows/s':>11} {'peak-base MiB':>14} {'base MiB':>9}  {'runs (s)'}"
    print(header)
    print("-" * len(header))
    for phase in phases:
        print(
            f"{phase['name']:<20} {phase['seconds']:>9.2f} {phase['rows_per_s']:>11,} "
            f"{phase['peak_delta_mib']:>14,.1f} {phase['baseline_rss_mib']:>9,.1f}  "
            + " ".join(f"{seconds:.2f}" for seconds in phase["runs_seconds"])
        )
        for step, figures in phase["steps"].items():
            print(f"  {step:<18} {figures['seconds']:>9.2f} {'':>11} {figures['peak_delta_mib_so_far']:>14,.1f}")
    print()


# -- entry point -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The same parser serves the parent and the per-phase children (hidden --phase)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="committed rows (default 1,000,000)")
    parser.add_argument("--parts", type=int, default=1000, help="parts the rows are committed in (default 1,000)")
    parser.add_argument("--retried", type=int, default=0, help="error keys committed again as ok by a later run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    parser.add_argument("--workdir", type=Path, help="where the state folder goes (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the default temp dir at the end")
    parser.add_argument("--reuse", action="store_true", help="reuse --workdir's parts if the workload is the same")
    parser.add_argument("--repeat", type=int, default=1, help="run each phase N times, report the median (default 1)")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.rows < 1 or args.parts < 1 or args.parts > args.rows:
        parser.error("need 1 <= --parts <= --rows")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.phase and not args.workdir:
        parser.error("--phase needs --workdir")
    return args


def load_manifest(workdir: Path) -> Workload | None:
    """The workload a state folder was made for, so children check against the same numbers."""
    path = workdir / MANIFEST
    return Workload(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def prepare(workdir: Path, wanted: Workload, reuse: bool) -> tuple[Workload, float | None]:
    """The workload on disk: reused as is with --reuse if it matches, otherwise synthesised now."""
    stored = load_manifest(workdir)
    if reuse and stored is not None and replace(stored, part_files=0, error_rows=0) == wanted:
        print(f"reusing the state folder in {workdir}")
        return stored, None
    shutil.rmtree(workdir / (OUTPUT_NAME + ".caprl"), ignore_errors=True)
    print(f"synthesising {wanted.rows:,} rows in about {wanted.parts:,} parts under {workdir} ...", flush=True)
    started = time.perf_counter()
    workload = synthesise(workdir / OUTPUT_NAME, wanted)
    synthesis_s = time.perf_counter() - started
    (workdir / MANIFEST).write_text(json.dumps(asdict(workload), indent=2) + "\n", encoding="utf-8")
    return workload, synthesis_s


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Synthesise (or reuse), run every phase in its own child, print the table; return the result."""
    workdir: Path = args.workdir
    wanted = Workload(rows=args.rows, parts=args.parts, retried=args.retried, seed=args.seed)
    workload, synthesis_s = prepare(workdir, wanted, args.reuse)
    parts_mib = folder_mib(RunState(workdir / OUTPUT_NAME).parts_dir)
    phases = []
    for name in PHASES:
        print(f"  {name} ...", flush=True)
        phases.append(median_run([run_phase_in_child(name, workdir) for _ in range(args.repeat)]))
    print_table(workload, synthesis_s or 0.0, parts_mib, phases)
    return {
        "machine": machine(),
        "workload": {**asdict(workload), "distinct_keys": workload.distinct_keys, "new_keys": workload.new_keys},
        "parts_mib": parts_mib,
        "synthesis_s": None if synthesis_s is None else round(synthesis_s, 2),
        "phases": phases,
    }


def main(argv: list[str] | None = None) -> None:
    """As a child (--phase), run one phase and print its JSON; otherwise run the whole benchmark."""
    args = parse_args(argv)
    if args.phase:
        workload = load_manifest(args.workdir)
        if workload is None:
            raise SystemExit(f"no {MANIFEST} in {args.workdir}")
        print(json.dumps(PHASES[args.phase](args.workdir, workload).to_json()))
        return
    temporary = args.workdir is None
    if temporary:
        args.workdir = Path(tempfile.mkdtemp(prefix="caprl-bench-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        elif temporary:
            print(f"kept {args.workdir}")


if __name__ == "__main__":
    main()
