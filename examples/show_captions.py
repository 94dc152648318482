#!/usr/bin/env python3
"""Print a caprl output (Parquet or JSONL) as a short table: key, status, tokens, caption start."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pq.read_table(path).to_pylist()


def main() -> None:
    path = Path(sys.argv[1])
    for row in sorted(rows_of(path), key=lambda r: r["key"]):
        text = row["caption"] if row["status"] == "ok" else row["error"]
        shown = repr(text)[1:61]
        print(f"{row['key']:<28} {row['status']:<6} {row['output_tokens'] or 0:>5} tok  {shown}")


if __name__ == "__main__":
    main()
