"""SIGINT and SIGTERM stop a run with 130/143 and leave no output and no temporary file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly(corpus, tiny_model: Path, tmp_path: Path, signum: int, code: int) -> None:
    root, _ = corpus
    output = tmp_path / "out.parquet"
    process = subprocess.Popen(
        [sys.executable, "-m", "caprl_cli", "caption", root, "-o", output, "--model", tiny_model,
         "--engine", "transformers", "--max-tokens", "2048", "--batch-size", "1", "--temperature", "0",
         "--no-progress"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy(),
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    for line in process.stderr:
        if "captioning" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    process.send_signal(signum)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == code, rest
    assert "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == []
