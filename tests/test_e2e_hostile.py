"""A hostile folder, end to end through the real CLI into every output format: a FIFO, a socket,
symlink loops, a dangling link, an unreadable folder and file, a non-UTF-8 name, a 250-byte name and a
file list naming a FIFO. Exit 0, one row per image plus the documented error rows, the documented skips,
no hang, and a rerun has nothing to do. The transformers engine and the tiny model run it.

Root reads everything whatever its mode, so caprl runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from contract import read_rows
from hostile import LONG_NAME, NON_UTF8_NAME, TOO_LONG_FOR_TXT, Hostile, build_hostile, drop_dac_capabilities, remove_hostile

FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "4", "--no-progress", "--workers", "1")
HANG_GUARD_S = 300  # only so a hang fails the test instead of stalling the suite
FORMATS = ("parquet", "jsonl", "webdataset", "sidecar")
SKIP_COUNTS = ("1 FIFO", "1 socket", "1 dangling link", "3 symlink loops", "1 link to a folder already walked")


def run_without_dac(prefix: list[str], *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "caprl_cli", *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        env=dict(os.environ),
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )


def output_args(fmt: str, base: Path) -> tuple[str, ...]:
    if fmt == "sidecar":
        return ("--format", "sidecar")
    return ("-o", str(base / ("out." + fmt if fmt != "webdataset" else "shards")), "--format", fmt)


def rows_of(fmt: str, base: Path, hostile: Hostile) -> list[dict[str, Any]]:
    if fmt in ("parquet", "jsonl"):
        return read_rows(base / f"out.{fmt}")
    if fmt == "webdataset":
        rows = []
        for shard in sorted((base / "shards").glob("*.tar")):
            with tarfile.open(shard) as tar:
                rows += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        return rows
    # Sidecar output keeps its rows in the state's parts only (a .txt per captioned image besides).
    parts = sorted((hostile.root / ".caprl" / "parts").glob("*.parquet"))
    return [row for part in parts for row in pq.read_table(part, columns=["key", "source", "status", "error"]).to_pylist()]


@pytest.fixture(scope="module", params=FORMATS)
def hostile_runs(request, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    prefix = drop_dac_capabilities()
    if prefix is None:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: unreadable entries can't be made")
    fmt = request.param
    base = tmp_path_factory.mktemp(f"hostile-{fmt}")
    hostile = build_hostile(base)
    args = ("caption", "--model", tiny_model, hostile.root, "--files-from", hostile.file_list, *output_args(fmt, base), *FAST)
    first = run_without_dac(prefix, *args)
    again = run_without_dac(prefix, *args)
    yield fmt, base, hostile, first, again
    remove_hostile(hostile)


def test_every_image_is_one_row_and_every_unreadable_entry_one_read_row(hostile_runs) -> None:
    fmt, base, hostile, first, _ = hostile_runs
    assert first.returncode == 0, first.stderr
    rows = rows_of(fmt, base, hostile)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys))
    expected = {**hostile.expected, **hostile.list_expected}
    assert set(keys) == set(expected)
    for row in rows:
        kind = expected[row["key"]]
        assert (row["status"], (row["error"] or "").split(":", 1)[0] or None) == ("ok" if kind is None else "error", kind)
    by_key = {row["key"]: row for row in rows}
    assert "not a regular file (FIFO)" in by_key[str(base / "listed" / "pipe.jpg")]["error"]
    assert by_key["locked/"]["source"] == str(hostile.root.resolve() / "locked") + "/"
    assert by_key["caf%E9.jpg"]["source"] == str(hostile.root.resolve() / "caf%E9.jpg")


def test_skipped_entries_are_counted_in_one_warning(hostile_runs) -> None:
    _, _, _, first, _ = hostile_runs
    lines = [line for line in first.stderr.splitlines() if "skipped under" in line]
    assert len(lines) == 1
    assert all(count in lines[0] for count in SKIP_COUNTS), lines[0]
    assert any("cannot be listed" in line for line in first.stderr.splitlines())


def test_a_rerun_has_nothing_to_do(hostile_runs) -> None:
    _, _, _, _, again = hostile_runs
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr


@pytest.mark.parametrize("hostile_runs", ["sidecar"], indirect=True)
def test_sidecars_beside_odd_names(hostile_runs) -> None:
    _, base, hostile, first, _ = hostile_runs
    root = os.fsencode(hostile.root)
    names = set(os.listdir(root))
    assert {b"a.txt", NON_UTF8_NAME.replace(b".jpg", b".txt"), os.fsencode(LONG_NAME[:-4] + ".txt")} <= names
    assert (hostile.root / "sub" / "b.txt").is_file() and (base / "listed" / "one.txt").is_file()
    assert not any(name.endswith(b".txt") and name.startswith(b"m") for name in names)
    assert not any(name.endswith(b".tmp") for name in names)  # no temporary left behind
    assert not (base / "listed" / "pipe.txt").exists() and not (hostile.root / "secret.txt").exists()
    assert f"wrote no .txt for {len(TOO_LONG_FOR_TXT)} images whose name is too long" in first.stderr
