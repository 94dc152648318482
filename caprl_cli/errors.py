"""The two ways things go wrong: a user mistake (exit 2) or one bad sample (an error row).

A run over millions of images must never stop for one bad file, so per-sample failures are values
(`SampleError`) that become rows, while mistakes in how the tool was called are `UsageError`, which the
CLI turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """The fixed set of reasons a sample becomes an error row (the `<kind>` in `error`)."""

    DECODE = "decode"  # empty, truncated or not an image at all
    TOO_LARGE = "too_large"  # more pixels than --max-image-pixels: never decoded
    ASPECT_RATIO = "aspect_ratio"  # longer side over 200x the shorter: the model refuses it
    READ = "read"  # the file could not be read (permissions, vanished)
    ENGINE = "engine"  # the engine failed on this one request
    SHARD = "shard"  # a tar shard is damaged, or one of its samples is malformed (no image, duplicates)
    UNSAFE = "unsafe"  # a shard member that could escape a folder or is no plain file: never read
    MANIFEST = "manifest"  # a manifest line or row that names no image


class UsageError(Exception):
    """A mistake in how caprl was called: reported as one line, exit code 2."""


class OutputLocked(Exception):
    """Another run is writing the same output: exit code 75 (EX_TEMPFAIL), try again later."""


class SampleError(Exception):
    """One sample cannot be captioned; carries the kind that goes into its error row."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return format_error(self.kind, self.message)


def format_error(kind: ErrorKind, message: str) -> str:
    """Render the `error` column: `<kind>: <message>` on one line."""
    one_line = " ".join(str(message).split())
    return f"{kind.value}: {one_line}"
