"""Read one image's encoded bytes, never more than a cap, or say why not.

A corpus scraped from anywhere holds files nobody expected: a 3 GB sparse `huge.jpg`, a file that keeps
growing while it is read, a server that sends more than its Content-Length said, a FIFO named in a list.
None of them may take a worker's memory or time: the size is checked before reading when it is known
(a stat, a Content-Length), and the read itself stops one byte past the cap whatever the size claimed,
so an image over `max_bytes` is `too_large` without ever being held whole. Only regular files are
opened: opening a FIFO would wait for a writer forever.
"""

from __future__ import annotations

import os
import stat
from typing import IO

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.defaults import DEFAULT_RETRIES
from caprl_cli.inputs.retry import is_transient, with_retries
from caprl_cli.inputs.sample import DEFAULT_MAX_IMAGE_BYTES, Sample
from caprl_cli.storage import StorageOptions, is_url, local_path_of, open_input, redact

_CHUNK = 1 << 20  # one read call asks for at most this much: a stream hands out what it has
_NOT_REGULAR = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def read_sample_bytes(
    sample: Sample,
    storage_options: StorageOptions | None = None,
    retries: int = DEFAULT_RETRIES,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> bytes:
    """The encoded image: in memory already, or read from its path or URL, at most `max_bytes`.

    A URL that fails transiently is tried `retries` more times; if it still fails the sample is
    UNAVAILABLE (tried again by the next run), not READ. Local files are read once."""
    if sample.data is not None:
        if len(sample.data) > max_bytes:
            raise SampleError(ErrorKind.TOO_LARGE, _over(len(sample.data), max_bytes))
        return sample.data
    if sample.path is None:
        raise SampleError(ErrorKind.READ, "sample has neither bytes nor a path")
    path = sample.path
    try:
        local = local_path_of(path)
        if local is not None:
            return _read_local(str(local), max_bytes)
        return with_retries(lambda: _read_remote(path, storage_options, max_bytes), retries)
    except SampleError:
        raise
    except Exception as exc:
        if is_url(path) and is_transient(exc):
            raise SampleError(
                ErrorKind.UNAVAILABLE, redact(f"cannot read {path} (tried {retries + 1} times): {_described(exc)}")
            ) from None
        if not isinstance(exc, OSError):  # remote backends raise their own types (HTTP errors)
            raise SampleError(ErrorKind.READ, redact(f"cannot read {path}: {type(exc).__name__}: {exc}")) from None
        detail = exc.strerror or exc
        raise SampleError(ErrorKind.READ, redact(f"cannot read {path}: {detail}")) from None


def _read_local(path: str, max_bytes: int) -> bytes:
    """A regular file's bytes: refused by its size before opening, and read only up to the cap."""
    info = os.stat(path)
    kind = _NOT_REGULAR.get(stat.S_IFMT(info.st_mode))
    if kind is not None or not stat.S_ISREG(info.st_mode):
        raise SampleError(ErrorKind.READ, f"cannot read {path}: not a regular file ({kind or 'special file'})")
    if info.st_size > max_bytes:
        raise SampleError(ErrorKind.TOO_LARGE, _over(info.st_size, max_bytes))
    # Opened without blocking and checked again on the open file: a file swapped for a FIFO since
    # the stat above can still never hold the worker.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SampleError(ErrorKind.READ, f"cannot read {path}: not a regular file")
        os.set_blocking(fd, True)
        return read_capped(handle, max_bytes)


def _read_remote(location: str, options: StorageOptions | None, max_bytes: int) -> bytes:
    """A URL's bytes: refused by the size the backend reports, if any, and read only up to the cap."""
    with open_input(location, options) as handle:
        size = getattr(handle, "size", None)
        if isinstance(size, int) and size > max_bytes:
            raise SampleError(ErrorKind.TOO_LARGE, _over(size, max_bytes))
        return read_capped(handle, max_bytes)


def read_capped(handle: IO[bytes], max_bytes: int) -> bytes:
    """Everything `handle` holds, or `too_large` as soon as it has given more than `max_bytes`: the
    size a file or server claimed is not trusted, at most `max_bytes + 1` bytes are ever held."""
    parts: list[bytes] = []
    total = 0
    while total <= max_bytes:
        chunk = handle.read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
    raise SampleError(ErrorKind.TOO_LARGE, f"more than {max_bytes} bytes, over the cap (--max-image-bytes); not read further")


def _over(size: int, max_bytes: int) -> str:
    return f"{size} bytes, over the cap of {max_bytes} (--max-image-bytes); never read"


def _described(exc: BaseException) -> str:
    """The exception and, when a backend wrapped it (fsspec turns a 503 into FileNotFoundError), its
    cause: the 503 is what the user needs to see."""
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    return text if cause is None else f"{text} ({type(cause).__name__}: {cause})"
