"""Benchmark the end of a run that added one part to a large output: Parquet dataset folder vs one file.

A single Parquet file is rebuilt from every committed row at the end of each run (`merge_output`); a
Parquet dataset folder (`-o folder/ --format parquet`) only writes the new rows into new files and
rewrites the files that held replaced rows (`DatasetTarget.publish`). This builds a state the way
`resume_scan.py` does (its synthesis is reused), publishes it once, commits one new part (`--new` rows,
with `--replaced` of them error keys captioned again), then times each output's end of run:

    .venv/bin/python bench/dataset_growth.py --rows 100000
    .venv/bin/python bench/dataset_growth.py --rows 1000000 --json growth.json

`committed()` (the key index both read before publishing) is reported on its own: it is the resume
scan's cost, paid by every format alike. Warm-cache figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resume_scan import (  # noqa: E402
    OUTPUT_NAME,
    Workload,
    commit_run,
    key_of,
    make_ok_row,
    synthesise,
)

from caprl_cli.outputs import open_target  # noqa: E402
from caprl_cli.outputs.base import OutputOptions  # noqa: E402
from caprl_cli.outputs.rows import STATUS_ERROR  # noqa: E402
from caprl_cli.outputs.table import merge_output  # noqa: E402
from caprl_cli.state.folder import RunState  # noqa: E402


def add_one_part(state: RunState, workload: Workload, new: int, replaced: int, seed: int) -> None:
    """One run's rows: `new` keys never seen, and `replaced` committed error keys captioned again."""
    rng = random.Random(seed + 7)
    index = state.committed()
    errors = index.latest.filter(index.latest["status"].to_numpy(zero_copy_only=False) == STATUS_ERROR)
    again = rng.sample(errors["key"].to_pylist(), min(replaced, errors.num_rows))
    first_new = workload.distinct_keys + workload.new_keys + 1
    rows = [make_ok_row(rng, key_of(first_new + i)) for i in range(new)] + [make_ok_row(rng, key) for key in again]
    commit_run(state.parts_dir, len(rows) or 1, rows)


def timed(step) -> tuple[float, object]:
    started = time.perf_counter()
    value = step()
    return time.perf_counter() - started, value


def run(rows: int, parts: int, new: int, replaced: int, rows_per_file: int, workdir: Path) -> dict:
    workload = Workload(rows=rows, parts=parts)
    started = time.perf_counter()
    workload = synthesise(workdir / OUTPUT_NAME, workload)
    synthesis_s = time.perf_counter() - started
    source = RunState(workdir / OUTPUT_NAME)

    # The single file: merged once (the previous run's end), then one part more.
    single = RunState(workdir / "single" / "out.parquet")
    shutil.copytree(source.dir, single.dir)
    merge_output(single, single.committed(), "parquet", {"bench": True})
    add_one_part(single, workload, new, replaced, workload.seed)

    # The dataset folder: published once, then the same part more.
    folder = workdir / "dataset"
    target = open_target(f"{folder}/", [], OutputOptions("parquet", rows_per_file=rows_per_file))
    dataset = RunState(None, state_dir=target.state_dir)
    shutil.copytree(source.dir, dataset.dir)
    target.publish(dataset, dataset.committed(), {"bench": True})
    files_before = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.parquet")}
    add_one_part(dataset, workload, new, replaced, workload.seed)

    index_s, index = timed(single.committed)
    merge_s, _ = timed(lambda: merge_output(single, index, "parquet", {"bench": True}))
    dataset_index_s, dataset_index = timed(dataset.committed)
    publish_s, _ = timed(lambda: target.publish(dataset, dataset_index, {"bench": True}))
    files_after = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.parquet")}
    rewritten = sorted(name for name in files_before if files_after.get(name) != files_before[name])
    return {
        "committed_rows": workload.distinct_keys,
        "new_rows": new,
        "replaced_rows": replaced,
        "rows_per_file": rows_per_file,
        "synthesis_s": round(synthesis_s, 1),
        "committed_index_s": round(index_s, 3),
        "single_file_merge_s": round(merge_s, 3),
        "dataset_committed_index_s": round(dataset_index_s, 3),
        "dataset_publish_s": round(publish_s, 3),
        "dataset_files_before": len(files_before),
        "dataset_files_added": len(set(files_after) - set(files_before)),
        "dataset_files_rewritten": len(rewritten),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="committed rows (default 1,000,000)")
    parser.add_argument("--parts", type=int, default=100, help="parts they are committed in (default 100)")
    parser.add_argument("--new", type=int, default=10_000, help="rows of the added part (default 10,000)")
    parser.add_argument("--replaced", type=int, default=10, help="committed error keys captioned again (default 10)")
    parser.add_argument("--rows-per-file", type=int, default=250_000, help="dataset rows per file (default 250,000)")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="caprl-growth-") as scratch:
        result = run(args.rows, args.parts, args.new, args.replaced, args.rows_per_file, Path(scratch))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
