"""The state folder beside an output: the only record of what is done, safe against any crash.

`out.parquet` keeps its state in `out.parquet.caprl/`:

    lock               flock'ed by the run that owns the folder (the kernel drops it when it dies)
    fingerprint.json   the settings that decide captions; a run with other settings is refused
    parts/part-*.parquet   committed rows, each file written under a temporary name, fsynced, renamed
    runs/*.json        one record per finished run (counts, throughput) for `caprl status`
    shards/*.json      tar shards read to the end with a row for every sample: never opened again
    merged.json        which parts the output was last built from

The committed parts are the truth: the output file is rebuilt from them, and what a run skips is what
they hold. A part is either complete under its final name or a temporary file that is ignored and
cleaned up, so a crash at any instant leaves nothing a later run could misread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caprl_cli.errors import OutputLocked
from caprl_cli.outputs.atomic import write_json_atomically
from caprl_cli.state.index import CommittedIndex

log = logging.getLogger("caprl")

STATE_SUFFIX = ".caprl"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
_INDEX_COLUMNS = ["key", "status", "error"]


def state_dir_for(output: Path) -> Path:
    """`out.parquet` -> `out.parquet.caprl`."""
    return output.with_name(output.name + STATE_SUFFIX)


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
        """Take the folder's flock; without `wait`, raise OutputLocked if another run holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.dir / "lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLocked(
                    f"another caprl run is writing {self.label} (state {self.dir} is locked); "
                    "pass --wait to wait for it"
                ) from None
            raise
        self._lock_handle = handle

    def release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # -- fingerprint ------------------------------------------------------------------------------

    def stored_fingerprint(self) -> dict[str, Any] | None:
        if not self.fingerprint_path.is_file():
            return None
        return json.loads(self.fingerprint_path.read_text(encoding="utf-8"))

    def write_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        write_json_atomically(self.fingerprint_path, fingerprint)

    # -- parts ------------------------------------------------------------------------------------

    def part_paths(self) -> list[Path]:
        """Committed parts, oldest first (names sort by creation time)."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(
            path for path in self.parts_dir.iterdir()
            if path.name.startswith(PART_PREFIX) and path.name.endswith(PART_SUFFIX)
        )

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed run left behind (only ever called under the lock).

        Beside the output only this output's own `.<name>.<pid>.tmp` files match, never those of
        another output whose name merely starts the same way.
        """
        stale: list[Path] = []
        if self.output is not None and self.output.parent.is_dir():
            own_output_temp = re.compile(re.escape(f".{self.output.name}.") + r"\d+" + re.escape(TEMP_SUFFIX))
            stale = [p for p in self.output.parent.iterdir() if own_output_temp.fullmatch(p.name)]
        for folder in (self.parts_dir, self.dir, self.shards_dir):
            if folder.is_dir():
                stale += [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def committed(self) -> CommittedIndex:
        """Read the key index of every committed part; an unreadable part is set aside, not trusted."""
        tables: list[pa.Table] = []
        parts: list[Path] = []
        for path in self.part_paths():
            try:
                with pq.ParquetFile(path) as parquet:
                    table = parquet.read(columns=_INDEX_COLUMNS)
            except Exception as exc:
                quarantined = path.with_name(path.name + ".unreadable")
                path.rename(quarantined)
                log.warning("set aside unreadable part %s (%s); its images will be captioned again", path.name, exc)
                continue
            index = len(parts)
            parts.append(path)
            tables.append(
                table.append_column("part", pa.array(np.full(table.num_rows, index, dtype=np.int32)))
                .append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            )
        if not tables:
            empty = pa.table(
                {
                    "key": pa.array([], pa.string()),
                    "status": pa.array([], pa.string()),
                    "error": pa.array([], pa.string()),
                    "part": pa.array([], pa.int32()),
                    "row": pa.array([], pa.int64()),
                }
            )
            return CommittedIndex(parts=[], latest=empty)
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
        write_json_atomically(self.runs_dir / f"{run_id}.json", record)

    def record_finished_shards(self, run_id: str, shards: dict[str, dict[str, int]]) -> None:
        """Shards this run read to the end, with a row for every sample (source -> counts)."""
        if shards:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.shards_dir / f"{run_id}.json", shards)

    def finished_shards(self) -> dict[str, dict[str, int]]:
        """Every shard some run finished; a later record of a shard replaces an earlier one."""
        finished: dict[str, dict[str, int]] = {}
        records = sorted(self.shards_dir.glob("*.json")) if self.shards_dir.is_dir() else []
        for path in records:
            try:
                finished.update(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                log.warning("ignored unreadable shard record %s; its shards will be read again", path.name)
        return finished

    def last_run(self) -> dict[str, Any] | None:
        records = sorted(self.runs_dir.glob("*.json")) if self.runs_dir.is_dir() else []
        for path in reversed(records):
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        return None

    def clear(self) -> None:
        """Forget everything (for --overwrite): parts, runs, fingerprint, and the output itself."""
        for folder in (self.parts_dir, self.runs_dir, self.shards_dir):
            shutil.rmtree(folder, ignore_errors=True)
        for path in (self.fingerprint_path, self.merged_path, self.output):
            if path is not None and not path.is_dir():
                path.unlink(missing_ok=True)
