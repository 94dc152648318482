"""Parquet dataset output: a folder of Parquet files of bounded size that grows by adding files.

`-o captions/ --format parquet` publishes the committed rows as `captions-000000.parquet`,
`captions-000001.parquet`, ... (`captions-<index>-of-<count>-000000.parquet` for a `--num-shards`
share), each at most `--rows-per-file` rows, with the run's provenance in each file's key-value
metadata. pandas (`read_parquet(folder)`), DuckDB (`read_parquet('folder/*.parquet')`),
`pyarrow.dataset` and `datasets.load_dataset("parquet", data_dir=folder)` read the folder as one table:
nothing else lies in it but hidden state folders (`.caprl`, `.caprl-share-<i>-of-<n>`), which all four
skip. The summary lives in the hidden folder too (`datasets` refuses any non-Parquet file beside the
data, `_`- or `.`-prefixed or not), and no file is ever left empty (`datasets` refuses those too).

A publish costs what the run did, not the size of the corpus:

- rows committed since the last publish (parts without a `dataset_file` column) go into new files;
  every file published before stays byte-identical;
- a key whose older row sits in a published file (an error row replaced by `--retry-errors`, a
  transient `unavailable` row replaced by a plain run, a placeholder row withdrawn) has that one file
  rewritten without the old row; a file left with no row is removed;
- the rows just published become one state part with a `dataset_file` column naming each row's file,
  rows of status error first, so finding replaced rows reads only the error row groups of published
  parts (Parquet statistics), never their captions. Its metadata lists the files it published (and
  those it removed), so the state knows which files are its own without listing their rows.

Crash safety (SIGKILL anywhere): files are written under temporary names and renamed; a file
published but not yet recorded by a state part is a leftover the next publish removes before it
writes again (its rows are still in the unpublished parts); the state part is committed before the
parts it replaces are deleted, and rows of such leftover parts are never the latest of their key.
A recorded file that went missing is written again from the state.

Each publish adds one state part, so an hourly cron would pile up thousands a year for every resume to
read. Past COMPACT_ABOVE_PARTS published parts (the single-file state's limit), the smaller ones are
compacted into one (see `compact_published`); the data files are never touched by it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caprl_cli.faults import crash_point
from caprl_cli.outputs.base import OutputOptions, OutputTarget, cache_state_dir
from caprl_cli.outputs.folder import OutputFolder
from caprl_cli.outputs.place import check_folder, check_names_fit
from caprl_cli.outputs.row_writers import PROVENANCE_KEY, ParquetRowWriter
from caprl_cli.outputs.rows import PART_SCHEMA, SCHEMA, STATUS_ERROR, STATUS_WITHDRAWN, output_schema
from caprl_cli.state.folder import RunState
from caprl_cli.state.index import CommittedIndex
from caprl_cli.state.parts import new_run_id
from caprl_cli.state.sequence import next_sequence, part_name, part_order
from caprl_cli.storage import local_path_of

log = logging.getLogger("caprl")

# Column of a published state part: the data file that holds the row (null for a withdrawal row).
DATASET_FILE = "dataset_file"
PUBLISHED_SCHEMA = PART_SCHEMA.append(pa.field(DATASET_FILE, pa.string()))
# Keys in a published state part's provenance metadata: files it published, files it removed.
FILES_KEY = "dataset_files"
REMOVED_KEY = "dataset_removed"
FILE_STEM = "captions"
STATE_NAME = ".caprl"


def file_prefix(share: tuple[int, int] | None) -> str:
    """`captions-`, or `captions-<index>-of-<count>-` for share `index` of `count`: shares writing into one
    folder never name a file alike."""
    return f"{FILE_STEM}-" if share is None else f"{FILE_STEM}-{share[0]}-of-{share[1]}-"


def file_name(prefix: str, number: int) -> str:
    return f"{prefix}{number:06d}.parquet"


def file_number(prefix: str, name: str) -> int | None:
    """The number of data file `name` of this prefix; None for any other name (another share's file)."""
    found = re.fullmatch(re.escape(prefix) + r"(\d{6,})\.parquet", name)
    return int(found.group(1)) if found else None


class DatasetFolder(OutputFolder):
    """The dataset folder: a local path, or an fsspec filesystem and the path inside it."""

    def staging_path(self, name: str) -> Path:
        """Where file `name` is committed: its final place locally (the writer renames into it from a
        hidden temporary), a local temporary file to upload otherwise."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            return self.local / name
        handle, raw = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")
        os.close(handle)
        return Path(raw)

    def publish(self, built: Path, name: str) -> None:
        """Give the committed file `built` its real name (remote: put to a hidden name, then mv)."""
        if self.local is not None:
            return  # ParquetRowWriter already renamed it into place
        self.fs.makedirs(self.root, exist_ok=True)
        self.upload(built, name)


class DatasetTarget(OutputTarget):
    """A folder of bounded Parquet files that grows by adding files (see the module docstring)."""

    def __init__(self, location: str, options: OutputOptions) -> None:
        super().__init__(location, options)
        self.directory = location.rstrip("/") or location
        self.share = options.share
        self.prefix = file_prefix(self.share)
        self.folder = DatasetFolder.of(self.directory, self.storage_options)
        # Data files hold the contract's columns, plus the list columns of --num-captions N > 1.
        self.schema = output_schema(options.num_captions)

    @property
    def state_name(self) -> str:
        """`.caprl`, or `.caprl-share-<index>-of-<count>`: one state per share, so shares never share a lock."""
        return STATE_NAME if self.share is None else f"{STATE_NAME}-share-{self.share[0]}-of-{self.share[1]}"

    def default_state_dir(self) -> Path:
        path = local_path_of(self.directory)
        if path is not None:
            return path / self.state_name
        return cache_state_dir(self.location if self.share is None else f"{self.location}#{self.state_name}")

    def summary_location(self) -> str:
        return f"{self.directory}/{self.state_name}/summary.json"

    def write_summary(self, state: RunState, provenance: dict[str, Any]) -> None:
        local = local_path_of(self.summary_location())
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
        super().write_summary(state, provenance)

    def is_own_file(self, path: Path) -> bool:
        local = local_path_of(self.directory)
        return local is not None and path.parent.resolve() == local.resolve() and self.number_of(path.name) is not None

    def number_of(self, name: str) -> int | None:
        return file_number(self.prefix, name)

    def file_names(self) -> list[str]:
        """This share's data files in the folder, by number."""
        return sorted((name for name in self.folder.names() if self.number_of(name) is not None), key=self.number_of)

    def exists(self) -> bool:
        return bool(self.file_names())

    def remove_stale_temporaries(self) -> None:
        stale = re.compile(r"\." + re.escape(self.prefix) + r"\d{6,}\.parquet\.\d+\.tmp")
        for name in self.folder.names():
            if stale.fullmatch(name):
                self.folder.remove(name)
        super().remove_stale_temporaries()

    def check_place(self, state: RunState) -> None:
        local = local_path_of(self.directory)
        if local is not None:
            names = [file_name(self.prefix, 0), "." + file_name(self.prefix, 0) + ".4194304.tmp"]
            if state.dir.parent == local:
                names.append(state.dir.name)
            check_names_fit(local, names, "output")
            check_folder(local, "output folder")
        super().check_place(state)

    # -- publishing -------------------------------------------------------------------------------

    def publish(self, state: RunState, index: CommittedIndex, provenance: dict[str, Any]) -> None:
        published = [part for part in index.parts if is_published_part(part)]
        pending = [part for part in index.parts if part not in published]
        recorded, removed = recorded_files(published)
        present = set(self.file_names())
        leftovers = sorted(present - recorded)  # published by a run killed before recording them
        for name in leftovers:
            self.folder.remove(name)
        missing = sorted(recorded - removed - present)
        if missing:
            self.write_again(index, published, missing, provenance)
        numbers = [self.number_of(name) for name in recorded | present]
        next_number = max((n for n in numbers if n is not None), default=-1) + 1
        if not pending:
            state.record_merge(index.parts)
            compact_published(state)  # finishes a compaction a crash cut short
            return
        skip = {part.name for part in published}
        keys, withdrawals = pending_keys(pending)
        record = ParquetRowWriter(
            state.parts_dir / part_name(next_sequence(state.parts_dir), new_run_id(), "published"),
            schema=PUBLISHED_SCHEMA,
        )
        files = FileSequence(self, next_number, provenance, schema=self.schema)
        try:
            # Error rows first in the state part, so later lookups of replaced rows skip the rest.
            for errors in (True, False):
                for table in index.latest_tables(list(PART_SCHEMA.names), skip=skip):
                    is_error = pc.fill_null(pc.equal(table["status"], STATUS_ERROR), False)
                    for piece, name in files.add(table.filter(is_error if errors else pc.invert(is_error))):
                        names = pa.array([name] * piece.num_rows, pa.string())
                        record.write_table(piece.append_column(DATASET_FILE, names))
            written = files.close()
            withdrawn = still_withdrawn(withdrawals, index)
            if withdrawn.num_rows:
                record.write_table(withdrawn.append_column(DATASET_FILE, pa.nulls(withdrawn.num_rows, pa.string())))
            emptied = self.drop_replaced(replaced_rows(published, keys, index))
            crash_point("dataset.stale_rewritten")
            if written or emptied or withdrawn.num_rows:
                record.commit({**provenance, FILES_KEY: written, REMOVED_KEY: emptied})
                crash_point("dataset.recorded")
            else:  # only leftovers of a killed publish, whose rows are recorded already
                record.abort()
        except BaseException:
            files.abort()
            record.abort()
            raise
        for part in pending:
            part.unlink(missing_ok=True)
        crash_point("dataset.parts_dropped")
        state.record_merge([*published, record.path] if record.path.exists() else published)
        log.debug("published %d new files into %s", len(written), self.label)
        compact_published(state)

    def drop_replaced(self, stale: dict[str, set[str]]) -> list[str]:
        """Rewrite each file of `stale` (file -> keys) without those keys' rows; return the files left
        with no row, which are removed (an empty Parquet file breaks `datasets`)."""
        emptied: list[str] = []
        for name, keys in sorted(stale.items()):
            try:
                with self.folder.open(name) as handle:
                    parquet = pq.ParquetFile(handle)
                    metadata = parquet.metadata.metadata or {}
                    table = parquet.read()
            except FileNotFoundError:
                continue
            keep = pc.invert(pc.is_in(table["key"], value_set=pa.array(sorted(keys), pa.string())))
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            if kept.num_rows == 0:
                self.folder.remove(name)
                emptied.append(name)
                continue
            provenance = json.loads(metadata.get(PROVENANCE_KEY.encode(), b"{}"))
            self.write_file(name, kept, provenance)
        return emptied

    def write_file(self, name: str, table: pa.Table, provenance: dict[str, Any]) -> None:
        """One data file, written whole under a temporary name and renamed."""
        path = self.folder.staging_path(name)
        writer = ParquetRowWriter(path, schema=self.schema)
        try:
            writer.write_table(table)
            writer.commit(provenance)
        except BaseException:
            writer.abort()
            raise
        self.folder.publish(path, name)

    def write_again(self, index: CommittedIndex, published: list[Path], missing: list[str], provenance: dict) -> None:
        """Recorded files that are gone (deleted by hand, or a crash right after a file was emptied):
        written again from the state's rows that are still the latest of their key."""
        log.warning("%d published files are missing from %s; writing them again from the state", len(missing), self.label)
        wanted = pa.array(missing, pa.string())
        skip = {part.name for part in index.parts if part not in published}
        found: dict[str, list[pa.Table]] = {}
        for table in index.latest_tables([*PART_SCHEMA.names, DATASET_FILE], skip=skip):
            table = table.filter(pc.fill_null(pc.is_in(table[DATASET_FILE], value_set=wanted), False))
            for name in set(table[DATASET_FILE].to_pylist()):
                found.setdefault(name, []).append(table.filter(pc.equal(table[DATASET_FILE], name)))
        for name, tables in sorted(found.items()):
            self.write_file(name, pa.concat_tables(tables).select(list(self.schema.names)), provenance)


class FileSequence:
    """Numbered data files of at most `rows_per_file` rows, filled in order (with `schema`'s columns:
    `caprl merge` keeps the list columns of several captions)."""

    def __init__(self, target: DatasetTarget, first: int, provenance: dict[str, Any], schema: pa.Schema = SCHEMA) -> None:
        self.target, self.provenance = target, provenance
        self.schema = schema
        self.number = first
        self.limit = target.options.rows_per_file
        self.writer: ParquetRowWriter | None = None
        self.rows = 0
        self.written: list[str] = []

    @property
    def name(self) -> str:
        return file_name(self.target.prefix, self.number)

    def add(self, table: pa.Table) -> Iterator[tuple[pa.Table, str]]:
        """Write `table`, splitting it across files; yield each piece with the file it went to."""
        offset = 0
        while offset < table.num_rows:
            if self.writer is None:
                path = self.target.folder.staging_path(self.name)
                self.writer = ParquetRowWriter(path, schema=self.schema)
            piece = table.slice(offset, min(self.limit - self.rows, table.num_rows - offset))
            self.writer.write_table(piece)
            self.rows += piece.num_rows
            offset += piece.num_rows
            yield piece, self.name
            if self.rows >= self.limit:
                self._finish()

    def _finish(self) -> None:
        assert self.writer is not None
        self.writer.commit(self.provenance)
        self.target.folder.publish(self.writer.path, self.name)
        self.written.append(self.name)
        crash_point("dataset.file_written")
        self.writer, self.rows = None, 0
        self.number += 1

    def close(self) -> list[str]:
        if self.writer is not None:
            self._finish()
        return self.written

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def is_published_part(part: Path) -> bool:
    """Whether a state part records published rows (it has a `dataset_file` column)."""
    return DATASET_FILE in pq.read_schema(part).names


def recorded_files(published: list[Path]) -> tuple[set[str], set[str]]:
    """(files the published parts name, files they removed), from the parts' metadata only."""
    files: set[str] = set()
    removed: set[str] = set()
    for part in published:
        metadata = pq.read_metadata(part).metadata or {}
        record = json.loads(metadata.get(PROVENANCE_KEY.encode(), b"{}"))
        files.update(record.get(FILES_KEY, []))
        removed.update(record.get(REMOVED_KEY, []))
    return files, removed


def pending_keys(pending: list[Path]) -> tuple[pa.Array, pa.Table]:
    """(every key the pending parts hold, their withdrawal rows): read once, the run's own rows only."""
    keys: list[pa.Array] = [pa.array([], pa.string())]
    withdrawals: list[pa.Table] = []
    for part in pending:
        names = pq.read_schema(part).names
        table = pq.read_table(part, columns=[name for name in PART_SCHEMA.names if name in names])
        keys.append(table["key"].combine_chunks())
        withdrawals.append(table.filter(pc.fill_null(pc.equal(table["status"], STATUS_WITHDRAWN), False)))
    empty = pa.table({"key": pa.array([], pa.string())})
    return pa.concat_arrays(keys), pa.concat_tables(withdrawals or [empty], promote_options="permissive")


def still_withdrawn(withdrawals: pa.Table, index: CommittedIndex) -> pa.Table:
    """The withdrawal rows whose key is still withdrawn (not in the index), with the part schema: kept
    in the published state part, so the withdrawal stays the latest row of its key once the parts go."""
    if withdrawals.num_rows:
        withdrawals = withdrawals.filter(
            pc.invert(pc.is_in(withdrawals["key"], value_set=index.latest["key"].combine_chunks()))
        )
    present = set(withdrawals.column_names)
    columns = [
        withdrawals[f.name] if f.name in present else pa.nulls(withdrawals.num_rows, f.type) for f in PART_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=PART_SCHEMA)


def replaced_rows(published: list[Path], keys: pa.Array, index: CommittedIndex) -> dict[str, set[str]]:
    """File -> keys whose row in that file is no longer the latest of the key, for keys the pending parts
    hold. Only error rows are ever replaced (a captioned key is never captioned again), so only the
    error row groups of the published parts are read."""
    if not len(keys) or not published:
        return {}
    keys = pc.unique(keys)
    latest = index.latest.filter(pc.is_in(index.latest["key"], value_set=keys))
    latest_part = dict(zip(latest["key"].to_pylist(), (index.parts[i].name for i in latest["part"].to_pylist()), strict=True))
    stale: dict[str, set[str]] = {}
    for part in published:
        rows = pq.read_table(part, columns=["key", DATASET_FILE], filters=[("status", "=", STATUS_ERROR)])
        rows = rows.filter(pc.and_(pc.is_in(rows["key"], value_set=keys), pc.is_valid(rows[DATASET_FILE])))
        for key, name in zip(rows["key"].to_pylist(), rows[DATASET_FILE].to_pylist(), strict=True):
            if latest_part.get(key) != part.name:
                stale.setdefault(name, set()).add(key)
    return stale


# Parts a compaction leaves: the largest published parts, and the compacted one.
KEEP_AFTER_COMPACTION = 32


def compact_published(state: RunState) -> Path | None:
    """Past COMPACT_ABOVE_PARTS published state parts, write all but the largest ones as one part and
    drop them (only the rows that are the latest of their key, with their `dataset_file`, error rows
    first; withdrawal rows whose key is still withdrawn; the files they recorded and removed); returns
    the compacted part, or None when there were not that many.

    The largest parts stay, so a row is rewritten only when the parts beside it have grown about as
    large (a log-structured merge): the cost per publish follows the publish, not the corpus. The parts
    merged need not be adjacent: each key's latest row is either kept as it is or moved into the newest
    part, so which row is the latest never changes. Crash safety: the compacted part is committed
    (sorting after every part) before anything else changes; the parts it replaced then hold no latest
    row, so a run killed before deleting them leaves duplicates that change nothing, and the next
    publish compacts them first (they are the smallest).
    """
    from caprl_cli.outputs.table import COMPACT_ABOVE_PARTS, compacted_part_path

    published = [part for part in state.part_paths() if is_published_part(part)]
    if len(published) <= COMPACT_ABOVE_PARTS:
        return None
    index = state.committed()
    latest_rows = {part.name: len(rows) for part, rows in zip(index.parts, index.rows_by_part(), strict=True)}
    names = {part.name for part in published}
    largest = sorted(
        (part for part in index.parts if part.name in names),
        key=lambda part: (latest_rows[part.name], part_order(part)),
        reverse=True,
    )[: KEEP_AFTER_COMPACTION - 1]
    kept = {part.name for part in largest}
    chosen = [part for part in index.parts if part.name in names and part.name not in kept]
    chosen_names = {part.name for part in chosen}
    files, removed = recorded_files(chosen)
    path = compacted_part_path(state)
    writer = ParquetRowWriter(path, schema=PUBLISHED_SCHEMA)
    try:
        skip = {part.name for part in index.parts if part.name not in chosen_names}
        for errors in (True, False):  # error rows first, as a publish writes them (see `replaced_rows`)
            for table in index.latest_tables(list(PUBLISHED_SCHEMA.names), skip=skip):
                is_error = pc.fill_null(pc.equal(table["status"], STATUS_ERROR), False)
                writer.write_table(table.filter(is_error if errors else pc.invert(is_error)))
        writer.write_table(withdrawn_rows(chosen, index))
        writer.commit({FILES_KEY: sorted(files), REMOVED_KEY: sorted(removed), "compacted_parts": len(chosen)})
    except BaseException:
        writer.abort()
        raise
    crash_point("dataset.compacted")
    state.record_merge([*(part for part in index.parts if part.name not in chosen_names), path])
    crash_point("dataset.compact_recorded")
    for part in chosen:
        part.unlink(missing_ok=True)
    log.debug("compacted %d published state parts into %s", len(chosen), path.name)
    return path


def withdrawn_rows(parts: list[Path], index: CommittedIndex) -> pa.Table:
    """The withdrawal rows of `parts` whose key is still withdrawn (not in the index), as published
    parts keep them: they must stay the latest row of their key once those parts are gone."""
    found: list[pa.Table] = [pa.Table.from_pylist([], schema=PUBLISHED_SCHEMA)]
    for part in parts:
        table = pq.read_table(part, filters=[("status", "=", STATUS_WITHDRAWN)])
        found.append(table.select([name for name in PUBLISHED_SCHEMA.names if name in table.column_names]))
    every = pa.concat_tables(found, promote_options="permissive")
    if every.num_rows:
        every = every.filter(pc.invert(pc.is_in(every["key"], value_set=index.latest["key"].combine_chunks())))
    return every
