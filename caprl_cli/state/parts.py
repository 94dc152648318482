"""Committed part files: finished rows reach disk every few seconds, each part atomically.

Rows are buffered and written as a new Parquet part when `flush_rows` rows (or `FLUSH_BYTES` of image
bytes, for parts that carry images) are waiting, and at least every `flush_seconds` by a background
timer, so a crash (kill -9, power loss) loses only the rows of the
last few seconds. A part is written under a temporary name, fsynced and renamed: it exists complete or
not at all. Each part takes the next sequence number of the state (`sequence`), so the order of parts
never depends on the clock.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from caprl_cli.faults import crash_point
from caprl_cli.outputs.rows import SCHEMA, Row
from caprl_cli.state.folder import TEMP_SUFFIX
from caprl_cli.state.sequence import next_sequence, part_name
from caprl_cli.outputs.atomic import fsync_rename
from caprl_cli.outputs.row_writers import rows_to_table

DEFAULT_FLUSH_ROWS = 1000
DEFAULT_FLUSH_SECONDS = 5.0
# Parts that carry original image bytes (WebDataset output) are cut at this size to bound memory.
FLUSH_BYTES = 64 * 1024 * 1024


def new_run_id() -> str:
    """A run id that says when and by which process a run started, for people reading part names and
    run records; which part is newer is decided by the parts' sequence numbers, never by this."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + f"-{os.getpid()}"


class PartWriter:
    """Buffers rows and commits them as numbered part files of one run."""

    def __init__(
        self,
        parts_dir: Path,
        run_id: str,
        flush_rows: int = DEFAULT_FLUSH_ROWS,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        schema: pa.Schema = SCHEMA,
    ) -> None:
        self.parts_dir = parts_dir
        self.schema = schema
        self._buffered_bytes = 0
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.written: list[Path] = []
        self.rows_written = 0
        self._buffer: list[Row] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._last_flush = time.monotonic()
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._flush_periodically, name="caprl-part-flush", daemon=True)
        self._timer.start()

    def add(self, row: Row) -> None:
        with self._lock:
            self._raise_timer_error()
            self._buffer.append(row)
            self._buffered_bytes += len(row.get("image") or b"")
            if len(self._buffer) >= self.flush_rows or self._buffered_bytes >= FLUSH_BYTES:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._raise_timer_error()
            self._flush_locked()

    def close(self) -> None:
        """Commit what is buffered and stop the timer."""
        self._closed.set()
        self._timer.join()
        self.flush()

    def _flush_periodically(self) -> None:
        while not self._closed.wait(self.flush_seconds / 4):
            with self._lock:
                if self._error is None and self._buffer and time.monotonic() - self._last_flush >= self.flush_seconds:
                    try:
                        self._flush_locked()
                    except BaseException as exc:  # e.g. disk full: surface it in the run's thread
                        self._error = exc

    def _raise_timer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        rows = self._buffer
        # The state's lock makes this run the only one committing parts, so the number stays ours.
        name = part_name(next_sequence(self.parts_dir), self.run_id, f"{next(self._numbers):09d}")
        final = self.parts_dir / name
        temp = self.parts_dir / f".{name}{TEMP_SUFFIX}"
        pq.write_table(rows_to_table(rows, self.schema), temp, compression="zstd")
        crash_point("part.temp")
        fsync_rename(temp, final)
        crash_point("part.renamed")
        self._buffer = []  # only now: rows of a failed write stay buffered for the next try
        self._buffered_bytes = 0
        self.written.append(final)
        self.rows_written += len(rows)
