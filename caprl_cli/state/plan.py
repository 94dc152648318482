"""Decide what a run captions: the inputs minus what the committed parts already hold.

Listed samples (folders, files, lists) are planned up front with one vectorised Arrow lookup, so
planning a million images against a million committed keys takes a second, not a model load.
Streamed inputs (tar shards, manifests) are planned while they are read: a shard finished in an
earlier run is skipped without being opened, and inside a shard read again (after a crash) each
sample already committed is passed over. Samples are handed out lazily, so a remote shard is being
read while the engine works, and `--limit` stops reading as soon as enough samples were handed out.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.inputs.manifests import manifest_samples
from caprl_cli.outputs.rows import Row, error_kind_of
from caprl_cli.state.index import CommittedIndex
from caprl_cli.inputs.shards import read_shard
from caprl_cli.inputs.resolve import InputOptions, InputSet, ShardRef
from caprl_cli.storage import open_input, redact

LISTED = "listed"


@dataclass
class StreamTally:
    """One shard or manifest: how much of it was read, and how many of its samples still lack a row."""

    samples: int = 0
    errors: int = 0
    outstanding: int = 0
    finished: bool = False  # read to the end (or to the damage that ends it)


@dataclass(frozen=True)
class Listed:
    """The listed samples still to caption, in key order, and how they were counted."""

    todo: list[Sample]
    inputs: int
    already_done: int
    retrying: int


def plan_listed(samples: list[Sample], index: CommittedIndex, retry_errors: bool) -> Listed:
    """`samples` not yet committed (or committed as errors, with `retry_errors`)."""
    keys = pa.array([sample.key for sample in samples], pa.string())
    committed = pc.is_in(keys, value_set=index.keys()).to_numpy(zero_copy_only=False)
    if retry_errors:
        done = pc.is_in(keys, value_set=index.keys(ok_only=True)).to_numpy(zero_copy_only=False)
    else:
        done = committed
    todo = [sample for sample, is_done in zip(samples, done, strict=True) if not is_done]
    return Listed(todo, len(samples), int(done.sum()), int((committed & ~done).sum()))


@dataclass
class Plan:
    """What this run captions. Counters grow while streams are read; `samples()` hands work out once."""

    listed: Listed
    index: CommittedIndex
    shards: list[ShardRef] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    finished_shards: dict[str, dict] = field(default_factory=dict)  # completion records of earlier runs
    options: InputOptions = field(default_factory=InputOptions)
    retry_errors: bool = False
    limit: int | None = None
    inputs: int = 0
    already_done: int = 0
    retrying: int = 0
    handed_out: int = 0
    tallies: dict[str, StreamTally] = field(default_factory=dict)
    _in_flight: dict[str, str] = field(default_factory=dict)  # key -> origin, while a sample has no row
    _committed: dict[str, bool] | None = None  # key -> captioned ok, built only if a stream needs it
    _taken: dict[str, str] = field(default_factory=dict)  # key -> source, for every streamed key this run
    _lock: threading.Lock = field(default_factory=threading.Lock)  # samples() may run on a reader thread

    def __post_init__(self) -> None:
        listed = self.listed
        self.inputs, self.already_done, self.retrying = listed.inputs, listed.already_done, listed.retrying
        self.tallies[LISTED] = StreamTally(samples=len(self.listed.todo), finished=True)
        for shard in self.shards:
            record = None if self.retry_errors else self.finished_shards.get(shard.source)
            if record is not None:  # finished in an earlier run: not even opened
                self.inputs += record.get("samples", 0)
                self.already_done += record.get("samples", 0)
            else:
                self.tallies.setdefault(shard.source, StreamTally())
        for manifest in self.manifests:
            self.tallies.setdefault(redact(manifest), StreamTally())

    # -- handing out work -------------------------------------------------------------------------

    def samples(self) -> Iterator[Sample]:
        """Every sample to caption now, listed ones first, at most `limit` in all."""
        work = itertools.chain(
            ((LISTED, sample) for sample in self.listed.todo),
            self._streamed(),
        )
        for origin, sample in itertools.islice(work, self.limit):
            with self._lock:
                self.handed_out += 1
                self._in_flight[sample.key] = origin
                self.tallies[origin].outstanding += 1
            yield sample

    def _streamed(self) -> Iterator[tuple[str, Sample]]:
        for shard in self.shards:
            if shard.source in self.tallies:
                yield from self._pending_of(shard.source, self._read_shard(shard))
        for manifest in self.manifests:
            samples = manifest_samples(
                manifest,
                image_column=self.options.image_column,
                image_root=self.options.image_root,
                keep_meta=self.options.keep_meta,
                options=self.options.storage_options,
            )
            yield from self._pending_of(redact(manifest), samples)

    def _read_shard(self, shard: ShardRef) -> Iterator[Sample]:
        try:
            stream = open_input(shard.url, self.options.storage_options, stream=True)
        except Exception as exc:  # a missing or unreachable shard is one error row, not a failed run
            detail = redact(f"{type(exc).__name__}: {exc}")
            yield Sample(
                key=f"{shard.source}@0",
                source=shard.source,
                error_kind=ErrorKind.SHARD,
                error_message=f"cannot open shard {shard.source}: {detail}",
            )
            return
        with stream:
            yield from read_shard(shard.source, stream, keep_meta=self.options.keep_meta)

    def _pending_of(self, origin: str, samples: Iterator[Sample]) -> Iterator[tuple[str, Sample]]:
        """The samples of one stream not committed yet. A key this run already took from a stream is
        not captioned twice: from the same source (a manifest naming an image twice) it is skipped;
        from another (two shards with one key) the later sample is an error row of its own, so the
        first one's row stays."""
        tally = self.tallies[origin]
        if self._committed is None:
            self._committed = self.index.status_by_key()
        committed = self._committed
        for sample in samples:
            taken = self._taken.get(sample.key)
            if taken is not None:
                if taken == sample.source:
                    continue
                sample = Sample(
                    key=f"{sample.key}@{sample.source}",
                    source=sample.source,
                    error_kind=ErrorKind.SHARD,
                    error_message=f"key {sample.key!r} was already taken from {taken} in this run; "
                    "keys must be unique across inputs",
                )
            self._taken[sample.key] = sample.source
            ok = committed.get(sample.key)
            skip = ok is not None and (ok or not self.retry_errors)
            with self._lock:
                tally.samples += 1
                self.inputs += 1
                self.already_done += skip
                tally.errors += skip and not ok
                self.retrying += ok is False and not skip
            if not skip:
                yield origin, sample
        tally.finished = True

    # -- rows coming back -------------------------------------------------------------------------

    def row_done(self, row: Row) -> None:
        """A handed-out sample has its row (called for every row the run produces)."""
        with self._lock:
            origin = self._in_flight.pop(row["key"], None)
            if origin is None:
                return
            tally = self.tallies[origin]
            tally.outstanding -= 1
            tally.errors += error_kind_of(row) is not None

    def completed_shards(self) -> dict[str, dict]:
        """Shards read to the end whose every sample has a row: never opened again."""
        shard_sources = {shard.source for shard in self.shards}
        return {
            source: {"samples": tally.samples, "errors": tally.errors}
            for source, tally in self.tallies.items()
            if source in shard_sources and tally.finished and tally.outstanding == 0
        }

    # -- what is left -----------------------------------------------------------------------------

    @property
    def listed_remaining(self) -> int:
        """Listed images without a row yet (beyond --limit, or not reached before a stop)."""
        return self.tallies[LISTED].outstanding + len(self.listed.todo) - min(self.handed_out, len(self.listed.todo))

    @property
    def unfinished_streams(self) -> int:
        """Shards and manifests not read to the end, or with samples that got no row."""
        return sum(
            1
            for origin, tally in self.tallies.items()
            if origin != LISTED and (not tally.finished or tally.outstanding)
        )

    @property
    def work_remains(self) -> bool:
        return self.listed_remaining > 0 or self.unfinished_streams > 0


def plan_run(
    inputs: InputSet,
    index: CommittedIndex,
    *,
    retry_errors: bool = False,
    limit: int | None = None,
    finished_shards: dict[str, dict] | None = None,
    options: InputOptions | None = None,
) -> Plan:
    """The plan of a run over `inputs` against what `index` holds."""
    return Plan(
        listed=plan_listed(inputs.listed, index, retry_errors),
        index=index,
        shards=list(inputs.shards),
        manifests=list(inputs.manifests),
        finished_shards=finished_shards or {},
        options=options or InputOptions(),
        retry_errors=retry_errors,
        limit=limit,
    )


def peek(samples: Iterator[Sample]) -> tuple[Sample | None, Iterator[Sample]]:
    """The first sample, and an iterator that still yields it: tells 'nothing to do' before a model loads."""
    first = next(samples, None)
    if first is None:
        return None, iter(())
    return first, itertools.chain([first], samples)

