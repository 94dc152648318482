"""JSONL and Parquet manifests that list images: one sample per record, read as a stream.

Large corpora (CapRL-2M among them) ship as a manifest of image paths plus per-image columns, not as a
folder. A manifest can hold millions of records on object storage, so it is read line by line or batch
by batch, never whole. A bad record never stops the run: it becomes a MANIFEST error sample keyed by its
line or row number. Only a manifest that cannot be read at all, or names no image column, is a usage
error; one that breaks off part-way (or fails to open transiently) ends in one error sample keyed
`<manifest name>@<line or row>`, `unavailable` when the failure was transient. Duplicate image values yield duplicate samples; the caller dedupes.

A sample's key is the image value as written (a URL by its `url_identity`: a signed query changes from
run to run, a key must not); an image embedded as bytes (a `datasets` Image struct) is keyed by its
stored path, else `<manifest name>#<row>`, and its source is `<manifest>#<row>`. Its signature is a
stat of a local image path, or a short hash of embedded bytes.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import posixpath
import zlib
from collections.abc import Iterator
from typing import IO, Any

from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.defaults import DEFAULT_RETRIES
from caprl_cli.inputs.retry import is_transient, with_retries
from caprl_cli.inputs.sample import Sample, content_signature, image_ext, is_image_name, path_signature
from caprl_cli.storage import StorageOptions, is_url, join, local_path_of, open_input, path_part, redact, url_identity

DEFAULT_IMAGE_COLUMNS = ("image", "image_path", "path", "url", "file_name")
MANIFEST_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_CHUNK = 1 << 20
_BATCH_ROWS = 4096


def is_manifest_name(name: str) -> bool:
    """True for `.jsonl`, `.jsonl.gz` and `.parquet` names in any case (a URL by its path alone)."""
    return path_part(name).lower().endswith(MANIFEST_SUFFIXES)


def manifest_name(location: str) -> str:
    """The manifest's file name: what its error rows are keyed by (`<name>#<line>`, `<name>@<line>`)."""
    return posixpath.basename(path_part(location)) or location


def manifest_samples(
    location: str,
    *,
    image_column: str | None = None,
    image_root: str | None = None,
    keep_meta: bool = True,
    options: StorageOptions | None = None,
    retries: int = DEFAULT_RETRIES,
    strict: bool = False,
) -> Iterator[Sample]:
    """One sample per record of the manifest at `location` (a local path or an fsspec URL), in order.

    Relative image values resolve against `image_root`, else the manifest's own folder; absolute paths
    and URLs are used as written. With `keep_meta`, the record's other columns become the sample's meta:
    bytes are left out (binary blobs do not belong in JSON text), other values JSON cannot hold
    (timestamps, decimals) become strings, NaN and infinities become null.

    A remote manifest that fails to open transiently is tried `retries` more times. A failure to read
    ends the manifest with one error sample keyed `<name>@<line or row>` (`@0`: it did not open; the
    records before it stand): UNAVAILABLE when it failed transiently, MANIFEST otherwise; a manifest
    without the image column is one MANIFEST error sample too. With `strict` (the check before any
    work starts, see `check_manifest`), a manifest unreadable for good from its start or without the
    image column is a usage error instead.
    """
    name = manifest_name(location)
    root = image_root if image_root is not None else _folder_of(location)
    if not is_url(root):
        root = os.path.abspath(os.path.expanduser(root))
    parquet = path_part(location).lower().endswith(".parquet")
    retries = retries if is_url(location) else 0
    records = (
        _parquet_records(location, options, image_column, keep_meta, retries)
        if parquet
        else _jsonl_records(location, options, retries)
    )
    column = None
    started, n = False, 0
    try:
        for n, record, problem in records:
            started = True
            if record is None:
                yield _error(location, name, n, problem or "unreadable record")
                continue
            if column is None:
                try:
                    column = _pick_column(record, image_column, location)
                except UsageError as missing:
                    if strict:
                        raise
                    yield Sample(key=f"{name}@{n}", source=redact(location), error_kind=ErrorKind.MANIFEST,
                                 error_message=str(missing))
                    return
            if n:  # row 0 is a Parquet schema, not a record
                yield _sample(location, name, n, record, column, root, keep_meta)
    except _ReadFailure as failure:
        if strict and not started and not failure.transient:
            raise UsageError(f"cannot read manifest {redact(location)}: {failure.reason}") from None
        yield _broken_off(location, name, n + 1 if started else 0, failure, retries)


def check_manifest(
    location: str,
    *,
    image_column: str | None = None,
    options: StorageOptions | None = None,
    retries: int = DEFAULT_RETRIES,
) -> None:
    """Read a manifest's first record before any work starts: one that cannot be read at all, or has
    no image column, is a usage error now (exit 2, nothing changed) rather than a failure after other
    inputs were captioned. A transient failure is left to the run, which retries it."""
    records = manifest_samples(location, image_column=image_column, options=options, retries=retries, strict=True)
    try:
        next(records, None)
    finally:
        records.close()


class _ReadFailure(Exception):
    """Reading the manifest failed: `reason` (safe to show), and whether it may work next time."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def _broken_off(location: str, name: str, position: int, failure: _ReadFailure, retries: int) -> Sample:
    """The error sample where reading stopped (`<name>@<line or row>`; 0: it did not open)."""
    where = "could not be opened" if position == 0 else f"broke off at line or row {position}"
    if failure.transient:
        message = f"manifest {redact(location)} {where} (tried {retries + 1} times; the next run reads it again)"
    else:
        message = f"manifest {redact(location)} {where}"
    return Sample(
        key=f"{name}@{position}",
        source=redact(location),
        error_kind=ErrorKind.UNAVAILABLE if failure.transient else ErrorKind.MANIFEST,
        error_message=f"{message}: {failure.reason}",
    )


def _pick_column(record: dict[str, Any], wanted: str | None, location: str) -> str:
    """The image column: `wanted` when given, else the first default one the record has."""
    candidates = (wanted,) if wanted is not None else DEFAULT_IMAGE_COLUMNS
    for candidate in candidates:
        if candidate in record:
            return candidate
    looked = repr(wanted) if wanted is not None else "any of " + ", ".join(DEFAULT_IMAGE_COLUMNS)
    columns = ", ".join(map(str, record)) or "none"
    raise UsageError(f"manifest {redact(location)} has no image column ({looked}); its columns: {columns}")


def _sample(location: str, name: str, n: int, record: dict, column: str, root: str, keep_meta: bool) -> Sample:
    """The sample for one record whose image is in `column`, or a MANIFEST error sample."""
    value = record.get(column)
    meta = _meta(record, column) if keep_meta else None
    if isinstance(value, dict):
        data, value = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            key = value if isinstance(value, str) and value else f"{name}#{n}"
            source = f"{redact(location)}#{n}"
            signature = content_signature(bytes(data))
            return Sample(key=key, source=source, data=bytes(data), meta=meta, ext=_ext(key), signature=signature)
    if not isinstance(value, str) or not value.strip():
        return _error(location, name, n, f"record has no image path in column {column!r}")
    path = join(root, value)
    key = url_identity(value) if is_url(value) else value
    local = local_path_of(path)
    signature = path_signature(local) if local is not None else None
    return Sample(key=key, source=redact(path), path=path, meta=meta, ext=_ext(value), signature=signature)


def _meta(record: dict[str, Any], column: str) -> str | None:
    """The record's other columns as JSON text, in record order; None when nothing is left."""
    other = {key: _plain(value) for key, value in record.items() if key != column and not _is_blob(value)}
    return json.dumps(other, ensure_ascii=False) if other else None


def _is_blob(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _plain(value: Any) -> Any:
    """`value` as something JSON holds: blobs dropped, NaN as null, other oddities as strings."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items() if not _is_blob(item)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value if not _is_blob(item)]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _error(location: str, name: str, n: int, message: str) -> Sample:
    return Sample(key=f"{name}#{n}", source=redact(location), error_kind=ErrorKind.MANIFEST, error_message=message)


def _jsonl_records(
    location: str, options: StorageOptions | None, retries: int
) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record, None) per non-blank line, or (line number, None, what is wrong with it)."""
    for n, raw in enumerate(_lines(location, options, retries), start=1):
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            record = json.loads(text) if text else None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            yield n, None, f"line is not valid JSON: {str(exc)[:200]}"
            continue
        if isinstance(record, dict):
            yield n, record, None
        elif text:
            yield n, None, f"line holds a JSON {type(record).__name__}, not an object"


def _lines(location: str, options: StorageOptions | None, retries: int) -> Iterator[bytes]:
    """The manifest's raw lines, read in chunks: streamed HTTP files cannot seek back for readline.
    A chunk that fails is not read again: a broken stream cannot resume where it stopped."""
    with _opened(location, options, stream=True, retries=retries) as raw:
        handle: IO[bytes] = gzip.GzipFile(fileobj=raw) if path_part(location).lower().endswith(".gz") else raw
        pending = b""
        while True:
            chunk = _guarded(location, handle.read, _CHUNK)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            yield from complete
        if pending:
            yield pending


def _parquet_records(
    location: str, options: StorageOptions | None, wanted: str | None, keep_meta: bool, retries: int
) -> Iterator[tuple[int, dict | None, str | None]]:
    """(0, the schema as an empty record) first, then (row number, row, None) batch by batch; without
    meta only the image column is read."""
    import pyarrow.parquet as pq

    with _opened(location, options, stream=False, retries=retries) as handle:
        parquet = _guarded(location, pq.ParquetFile, handle)
        schema = dict.fromkeys(parquet.schema_arrow.names)
        yield 0, schema, None
        columns = None if keep_meta else [_pick_column(schema, wanted, location)]
        batches = _guarded(location, parquet.iter_batches, batch_size=_BATCH_ROWS, columns=columns)
        n = 0
        while (batch := _guarded(location, next, batches, None)) is not None:
            for row in batch.to_pylist():
                n += 1
                yield n, row, None


def _opened(location: str, options: StorageOptions | None, stream: bool, retries: int) -> IO[bytes]:
    """The open manifest; a transient failure to open is tried `retries` more times."""
    return _guarded(location, with_retries, lambda: open_input(location, options, stream), retries)


def _guarded(location: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call(*args)`, with any failure to read the manifest turned into a `_ReadFailure`."""
    import pyarrow as pa

    try:
        return call(*args, **kwargs)
    except Exception as exc:
        transient = is_transient(exc)
        if not transient and not isinstance(exc, (OSError, EOFError, zlib.error, pa.ArrowException)):
            raise
        # Backends put the raw path (query and all) into their messages: only Arrow's, about content, pass.
        reason = str(exc) if isinstance(exc, pa.ArrowException) else getattr(exc, "strerror", None)
        cause = exc.__cause__
        if reason is None and cause is not None and is_transient(cause):
            reason = redact(f"{type(cause).__name__}: {cause}")  # the 503 behind fsspec's FileNotFoundError
        raise _ReadFailure(reason or type(exc).__name__, transient) from None


def _folder_of(location: str) -> str:
    """The folder a manifest sits in: a local directory, or a URL without its query and file name."""
    if not is_url(location):
        return os.path.dirname(os.path.expanduser(location)) or "."
    return location.split("?", 1)[0].rsplit("/", 1)[0]


def _ext(value: str) -> str | None:
    """The image extension of a path or URL, lowercased and without the dot; None when it has none."""
    name = path_part(value)
    return image_ext(name) if is_image_name(name) else None
