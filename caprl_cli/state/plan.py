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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.inputs.manifests import manifest_name, manifest_samples
from caprl_cli.defaults import DEFAULT_RETRIES
from caprl_cli.inputs.retry import is_transient, with_retries
from caprl_cli.outputs.rows import SIGNATURE, STATUS_OK, Row, error_kind_of
from caprl_cli.state.identity import Verdict, conflict_sample, judge, judge_all
from caprl_cli.state.index import CommittedIndex, CommittedOrigin
from caprl_cli.state.shares import Share
from caprl_cli.inputs.shards import read_shard
from caprl_cli.inputs.resolve import InputOptions, InputSet, ShardRef
from caprl_cli.storage import is_url, open_input, redact

LISTED = "listed"


@dataclass
class StreamTally:
    """One shard or manifest: how much of it was read, and how many of its samples still lack a row."""

    samples: int = 0
    errors: int = 0
    outstanding: int = 0
    finished: bool = False  # read to the end (or to the damage that ends it)
    interrupted: bool = False  # a transient failure (timeout, reset, 5xx) cut it short: read again next run


@dataclass(frozen=True)
class Listed:
    """The listed samples still to caption, in key order, and how they were counted."""

    todo: list[Sample]
    inputs: int
    already_done: int
    retrying: int
    changed: int = 0  # committed from the same source, but the file changed since: captioned again
    conflicts: int = 0  # a different image under a committed key: a conflict row each (in `todo`)


def plan_listed(samples: list[Sample], index: CommittedIndex, retry_errors: bool) -> Listed:
    """`samples` not yet committed (or committed as errors, with `retry_errors`), those whose file
    changed in place, and a conflict sample for each different image under a committed key (see
    `state.identity`). One vectorised lookup and comparison against the committed rows."""
    latest = index.latest
    keys = pa.array([sample.key for sample in samples], pa.string())
    committed_keys = index.keys()
    position = pc.index_in(keys, value_set=committed_keys)
    committed = position.is_valid().to_numpy(zero_copy_only=False)
    rows = latest.select(["status", "source", SIGNATURE]).take(position)
    ok = pc.fill_null(pc.equal(rows["status"], STATUS_OK), False).to_numpy(zero_copy_only=False)
    # an `unavailable` row (a transient read failure) is never final: every run tries the key again
    unavailable = pc.fill_null(index.unavailable().take(position), False).to_numpy(zero_copy_only=False)
    verdicts = judge_all(
        pa.array([sample.source for sample in samples], pa.string()),
        pa.array([sample.signature for sample in samples], pa.string()),
        rows["source"],
        rows[SIGNATURE],
    )
    same = committed & (verdicts == Verdict.SAME)
    changed = committed & (verdicts == Verdict.CHANGED)
    retry = same & ~ok & (retry_errors | unavailable)
    conflicts = {
        int(i): conflict_sample(samples[i], rows["source"][int(i)].as_py())
        for i in np.flatnonzero(committed & (verdicts == Verdict.CONFLICT))
    }
    conflict_keys = pa.array([sample.key for sample in conflicts.values()], pa.string())
    recorded = set(conflict_keys.filter(pc.is_in(conflict_keys, value_set=committed_keys)).to_pylist())
    new_conflicts = {i: sample for i, sample in conflicts.items() if sample.key not in recorded}
    wanted = ~committed | retry | changed
    todo = [new_conflicts.get(i, sample) for i, sample in enumerate(samples) if wanted[i] or i in new_conflicts]
    done = int((same & ~retry).sum()) + len(conflicts) - len(new_conflicts)
    return Listed(todo, len(samples), done, int(retry.sum()), int(changed.sum()), len(new_conflicts))


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
    retries: int = DEFAULT_RETRIES  # further tries of a remote shard or manifest that fails to open
    inputs: int = 0
    already_done: int = 0
    retrying: int = 0
    changed: int = 0  # committed from the same source, changed in place since: captioned again
    conflicts: int = 0  # different images under committed keys: a conflict row each
    handed_out: int = 0
    tallies: dict[str, StreamTally] = field(default_factory=dict)
    _in_flight: dict[str, str] = field(default_factory=dict)  # key -> origin, while a sample has no row
    _committed: dict[str, CommittedOrigin] | None = None  # key -> its row's origin, built if a stream needs it
    _taken: dict[str, str] = field(default_factory=dict)  # key -> source, for every streamed key this run
    _lock: threading.Lock = field(default_factory=threading.Lock)  # samples() may run on a reader thread
    # (key, source) of placeholder rows that streams read to their end this run made obsolete
    withdrawn: list[tuple[str, str]] = field(default_factory=list)
    _placeholders: dict[str, list[str]] | None = None  # stream -> its committed `<stream>@<n>` rows
    share: Share | None = None  # --num-shards/--shard-index: manifest entries outside it are passed over

    def __post_init__(self) -> None:
        listed = self.listed
        self.inputs, self.already_done, self.retrying = listed.inputs, listed.already_done, listed.retrying
        self.changed, self.conflicts = listed.changed, listed.conflicts
        self.tallies[LISTED] = StreamTally(samples=len(self.listed.todo), finished=True)
        for shard in self.shards:
            record = self.finished_shards.get(shard.source)
            if record is not None and self.retry_errors and record.get("errors", 1):
                record = None  # --retry-errors reads again only the finished shards that had error rows
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
                samples = self._watched(shard.source, shard.source, self._read_shard(shard))
                yield from self._pending_of(shard.source, samples)
        for manifest in self.manifests:
            samples = manifest_samples(
                manifest,
                image_column=self.options.image_column,
                image_root=self.options.image_root,
                keep_meta=self.options.keep_meta,
                options=self.options.storage_options,
                retries=self.retries,
            )
            origin, name = redact(manifest), manifest_name(manifest)
            watched = self._watched(origin, name, samples)
            if self.share is not None:
                watched = self.share.stream_entries(name, watched)
            yield from self._pending_of(origin, watched)

    def _read_shard(self, shard: ShardRef) -> Iterator[Sample]:
        """The shard's samples; one that cannot be opened is one error row keyed `<shard>@0`: SHARD
        when it never will be (404), UNAVAILABLE when it failed transiently `retries` more times."""
        retries = self.retries if is_url(shard.url) else 0
        try:
            stream = with_retries(lambda: open_input(shard.url, self.options.storage_options, stream=True), retries)
        except Exception as exc:  # a missing or unreachable shard is one error row, not a failed run
            transient = is_transient(exc)
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
            detail = redact(f"{type(exc).__name__}: {exc}{cause}")
            tried = f" (tried {retries + 1} times; the next run tries again)" if transient else ""
            yield Sample(
                key=f"{shard.source}@0",
                source=shard.source,
                error_kind=ErrorKind.UNAVAILABLE if transient else ErrorKind.SHARD,
                error_message=f"cannot open shard {shard.source}{tried}: {detail}",
            )
            return
        with stream:
            yield from read_shard(shard.source, stream, keep_meta=self.options.keep_meta)

    def _pending_of(self, origin: str, samples: Iterator[Sample]) -> Iterator[tuple[str, Sample]]:
        """The samples of one stream not committed yet. A key this run already took from a stream is
        not captioned twice: from the same source (a manifest naming an image twice) it is skipped;
        from another (two shards with one key) the later sample is an error row of its own, so the
        first one's row stays. A key committed by an earlier run is judged against its row (see
        `state.identity`): the same image is skipped, a changed one captioned again, a different one
        becomes its conflict row (once)."""
        tally = self.tallies[origin]
        if self._committed is None:
            self._committed = self.index.origins_by_key()
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
            row = committed.get(sample.key)
            verdict = None if row is None else judge(sample.source, sample.signature, row.source, row.signature)
            skip = retry = False
            if row is not None and verdict is Verdict.SAME:
                retry = not row.ok and self.retry_errors
                skip = not retry
            elif row is not None and verdict is Verdict.CONFLICT:
                sample = conflict_sample(sample, row.source)
                skip = sample.key in committed  # recorded by an earlier run; never retried, it stays one
            with self._lock:
                tally.samples += 1
                self.inputs += 1
                self.already_done += skip
                tally.errors += skip and (verdict is Verdict.CONFLICT or (row is not None and not row.ok))
                self.retrying += retry
                self.changed += verdict is Verdict.CHANGED
                self.conflicts += verdict is Verdict.CONFLICT and not skip
            if not skip:
                yield origin, sample
        tally.finished = True

    def _watched(self, origin: str, name: str, samples: Iterator[Sample]) -> Iterator[Sample]:
        """`samples` of the stream `origin` passed through, noting a transient failure that cut the
        stream short (its `unavailable` placeholder row). Once the stream has been read to its end, the
        placeholder rows an earlier run left for it (`<name>@<n>`: could not open it, broke off at byte
        n) that this reading did not give again are withdrawn: they name no sample, and the samples
        behind them have now been read."""
        tally = self.tallies[origin]
        given: set[str] = set()
        for sample in samples:
            if sample.error_kind is ErrorKind.UNAVAILABLE:
                tally.interrupted = True
            if sample.error_kind is not None and sample.key.startswith(name + "@"):
                given.add(sample.key)
            yield sample
        if self._placeholders is None:
            self._placeholders = self.index.placeholders()
        obsolete = [key for key in self._placeholders.get(name, []) if key not in given]
        with self._lock:
            self.withdrawn.extend((key, origin) for key in obsolete)

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
            if source in shard_sources and tally.finished and not tally.interrupted and tally.outstanding == 0
        }

    # -- what is left -----------------------------------------------------------------------------

    @property
    def listed_remaining(self) -> int:
        """Listed images without a row yet (beyond --limit, or not reached before a stop)."""
        return self.tallies[LISTED].outstanding + len(self.listed.todo) - min(self.handed_out, len(self.listed.todo))

    @property
    def unfinished_streams(self) -> int:
        """Shards and manifests not read to the end (or cut short by a transient failure), or with
        samples that got no row."""
        return sum(
            1
            for origin, tally in self.tallies.items()
            if origin != LISTED and (not tally.finished or tally.interrupted or tally.outstanding)
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
    retries: int = DEFAULT_RETRIES,
    share: Share | None = None,
) -> Plan:
    """The plan of a run over `inputs` against what `index` holds; remote shards and manifests that
    fail to open transiently are tried `retries` more times. With a `share`, only its listed images,
    shards and manifest entries are planned: the others are never opened."""
    if share is not None:
        inputs = share.of_inputs(inputs)
    return Plan(
        listed=plan_listed(inputs.listed, index, retry_errors),
        index=index,
        shards=list(inputs.shards),
        manifests=list(inputs.manifests),
        finished_shards=finished_shards or {},
        options=options or InputOptions(),
        retry_errors=retry_errors,
        limit=limit,
        retries=retries,
        share=share,
    )


def peek(samples: Iterator[Sample]) -> tuple[Sample | None, Iterator[Sample]]:
    """The first sample, and an iterator that still yields it: tells 'nothing to do' before a model loads."""
    first = next(samples, None)
    if first is None:
        return None, iter(())
    return first, itertools.chain([first], samples)

