"""The tiny random Qwen2.5-VL that the benchmarks run on without `--model`.

It is the model of `examples/make_tiny_model.py` (the one the tests and `make demo` use), loaded from
that file so every benchmark measures the same model; its figures measure pipeline overhead on this
machine, not CapRL-3B on a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_tiny_model(folder: Path) -> Path:
    """Build the model in `folder/tiny-model` and return its path (its processor gives the grid)."""
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "examples" / "make_tiny_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(folder / "tiny-model")
