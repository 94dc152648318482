"""One pass over an output: a seeded uniform sample of its rows, and the numbers the page shows.

The output is read once, front to back, and only the sample (at most `--sample` rows, with their image
bytes when the output carries them), per-kind error examples, and one small integer per caption are
held, so a folder of millions of rows costs a few bytes per row. Reservoir sampling (Algorithm R) with a
generator seeded by `--seed` picks the same rows every time for the same output and seed.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from caprl_cli.gallery.reading import PublishedRow
from caprl_cli.outputs.rows import STATUS_ERROR, STATUS_OK, kind_of_error

T = TypeVar("T")
# Error messages shown per kind; the count says how many there are in all.
EXAMPLES_PER_KIND = 20


class Reservoir(Generic[T]):
    """A uniform sample of at most `size` items from a stream of unknown length, repeatable by seed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.items: list[T] = []
        self._random = random.Random(seed)

    def offer(self, item: T) -> None:
        """Consider one more item of the stream: kept with probability size / items seen so far."""
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        slot = self._random.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = item


def caption_length(caption: str | None) -> int:
    """A caption's length in words, as the histogram counts it."""
    return len(caption.split()) if caption else 0


@dataclass
class OutputStats:
    """What the whole output holds: rows by status, finish reasons, error kinds with examples, and the
    length of every caption (for the histogram)."""

    rows: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    lengths: array = field(default_factory=lambda: array("L"))

    def add(self, row: dict) -> None:
        self.rows += 1
        status = row.get("status") or ""
        self.by_status[status] += 1
        if status == STATUS_OK:
            self.finish_reasons[row.get("finish_reason") or "unknown"] += 1
            self.lengths.append(caption_length(row.get("caption")))
        elif status == STATUS_ERROR:
            error = row.get("error") or ""
            kind = kind_of_error(error) or "unknown"
            self.errors_by_kind[kind] += 1
            examples = self.error_examples.setdefault(kind, [])
            if len(examples) < EXAMPLES_PER_KIND:
                message = error.split(":", 1)[1].strip() if ":" in error else error
                examples.append((str(row.get("key")), message))


def sample_output(
    rows: Iterable[PublishedRow], size: int, seed: int, status: str | None = None
) -> tuple[list[PublishedRow], OutputStats]:
    """A seeded sample of `size` rows (only rows of `status`, when given), in key order, and the
    statistics of every row."""
    reservoir: Reservoir[PublishedRow] = Reservoir(size, seed)
    stats = OutputStats()
    for published in rows:
        stats.add(published.row)
        if status is None or published.row.get("status") == status:
            reservoir.offer(published)
    return sorted(reservoir.items, key=lambda item: str(item.row.get("key"))), stats


def histogram(lengths: array, bins: int = 20) -> Iterator[tuple[int, int, int]]:
    """(low, high, count) per bin of equal width covering 0..the longest caption, inclusive bounds."""
    if not lengths:
        return
    longest = max(lengths)
    width = max(1, -(-(longest + 1) // bins))
    counts = Counter(length // width for length in lengths)
    for index in range(longest // width + 1):
        yield index * width, index * width + width - 1, counts.get(index, 0)
