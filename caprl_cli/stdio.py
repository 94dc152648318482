"""stdout and stderr that a reader gone away (`caprl caption ... 2>&1 | head -1`) cannot turn into a failure.

Once the reading end of a pipe is closed, every later write to it raises BrokenPipeError (Python
ignores SIGPIPE). What caprl writes there (log lines, progress, the closing line) was for a reader that
has left, so it is dropped, and the run's work and exit code stay what they were. A stream found broken
has its file descriptor pointed at /dev/null, as the Python documentation recommends, so that nothing
written later, nor the flush at interpreter exit, can fail again or print a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import TextIO


def is_broken_pipe(exc: BaseException | None) -> bool:
    """Whether `exc` says the reader of a pipe or socket has gone (EPIPE)."""
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def silence(stream: TextIO) -> None:
    """Point `stream`'s file descriptor at /dev/null: later writes and flushes succeed, unseen."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def say(text: str, err: bool = True) -> None:
    """Write one line to stderr (or stdout); dropped without a word if nobody reads it any more."""
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except OSError as exc:
        if not is_broken_pipe(exc):
            raise
        silence(stream)


def settle() -> None:
    """Flush stdout and stderr before exiting; a broken one is silenced so Python's own flush at exit
    does not fail (which would print a traceback and change the exit code to 120)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except OSError as exc:
            if not is_broken_pipe(exc):
                raise
            silence(stream)
            try:
                stream.flush()  # the data left in the buffer goes to /dev/null now
            except OSError:
                pass


class PipeSafeHandler(logging.StreamHandler):
    """A StreamHandler that goes quiet when its reader has gone, instead of printing a logging error
    with a traceback for every later line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if is_broken_pipe(sys.exc_info()[1]):
            silence(self.stream)
            return
        super().handleError(record)
