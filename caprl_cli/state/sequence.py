"""Part names carry a sequence number: which row of a key is the latest never depends on a clock.

A part is named `part-<12-digit sequence>-<run id>-<label>.parquet`. The sequence is allocated under
the run's lock as one more than the highest sequence present, so a part committed later always sorts
after every part committed before it, whatever the wall clock said (a clock stepped back, a machine
with a wrong clock, two machines writing the same state in turn). The latest row of a key is the one
in the part with the highest sequence; within a part, the last one.

Two kinds of names sort before every sequenced part: sequence 0, taken only by the part `caprl repair`
rebuilds from the published output (everything in the state is newer than the output it restores), and
then the names older versions gave parts (`part-<timestamp>-<pid>-<n>.parquet`), among themselves by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
SEQUENCE_DIGITS = 12
# Sequence 0: the part rebuilt from the published output, older than everything else in the state.
REBUILT_SEQUENCE = 0

_SEQUENCED = re.compile(re.escape(PART_PREFIX) + r"(\d{%d})-" % SEQUENCE_DIGITS)


def is_part_name(name: str) -> bool:
    """Whether `name` is a committed part (not a temporary, not a file set aside)."""
    return name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


def sequence_of(name: str) -> int | None:
    """The sequence number in a part's name; None for a name an older version gave it."""
    found = _SEQUENCED.match(name)
    return int(found.group(1)) if found else None


def part_order(path: Path | str) -> tuple[int, int, str]:
    """Sort key of a part: the rebuilt part, then parts named by older versions, then by sequence."""
    name = Path(path).name
    sequence = sequence_of(name)
    if sequence == REBUILT_SEQUENCE:
        return (0, 0, name)
    if sequence is None:
        return (1, 0, name)
    return (2, sequence, name)


def next_sequence(parts_dir: Path) -> int:
    """One more than the highest sequence among the parts in `parts_dir` (1 when there is none).

    Only the holder of the state's lock commits parts, so the number is its own until it is used.
    """
    try:
        names = os.listdir(parts_dir)
    except FileNotFoundError:
        names = []
    highest = max((sequence_of(name) or 0 for name in names if is_part_name(name)), default=0)
    return highest + 1


def part_name(sequence: int, run_id: str, label: str) -> str:
    """`part-000000000042-<run id>-<label>.parquet`."""
    if not 0 <= sequence < 10**SEQUENCE_DIGITS:
        raise ValueError(f"part sequence {sequence} out of range")
    return f"{PART_PREFIX}{sequence:0{SEQUENCE_DIGITS}d}-{run_id}-{label}{PART_SUFFIX}"


_SEQUENCED_RECORD = re.compile(r"(\d{%d})-" % SEQUENCE_DIGITS)


def record_name(folder: Path, run_id: str) -> str:
    """The name of a run's record (`runs/`, `shards/`): `<12-digit sequence>-<run id>.json`, one more
    than the highest sequence in `folder`, so a later record wins whatever the clock said."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        names = []
    found = (_SEQUENCED_RECORD.match(name) for name in names if name.endswith(".json"))
    highest = max((int(match.group(1)) for match in found if match), default=0)
    return f"{highest + 1:0{SEQUENCE_DIGITS}d}-{run_id}.json"


def record_order(path: Path | str) -> tuple[int, int, str]:
    """Sort key of a record: names older versions gave (by name) first, then by sequence."""
    name = Path(path).name
    found = _SEQUENCED_RECORD.match(name)
    return (1, int(found.group(1)), name) if found else (0, 0, name)
