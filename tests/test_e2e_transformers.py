"""The real CLI with the real transformers engine on the edge-case corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from contract import assert_rows_match_corpus, read_rows

from caprl_cli.prepare.grid import Grid

MAX_TOKENS = 16
ENGINE_ARGS = ("--engine", "transformers", "--max-tokens", str(MAX_TOKENS), "--no-progress")


@pytest.fixture(scope="module")
def jsonl_run(run_caprl, corpus, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root, _ = corpus
    output = tmp_path_factory.mktemp("hf") / "captions.jsonl"
    result = run_caprl("caption", root, "-o", output, "--model", tiny_model, "--batch-size", "4", *ENGINE_ARGS)
    return result, output


def test_every_image_gets_exactly_one_row(jsonl_run, corpus, tiny_model: Path) -> None:
    result, output = jsonl_run
    assert result.returncode == 0, result.stderr
    root, expected = corpus
    assert_rows_match_corpus(
        read_rows(output), root, expected, model=str(tiny_model), max_tokens=MAX_TOKENS, grid=Grid(28)
    )
    assert Path(f"{output}.summary.json").is_file()


def test_run_reports_counts_by_kind(jsonl_run, corpus) -> None:
    result, _ = jsonl_run
    _, expected = corpus
    ok = sum(kind is None for kind in expected.values())
    assert f"captioned {ok} of {len(expected)} images" in result.stderr
    for kind in {kind for kind in expected.values() if kind}:
        assert kind in result.stderr


def test_captions_do_not_depend_on_batching(jsonl_run, run_caprl, corpus, tiny_model: Path, tmp_path: Path) -> None:
    _, batched_output = jsonl_run
    root, _ = corpus
    alone_output = tmp_path / "alone.parquet"
    result = run_caprl("caption", root, "-o", alone_output, "--model", tiny_model, "--batch-size", "1",
                       "--limit", "6", *ENGINE_ARGS)
    assert result.returncode == 0, result.stderr
    batched = {row["key"]: row["caption"] for row in read_rows(batched_output)}
    alone = read_rows(alone_output)
    assert len(alone) == 6
    assert all(row["caption"] == batched[row["key"]] for row in alone)


def test_seed_and_greedy(run_caprl, corpus, tiny_model: Path, tmp_path: Path) -> None:
    """Another seed samples other captions; temperature 0 is greedy and ignores the seed."""
    root, _ = corpus
    captions = {}
    for name, extra in {
        "seed1": ("--seed", "1"),
        "seed2": ("--seed", "2"),
        "greedy1": ("--seed", "1", "--temperature", "0"),
        "greedy2": ("--seed", "2", "--temperature", "0"),
    }.items():
        output = tmp_path / f"{name}.jsonl"
        result = run_caprl("caption", root, "-o", output, "--model", tiny_model, "--limit", "4", *extra, *ENGINE_ARGS)
        assert result.returncode == 0, result.stderr
        captions[name] = {row["key"]: row["caption"] for row in read_rows(output)}
    assert captions["seed1"] != captions["seed2"]
    assert captions["greedy1"] == captions["greedy2"]
