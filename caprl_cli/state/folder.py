"""The state folder beside an output: the only record of what is done, safe against any crash.

`out.parquet` keeps its state in `out.parquet.caprl/`:

    lock               flock'ed by the run that owns the folder (the kernel drops it when it dies)
    fingerprint.json   the settings that decide captions; a run with other settings is refused
    parts/part-<sequence>-<run id>-<n>.parquet
                       committed rows, each file written under a temporary name, fsynced, renamed;
                       the sequence number (not a clock) says which row of a key is the latest
    runs/*.json        one record per finished run (counts, throughput) for `caprl status`
    shards/*.json      tar shards read to the end with a row for every sample: never opened again
    merged.json        which parts the output was last built from (remote: once the upload completed)
    unreadable/        parts `caprl repair` set aside (only ever on request, never automatically)

The committed parts are the truth: the output file is rebuilt from them, and what a run skips is what
they hold. A part is either complete under its final name or a temporary file that is ignored and
cleaned up, so a crash at any instant leaves nothing a later run could misread. A part that cannot
be read stops every run before anything changes (StateError) until it is restored or `caprl repair`
rebuilds the state from the published output.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caprl_cli.errors import OutputLocked, StateError, UsageError
from caprl_cli.faults import crash_point
from caprl_cli.outputs.atomic import (
    exchange_paths,
    name_fits,
    short_name_of,
    temp_name_pattern,
    write_json_atomically,
)
from caprl_cli.state.index import CommittedIndex, read_index_columns
from caprl_cli.state.sequence import is_part_name, part_order, record_name, record_order

log = logging.getLogger("caprl")

STATE_SUFFIX = ".caprl"
TEMP_SUFFIX = ".tmp"


# What caprl itself keeps in a state folder; anything else makes the folder someone else's.
STATE_ENTRIES = frozenset(
    {"lock", "fingerprint.json", "merged.json", "summary.json", "parts", "runs", "shards", "unreadable"}
)


def is_state_entry(name: str) -> bool:
    """Whether caprl writes `name` into a state folder: its own entries, hidden temporaries and uploads
    being staged (`upload-*`, `.upload-*`)."""
    return (
        name in STATE_ENTRIES
        or name.startswith(("upload-", ".upload-"))
        or (name.startswith(".") and name.endswith(TEMP_SUFFIX))
    )


class PartsChanged(StateError):
    """A listed part was gone when it was read: a run merged or compacted meanwhile; list again."""


def unreadable_part_error(path: Path, label: str, reason: BaseException | str) -> StateError:
    """One line: which part cannot be read, and the two ways forward."""
    why = " ".join(str(reason).split())[:200] or type(reason).__name__
    return StateError(
        f"state part {path} cannot be read ({why}); nothing was changed: restore the file, "
        f"or run `caprl repair {label}` (with the same --format/--state-dir) to rebuild the state "
        "from the published output"
    )


def state_dir_for(output: Path) -> Path:
    """`out.parquet` -> `out.parquet.caprl`."""
    return output.with_name(output.name + STATE_SUFFIX)


def _side_name(name: str, role: str) -> str:
    """The hidden sibling `start_over` uses while swapping a state folder: `.<name>.<role>-<pid>`
    (role `new` or `trash`; empty for the common prefix), with a hashed stand-in for a name that
    leaves no room for it."""
    if not name_fits(f".{name}.trash-{2**22}"):
        name = short_name_of(name)
    return f".{name}.{role}-{os.getpid()}" if role else f".{name}."


def _same_file(handle: Any, path: Path) -> bool:
    """Whether the open `handle` is the file at `path` now (not one renamed away since it was opened)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)


class RunState:
    """The state folder of one output."""

    def __init__(self, output: Path | None, state_dir: Path | None = None, label: str | None = None) -> None:
        """`output` is the local output file this folder guards, if there is one (temporaries beside
        it are cleaned up, and it goes with `clear`); other targets pass `state_dir` and a `label`."""
        if state_dir is None:
            if output is None:
                raise ValueError("a state folder needs an output file or an explicit folder")
            state_dir = state_dir_for(output)
        self.output = output
        self.label = label or str(output)
        self.dir = state_dir
        self.parts_dir = self.dir / "parts"
        self.runs_dir = self.dir / "runs"
        self.shards_dir = self.dir / "shards"
        self.fingerprint_path = self.dir / "fingerprint.json"
        self.merged_path = self.dir / "merged.json"
        self._lock_handle: Any = None

    def exists(self) -> bool:
        return self.fingerprint_path.is_file()

    def create(self) -> None:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    # -- lock -------------------------------------------------------------------------------------

    def acquire(self, wait: bool) -> None:
        """Take the folder's flock; without `wait`, raise OutputLocked if another run holds it.

        `start_over` swaps the whole folder for a new one, so a lock won on a file that is no longer
        the folder's `lock` (a run that waited on the old folder) is let go and taken again.
        """
        while True:
            self.dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.dir / "lock", "a+")
            try:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise
                    # An unbounded wait is never silent: say what the run waits for.
                    log.info("waiting for another caprl run to finish writing %s (lock %s)", self.label, self.dir)
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError as exc:
                handle.close()
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputLocked(
                        f"another caprl run is writing {self.label} (state {self.dir} is locked); "
                        "pass --wait to wait for it"
                    ) from None
                raise
            if _same_file(handle, self.dir / "lock"):
                self._lock_handle = handle
                return
            handle.close()

    def release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # -- ownership and starting over --------------------------------------------------------------

    def foreign_entries(self) -> list[str]:
        """Names in the folder that caprl never writes there: a folder holding any is not caprl's own,
        and is never written into, replaced or removed."""
        if not self.dir.is_dir():
            return []
        return sorted(name for name in os.listdir(self.dir) if not is_state_entry(name))

    def start_over(self, fingerprint: dict[str, Any]) -> None:
        """Forget everything (for --overwrite): a new folder holding only `fingerprint`, already locked
        by us, takes this one's place, then the old one is deleted.

        The two folders are swapped in one atomic exchange where the system can (Linux), so a kill at
        any instant leaves the old folder or the new one under the real name. Elsewhere the old one is
        renamed to a hidden trash name first: a kill between the two renames leaves no state, so the
        next run refuses the output until --overwrite is given again. Trash and half-made folders are
        deleted by the next run (`remove_stale_temporaries`).
        """
        fresh = self.dir.with_name(_side_name(self.dir.name, "new"))
        trash = self.dir.with_name(_side_name(self.dir.name, "trash"))
        for leftover in (fresh, trash):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            fresh.mkdir()
        except OSError as exc:
            raise UsageError(f"cannot start over in {self.dir.parent}: {exc.strerror or exc}") from None
        handle = open(fresh / "lock", "a+")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this folder
        try:
            for folder in ("parts", "runs"):
                (fresh / folder).mkdir()
            write_json_atomically(fresh / self.fingerprint_path.name, fingerprint)
            if exchange_paths(fresh, self.dir):
                trash = fresh  # now holds the old folder
            else:
                os.rename(self.dir, trash)
                crash_point("overwrite.aside")
                os.rename(fresh, self.dir)
        except BaseException:
            handle.close()
            raise
        self.release()
        self._lock_handle = handle
        crash_point("overwrite.swapped")
        shutil.rmtree(trash, ignore_errors=True)

    # -- fingerprint ------------------------------------------------------------------------------

    def stored_fingerprint(self) -> dict[str, Any] | None:
        if not self.fingerprint_path.is_file():
            return None
        return json.loads(self.fingerprint_path.read_text(encoding="utf-8"))

    def write_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        write_json_atomically(self.fingerprint_path, fingerprint)

    # -- parts ------------------------------------------------------------------------------------

    def part_paths(self) -> list[Path]:
        """Committed parts, oldest first: in the order of the sequence numbers in their names."""
        if not self.parts_dir.is_dir():
            return []
        return sorted((path for path in self.parts_dir.iterdir() if is_part_name(path.name)), key=part_order)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed run left behind (only ever called under the lock).

        Beside the output only this output's own `.<name>.<pid>.tmp` files match, never those of
        another output whose name merely starts the same way.
        """
        stale: list[Path] = []
        if self.output is not None and self.output.parent.is_dir():
            own_output_temp = temp_name_pattern(self.output.name)
            stale = [p for p in self.output.parent.iterdir() if own_output_temp.fullmatch(p.name)]
        for folder in (self.parts_dir, self.dir, self.shards_dir):
            if folder.is_dir():
                stale += [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
        for path in stale:
            path.unlink(missing_ok=True)
        sides = re.compile(re.escape(_side_name(self.dir.name, "")) + r"(?:new|trash)-\d+")
        if self.dir.parent.is_dir():
            for path in self.dir.parent.iterdir():
                if sides.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    stale.append(path)
        return len(stale)

    def committed(self, damaged: list[Path] | None = None) -> CommittedIndex:
        """Read the key index of every committed part, touching nothing.

        A part that cannot be read raises StateError before anything changes: its rows may be the only
        record of work done, so it is never skipped or set aside behind the user's back. A reader that
        only reports (`caprl status`) passes `damaged` to get the index of the readable parts and the
        unreadable ones listed there instead. A part that vanished after it was listed (a run merging
        meanwhile) raises PartsChanged: list again.
        """
        tables: list[pa.Table] = []
        parts: list[Path] = []
        for path in self.part_paths():
            try:
                with pq.ParquetFile(path) as parquet:
                    table = read_index_columns(parquet)
            except FileNotFoundError:
                raise PartsChanged(f"state part {path} was removed while it was read") from None
            except Exception as exc:
                if damaged is None:
                    raise unreadable_part_error(path, self.label, exc) from None
                damaged.append(path)
                continue
            index = len(parts)
            parts.append(path)
            tables.append(
                table.append_column("part", pa.array(np.full(table.num_rows, index, dtype=np.int32)))
                .append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            )
        if not tables:
            return CommittedIndex.empty()
        every = pa.concat_tables(tables, promote_options="permissive")
        every = every.append_column("order", pa.array(np.arange(every.num_rows, dtype=np.int64)))
        newest = every.group_by("key", use_threads=False).aggregate([("order", "max")])
        latest = every.take(newest["order_max"]).drop_columns(["order"])
        return CommittedIndex(parts=parts, latest=latest)

    # -- merge bookkeeping and run records --------------------------------------------------------

    def output_is_current(self, parts: list[Path], published: bool | None = None) -> bool:
        """True if the output exists (`published`; default: the output file exists) and was built
        from exactly these parts."""
        if published is None:
            published = self.output is not None and self.output.exists()
        return published and self.merged_parts() == [part.name for part in parts]

    def merged_parts(self) -> list[str] | None:
        """Names of the parts the output was last built from; None if it never was."""
        if not self.merged_path.is_file():
            return None
        return json.loads(self.merged_path.read_text(encoding="utf-8")).get("parts")

    def record_merge(self, parts: list[Path]) -> None:
        write_json_atomically(self.merged_path, {"parts": [part.name for part in parts]})

    def record_run(self, run_id: str, record: dict[str, Any]) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.runs_dir / record_name(self.runs_dir, run_id), record)

    def record_finished_shards(self, run_id: str, shards: dict[str, dict[str, int]]) -> None:
        """Shards this run read to the end, with a row for every sample (source -> counts)."""
        if shards:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.shards_dir / record_name(self.shards_dir, run_id), shards)

    def finished_shards(self) -> dict[str, dict[str, int]]:
        """Every shard some run finished; a later record of a shard replaces an earlier one."""
        finished: dict[str, dict[str, int]] = {}
        records = sorted(self.shards_dir.glob("*.json"), key=record_order) if self.shards_dir.is_dir() else []
        for path in records:
            try:
                finished.update(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                log.warning("ignored unreadable shard record %s; its shards will be read again", path.name)
        return finished

    def last_run(self) -> dict[str, Any] | None:
        records = sorted(self.runs_dir.glob("*.json"), key=record_order) if self.runs_dir.is_dir() else []
        for path in reversed(records):
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        return None
