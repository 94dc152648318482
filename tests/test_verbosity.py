"""`-q`: a successful run with the real vLLM engine prints nothing at all, on either stream: no
summary, no progress, and none of the start-up warnings vLLM, torch and Triton print by default (torch's
C++ NUMA binding warning among them). The default level and `-vv` are checked on the runs in
test_e2e_vllm.py (every stderr line is caprl's; -vv shows vLLM's own log lines)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.vllm


def test_quiet_run_prints_nothing(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        buffer = io.BytesIO()
        Image.new("RGB", (56 + 28 * index, 56), (40 * index, 90, 160)).save(buffer, "JPEG")
        (images / f"{index}.jpg").write_bytes(buffer.getvalue())
    (images / "broken.jpg").write_bytes(b"not an image")  # an error row is no reason to speak either
    output = tmp_path / "out.parquet"
    result = run_caprl("caption", images, "-o", output, "--model", tiny_model, "--engine", "vllm", "--dtype",
                       "float32", "--max-tokens", "8", "-q")
    assert result.returncode == 0
    assert (result.stdout, result.stderr) == ("", "")
    assert sorted(pq.read_table(output)["status"].to_pylist()) == ["error", "ok", "ok"]
