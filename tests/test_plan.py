"""Planning a run: what is skipped, what is retried, what --limit leaves for later, in input order."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs import Sample
from caprl_cli.plan import plan_run
from caprl_cli.rows import caption_row, error_row
from caprl_cli.run_state import RunState
from caprl_cli.writers import rows_to_table


def _sample(key: str) -> Sample:
    return Sample(key=key, source=f"/data/{key}", path=f"/data/{key}")


def _ok(key: str) -> dict:
    return caption_row(key=key, source=f"/data/{key}", model="tiny", caption="c", finish_reason="stop",
                       prompt_tokens=1, output_tokens=1, width=8, height=8)


def _err(key: str) -> dict:
    return error_row(key=key, source=f"/data/{key}", model="tiny", kind=ErrorKind.DECODE, message="bad")


@pytest.fixture
def state(tmp_path: Path) -> RunState:
    state = RunState(tmp_path / "out.parquet")
    state.create()
    return state


def _commit(state: RunState, name: str, rows: list[dict]) -> None:
    pq.write_table(rows_to_table(rows), state.parts_dir / f"part-{name}-000000.parquet")


def _keys(samples: list[Sample]) -> list[str]:
    return [s.key for s in samples]


SAMPLES = [_sample(k) for k in ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]]


def test_empty_index_plans_everything(state: RunState) -> None:
    """With nothing committed every input is to do, in the order given."""
    plan = plan_run(SAMPLES, state.committed(), retry_errors=False, limit=None)
    assert plan.todo == SAMPLES
    assert (plan.inputs, plan.already_done, plan.retrying, plan.remaining_after) == (6, 0, 0, 0)


def test_no_inputs(state: RunState) -> None:
    """No samples: nothing to do, all counts zero, with or without committed parts."""
    _commit(state, "1", [_ok("a.png")])
    plan = plan_run([], state.committed(), retry_errors=True, limit=3)
    assert plan.todo == []
    assert (plan.inputs, plan.already_done, plan.retrying, plan.remaining_after) == (0, 0, 0, 0)


def test_skips_committed_keys_ok_and_error(state: RunState) -> None:
    """Without --retry-errors every committed key, ok or error, is skipped and counted as done."""
    _commit(state, "1", [_ok("b.png"), _err("d.png")])
    _commit(state, "2", [_ok("f.png")])
    plan = plan_run(SAMPLES, state.committed(), retry_errors=False, limit=None)
    assert _keys(plan.todo) == ["a.png", "c.png", "e.png"]
    assert (plan.inputs, plan.already_done, plan.retrying, plan.remaining_after) == (6, 3, 0, 0)


def test_committed_keys_not_among_inputs_are_ignored(state: RunState) -> None:
    """Keys committed earlier but no longer in the inputs do not count as done."""
    _commit(state, "1", [_ok("gone.png"), _ok("a.png"), _err("also-gone.png")])
    plan = plan_run(SAMPLES, state.committed(), retry_errors=True, limit=None)
    assert _keys(plan.todo) == ["b.png", "c.png", "d.png", "e.png", "f.png"]
    assert (plan.already_done, plan.retrying) == (1, 0)


def test_retry_errors_replans_error_keys(state: RunState) -> None:
    """With --retry-errors keys whose latest row is an error are to do again and counted as retrying."""
    _commit(state, "1", [_ok("a.png"), _err("b.png"), _err("c.png")])
    _commit(state, "2", [_ok("c.png"), _err("e.png")])  # c was retried ok already
    plan = plan_run(SAMPLES, state.committed(), retry_errors=True, limit=None)
    assert _keys(plan.todo) == ["b.png", "d.png", "e.png", "f.png"]
    assert (plan.inputs, plan.already_done, plan.retrying, plan.remaining_after) == (6, 2, 2, 0)


def test_key_ok_then_error_counts_as_error(state: RunState) -> None:
    """A key whose newest row is an error is retried even if an older part has it ok."""
    _commit(state, "1", [_ok("a.png")])
    _commit(state, "2", [_err("a.png")])
    index = state.committed()
    assert _keys(plan_run(SAMPLES[:1], index, retry_errors=True, limit=None).todo) == ["a.png"]
    assert plan_run(SAMPLES[:1], index, retry_errors=False, limit=None).todo == []


def test_limit_cuts_todo_and_counts_the_rest(state: RunState) -> None:
    """--limit takes the first N pending samples; remaining_after counts the pending ones left."""
    _commit(state, "1", [_ok("a.png"), _err("c.png")])
    plan = plan_run(SAMPLES, state.committed(), retry_errors=True, limit=2)
    assert _keys(plan.todo) == ["b.png", "c.png"]
    assert (plan.inputs, plan.already_done, plan.retrying, plan.remaining_after) == (6, 1, 1, 3)


@pytest.mark.parametrize(("limit", "todo", "rest"), [(0, 0, 4), (1, 1, 3), (4, 4, 0), (10, 4, 0)])
def test_limit_bounds(state: RunState, limit: int, todo: int, rest: int) -> None:
    """--limit 0 plans nothing; a limit at or above the pending count plans all of it."""
    _commit(state, "1", [_ok("a.png"), _ok("b.png")])
    plan = plan_run(SAMPLES, state.committed(), retry_errors=False, limit=limit)
    assert len(plan.todo) == todo
    assert plan.remaining_after == rest
    assert len(plan.todo) + plan.remaining_after + plan.already_done == plan.inputs


def test_todo_follows_sample_order(state: RunState) -> None:
    """`todo` keeps the samples' order (not key order, not committed order)."""
    samples = [_sample(k) for k in ["z.png", "m.png", "a.png", "q/b.png", "c.png"]]
    _commit(state, "1", [_ok("c.png"), _ok("m.png")])
    plan = plan_run(samples, state.committed(), retry_errors=False, limit=None)
    assert _keys(plan.todo) == ["z.png", "a.png", "q/b.png"]
    assert all(isinstance(s, Sample) for s in plan.todo)
    assert plan.todo[0] is samples[0]


def test_planning_many_inputs_is_vectorised(state: RunState) -> None:
    """100k inputs against 50k committed keys plan correctly (and quickly)."""
    samples = [_sample(f"img_{i:06d}.png") for i in range(100_000)]
    _commit(state, "1", [_ok(f"img_{i:06d}.png") for i in range(0, 100_000, 2)])
    plan = plan_run(samples, state.committed(), retry_errors=False, limit=None)
    assert plan.already_done == 50_000
    assert len(plan.todo) == 50_000
    assert plan.todo[0].key == "img_000001.png"
