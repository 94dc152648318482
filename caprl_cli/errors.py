"""How things go wrong: one bad sample (an error row) or a run that cannot go on (an exit code).

A run over millions of images must never stop for one bad file, so per-sample failures are values
(`SampleError`) that become rows. Everything that ends a run is a `CaprlError` whose class carries its
exit code; the CLI turns it into one line on stderr and that code (the table is in `exit_codes`).
"""

from __future__ import annotations

from enum import Enum

from caprl_cli import exit_codes


class ErrorKind(str, Enum):
    """The fixed set of reasons a sample becomes an error row (the `<kind>` in `error`)."""

    DECODE = "decode"  # empty, truncated or not an image at all
    # Reading and decoding took longer than --decode-timeout: the worker was killed and replaced. Final
    # until --retry-errors (with a longer timeout): a file that took that long will do it again.
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"  # more pixels than --max-image-pixels, or bytes than --max-image-bytes: never decoded
    ASPECT_RATIO = "aspect_ratio"  # longer side over 200x the shorter: the model refuses it
    READ = "read"  # the file could not be read (permissions, vanished)
    ENGINE = "engine"  # the engine failed on this one request
    SHARD = "shard"  # a tar shard is damaged, or one of its samples is malformed (no image, duplicates)
    UNSAFE = "unsafe"  # a shard member that could escape a folder or is no plain file: never read
    MANIFEST = "manifest"  # a manifest line or row that names no image
    CONFLICT = "conflict"  # a different image under a key already committed from another source
    # A remote read still failing transiently after --retries (timeout, reset, 429/5xx, expired
    # credentials): not final, the next plain run tries it again and its row replaces this one.
    UNAVAILABLE = "unavailable"


class CaprlError(Exception):
    """A run cannot go on: reported as one line on stderr with this class's exit code."""

    exit_code = exit_codes.FAILED


class UsageError(CaprlError):
    """A mistake in how caprl was called, found before any work started: exit code 2, nothing changed."""

    exit_code = exit_codes.USAGE


class OutputLocked(CaprlError):
    """Another run is writing the same output: exit code 75 (EX_TEMPFAIL), try again later."""

    exit_code = exit_codes.LOCKED


class StateError(CaprlError):
    """The state folder cannot be trusted (an unreadable part): exit code 1 before anything changes."""


class ModelUnavailable(CaprlError):
    """The model could not be fetched (offline and not cached, the hub unreachable, no access): exit
    code 1, since it may well work later; the run's committed parts are kept."""


class EngineStartError(CaprlError):
    """The engine could not be started (bad weights, unsupported model, out of memory): exit code 1."""


class DecodeWorkersError(CaprlError):
    """Image decoding workers die before they ever start (a broken environment): exit code 1, rather
    than an error row for every image that only --retry-errors would undo."""


class SampleError(Exception):
    """One sample cannot be captioned; carries the kind that goes into its error row."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return format_error(self.kind, self.message)


def format_error(kind: ErrorKind, message: str) -> str:
    """Render the `error` column: `<kind>: <message>` on one line, with the bytes of a non-UTF-8 file
    name in it as `%XX`, so any output format can store it."""
    from caprl_cli.inputs.sample import printable_text  # inputs.sample imports this module

    one_line = printable_text(" ".join(str(message).split()))
    return f"{kind.value}: {one_line}"
