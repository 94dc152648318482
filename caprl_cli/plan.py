"""Decide what a run captions: the inputs minus what the committed parts already hold.

Never opens an image; membership is one vectorised Arrow lookup, so planning a million inputs against
a million committed keys takes a second, not a model load.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from caprl_cli.inputs import Sample
from caprl_cli.run_state import CommittedIndex


@dataclass(frozen=True)
class Plan:
    """The samples to caption now, and how many inputs were skipped or are being retried."""

    todo: list[Sample]
    inputs: int
    already_done: int
    retrying: int
    remaining_after: int  # inputs still not done once `todo` is captioned (because of --limit)


def plan_run(samples: list[Sample], index: CommittedIndex, retry_errors: bool, limit: int | None) -> Plan:
    """`samples` not yet committed (or committed as errors, with `retry_errors`), first `limit` of them."""
    keys = pa.array([sample.key for sample in samples], pa.string())
    committed = pc.is_in(keys, value_set=index.keys()).to_numpy(zero_copy_only=False)
    if retry_errors:
        done = pc.is_in(keys, value_set=index.keys(ok_only=True)).to_numpy(zero_copy_only=False)
    else:
        done = committed
    pending = [sample for sample, is_done in zip(samples, done, strict=True) if not is_done]
    todo = pending if limit is None else pending[:limit]
    return Plan(
        todo=todo,
        inputs=len(samples),
        already_done=int(done.sum()),
        retrying=int((committed & ~done).sum()),
        remaining_after=len(pending) - len(todo),
    )
