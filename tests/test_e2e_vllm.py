"""The real CLI with the real vLLM engine (CPU build) on the edge-case corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from contract import assert_rows_match_corpus, read_rows

from caprl_cli.prepare.grid import Grid

pytestmark = pytest.mark.vllm
MAX_TOKENS = 24
ENGINE_ARGS = ("--engine", "vllm", "--dtype", "float32", "--max-tokens", str(MAX_TOKENS), "--no-progress")
# vLLM's own log format: `(EngineCore pid=12) INFO 11-30 02:37:24 [model.py:733] ...`, the process part optional.
VLLM_LOG_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[\w./-]+:\d+\]")


@pytest.fixture(scope="module")
def parquet_run(run_caprl, corpus, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root, _ = corpus
    output = tmp_path_factory.mktemp("vllm") / "captions.parquet"
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, "--workers", "2", *ENGINE_ARGS)
    return result, output


def test_every_image_gets_exactly_one_row(parquet_run, corpus, tiny_model: Path) -> None:
    result, output = parquet_run
    assert result.returncode == 0, result.stderr
    root, expected = corpus
    assert_rows_match_corpus(
        read_rows(output), root, expected, model=str(tiny_model), max_tokens=MAX_TOKENS, grid=Grid(28)
    )


def test_default_output_is_caprls_own(parquet_run) -> None:
    """At the default level every line on stderr is caprl's (no vLLM, torch or Triton start-up
    warnings, no torch C++ NUMA warning) and nothing goes to stdout."""
    result, _ = parquet_run
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("caprl: ") for line in lines), lines
    assert result.stdout == ""


def test_provenance_in_parquet_and_summary(parquet_run, corpus, tiny_model: Path) -> None:
    _, output = parquet_run
    _, expected = corpus
    provenance = json.loads(pq.read_metadata(output).metadata[b"caprl"])
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    assert provenance["counts"] == summary["counts"]
    counts = summary["counts"]
    assert counts["images"] == len(expected)
    assert counts["error"] == sum(kind is not None for kind in expected.values())
    assert sum(counts["errors_by_kind"].values()) == counts["error"]
    assert summary["engine"] == "vllm" and summary["engine_version"].startswith("vllm ")
    assert summary["sampling"]["max_tokens"] == MAX_TOKENS
    assert summary["pixels"]["grid_factor"] == 28
    assert summary["prompt_text"].startswith("<|im_start|>user\n")
    assert summary["run"]["started_at"] <= summary["run"]["finished_at"]
    assert summary["run"]["images"] == len(expected)


def test_no_temporary_files_left(parquet_run) -> None:
    _, output = parquet_run
    assert sorted(p.name for p in output.parent.iterdir()) == [
        output.name, f"{output.name}.caprl", f"{output.name}.summary.json"
    ]
    state = output.parent / f"{output.name}.caprl"
    assert not [p for p in state.rglob("*") if p.name.endswith(".tmp")]


def test_captions_do_not_depend_on_batching(parquet_run, run_caprl, corpus, tiny_model: Path, tmp_path: Path) -> None:
    """Same seed, same key -> same caption, whether batched with 30 others or captioned alone."""
    _, batched_output = parquet_run
    root, _ = corpus
    alone_output = tmp_path / "alone.jsonl"
    result = run_caprl(
        "caption", root, "-o", alone_output, "--model", tiny_model, "--batch-size", "1", "--limit", "8",
        "--workers", "0", *ENGINE_ARGS,
    )
    assert result.returncode == 0, result.stderr
    batched = {row["key"]: row for row in read_rows(batched_output)}
    alone = read_rows(alone_output)
    assert len(alone) == 8
    for row in alone:
        assert row["caption"] == batched[row["key"]]["caption"], row["key"]
        assert row["output_tokens"] == batched[row["key"]]["output_tokens"]


def test_engine_refusal_becomes_error_rows(run_caprl, corpus, tiny_model: Path, tmp_path: Path) -> None:
    """A request the engine refuses (prompt longer than the context) costs one row, not the run. Run
    with -vv, which shows vLLM's own log lines (`(<process> pid=N) LEVEL mm-dd hh:mm:ss [file.py:N]`)."""
    root, expected = corpus
    output = tmp_path / "short-context.jsonl"
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, "--max-model-len", "300", *ENGINE_ARGS,
                       "-vv")
    assert result.returncode == 0, result.stderr
    engine_lines = [line for line in (result.stdout + result.stderr).splitlines() if VLLM_LOG_LINE.match(line)]
    assert {VLLM_LOG_LINE.match(line).group(1) for line in engine_lines} >= {"INFO", "WARNING"}
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == sorted(expected)
    engine_errors = [row for row in rows if (row["error"] or "").startswith("engine: ")]
    assert engine_errors, "the 1024x768 photo needs over 1000 tokens and must be refused"
    assert "photo_1024x768.webp" in {row["key"] for row in engine_errors}
    assert any(row["status"] == "ok" for row in rows)


def test_resume_with_vllm(run_caprl, corpus, tiny_model: Path, tmp_path: Path) -> None:
    """A run cut short by --limit is continued by the same command: every key once, none redone."""
    root, expected = corpus
    output = tmp_path / "resumed.parquet"
    first = run_caprl("caption", root, "-o", output, "--model", tiny_model, "--limit", "10", "--flush-every", "3",
                      *ENGINE_ARGS)
    assert first.returncode == 0, first.stderr
    assert len(read_rows(output)) == 10
    rest = run_caprl("caption", root, "-o", output, "--model", tiny_model, "--flush-every", "3", *ENGINE_ARGS)
    assert rest.returncode == 0, rest.stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == sorted(expected)
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    assert summary["run"]["images"] == len(expected) - 10
    assert summary["counts"]["images"] == len(expected)
