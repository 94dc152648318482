"""Captions as WebDataset tar shards: `<key>.json` per row, `<key>.txt` and the original image per captioned one.

WebDataset groups tar members into samples by "directory plus basename up to the first dot", so caption
keys (`sub/cat.jpg`) are escaped injectively into member keys first. Every shard is built under a hidden
temporary name and only gets its real name once it holds all its samples, so a shard that exists under
its real name is complete: a resumed run can trust it, and a reader never sees half a tar.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from caprl_cli.errors import UsageError
from caprl_cli.outputs.rows import COLUMNS, STATUS_OK, Row
from caprl_cli.inputs.shards import split_member_name
from caprl_cli.storage import redact
from caprl_cli.outputs.atomic import fsync_rename, temp_path_for
from caprl_cli.outputs.folder import OutputFolder

DEFAULT_SHARD_PATTERN = "%06d.tar"
# One integer conversion (`%d` or zero-padded `%0Nd`, never space-padded), no other `%`, no folder, `.tar`.
_PATTERN = re.compile(r"^([^%/]*)%(?:0[1-9]\d*)?d([^%/]*\.tar)$")
# Members WebDataset skips as metadata when the name starts like this.
_WDS_META = re.compile(r"^__[^/]*__/")
_RESERVED_EXTS = frozenset({"json", "txt"})


def member_key(key: str) -> str:
    """`key` escaped so that WebDataset reads it back as one sample key; injective (it is %XX-decodable),
    and keys that are already safe (`000123`, `dir.v2/000123`, `a/b/c`) stay as they are."""
    if not key:
        raise ValueError("an empty key has no member name")
    # Escapes never contain "/" or ".", so the literal ones left are the real separators and dots.
    parts = "".join(_escape_char(key, i) for i in range(len(key))).split("/")
    last = len(parts) - 1
    escaped = "/".join(
        part.replace(".", "%2E") if index == last or part in (".", "..") else part for index, part in enumerate(parts)
    )
    return "%5F" + escaped[1:] if _WDS_META.match(escaped) else escaped


def _escape_char(key: str, i: int) -> str:
    ch = key[i]
    if ch == "%" or ch == "\\" or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
        return f"%{ord(ch):02X}"
    if ch == "/" and (i == 0 or i == len(key) - 1 or key[i - 1] == "/"):
        return "%2F"
    return ch


def validate_pattern(pattern: str) -> str:
    """`pattern` if it names shards with exactly one `%d`/`%0Nd` and ends in `.tar`, else a UsageError."""
    if not _PATTERN.match(pattern):
        raise UsageError(
            f"shard pattern {redact(pattern)!r} needs exactly one %d or %0Nd (e.g. {DEFAULT_SHARD_PATTERN}), "
            "no other %, no folder, and must end in .tar"
        )
    return pattern


def shard_name(pattern: str, number: int) -> str:
    """The file name of shard `number`: `"%06d.tar"` -> `000042.tar`."""
    return pattern % number


def split_output_pattern(output: str) -> tuple[str, str]:
    """`-o` as (directory, shard pattern): a folder (or anything ending in `/`) gets the default pattern; a
    last component with `%` or ending in `.tar` is the pattern itself, validated."""
    head, sep, last = output.rpartition("/")
    if output.endswith("/") or ("%" not in last and not last.endswith(".tar")):
        return output.rstrip("/") or output, DEFAULT_SHARD_PATTERN
    validate_pattern(last)
    if not sep:
        return ".", last
    return (head + "/" if head.endswith(":/") or not head else head), last


class _Place(OutputFolder):
    """A shard folder: a local path, or an fsspec filesystem and the path inside it."""

    def makedirs(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def build_path(self, name: str) -> Path:
        """Where shard `name` is built: a hidden sibling locally, a local temporary file otherwise."""
        if self.local is not None:
            return temp_path_for(self.local / name)
        handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")
        os.close(handle)
        return Path(path)

    def commit(self, built: Path, name: str) -> None:
        """Give the finished file `built` its real name, atomically (put to a hidden name, then mv)."""
        if self.local is not None:
            fsync_rename(built, self.local / name)
            return
        self.upload(built, name)


def _member(name: str, data: bytes, mtime: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def row_json(row: Row, columns: tuple[str, ...] = COLUMNS) -> dict[str, Any]:
    """The row as a JSON object in contract order (`columns`: with several captions per image, the list
    columns too), `meta` parsed (text that is not JSON stays text)."""
    document = {name: row.get(name) for name in columns}
    if isinstance(document["meta"], str):
        try:
            document["meta"] = json.loads(document["meta"])
        except ValueError:
            pass
    return document


def _image_ext(image_ext: str | None) -> str:
    ext = (image_ext or "jpg").lstrip(".").lower()
    if ext in _RESERVED_EXTS or not re.fullmatch(r"[a-z0-9]+", ext):
        raise ValueError(f"unusable image extension {image_ext!r}")
    return ext


class ShardSetWriter:
    """Samples into shards of `shard_size`, numbered from `first_number`; each appears only when whole."""

    def __init__(
        self, directory: str, pattern: str, *, first_number: int, shard_size: int, with_images: bool,
        storage_options: dict | None = None, columns: tuple[str, ...] = COLUMNS,
    ) -> None:
        if shard_size < 1:
            raise UsageError(f"shard size must be at least 1, got {shard_size}")
        self.pattern = validate_pattern(pattern)
        self.shard_size, self.with_images = shard_size, with_images
        self.columns = columns
        self.mtime = int(time.time())
        self._place = _Place.of(directory, storage_options)
        self._place.makedirs()
        self._number = first_number
        self._written: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._built: Path | None = None
        self._samples = 0

    def add(self, row: Row, image: bytes | None, image_ext: str | None) -> None:
        """Append one row (and, for a captioned row with `with_images`, its original image bytes)."""
        key = member_key(row["key"])
        members = [(f"{key}.json", json.dumps(row_json(row, self.columns), ensure_ascii=False).encode("utf-8"))]
        if row.get("status") == STATUS_OK:
            members.append((f"{key}.txt", (row.get("caption") or "").encode("utf-8")))
            if self.with_images and image is not None:
                members.append((f"{key}.{_image_ext(image_ext)}", image))
        tar = self._open_shard()
        for name, data in members:
            tar.addfile(*_member(name, data, self.mtime))
        self._samples += 1
        if self._samples >= self.shard_size:
            self._finish_shard()

    def close(self) -> list[str]:
        """Finish the last, partial shard; the names of all shards written, in order."""
        if self._tar is not None:
            self._finish_shard()
        return list(self._written)

    def abort(self) -> None:
        """Drop the shard under construction; finished shards stay (they are whole)."""
        if self._tar is not None:
            self._tar.close()
        if self._built is not None:
            self._built.unlink(missing_ok=True)
        self._tar, self._built, self._samples = None, None, 0

    def _open_shard(self) -> tarfile.TarFile:
        if self._tar is None:
            self._built = self._place.build_path(shard_name(self.pattern, self._number))
            self._tar = tarfile.open(self._built, "w", format=tarfile.PAX_FORMAT, encoding="utf-8")  # noqa: SIM115
        return self._tar

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._built is not None
        name = shard_name(self.pattern, self._number)
        self._tar.close()
        self._place.commit(self._built, name)
        self._written.append(name)
        self._tar, self._built, self._samples = None, None, 0
        self._number += 1


def shard_number(pattern: str, name: str) -> int | None:
    """The number of the shard `name` if `pattern` gives exactly that name, else None."""
    prefix, suffix = _PATTERN.match(validate_pattern(pattern)).groups()  # type: ignore[union-attr]
    match = re.fullmatch(re.escape(prefix) + r"(\d+)" + re.escape(suffix), name)
    if match and shard_name(pattern, int(match.group(1))) == name:
        return int(match.group(1))
    return None


def existing_shard_numbers(directory: str, pattern: str, storage_options: dict | None = None) -> list[int]:
    """Sorted numbers of the finished shards in `directory` whose names `pattern` gives exactly."""
    names = _Place.of(directory, storage_options).names()
    return sorted(number for number in (shard_number(pattern, name) for name in names) if number is not None)


def remove_stale_temporaries(directory: str, pattern: str, storage_options: dict | None = None) -> int:
    """Delete the hidden `.<shard>.<pid>.tmp` files a killed run left (only called under the run's lock)."""
    temporary = re.compile(r"\.(.+)\.\d+\.tmp")
    place = _Place.of(directory, storage_options)
    stale = [
        name for name in place.names()
        if (found := temporary.fullmatch(name)) and shard_number(pattern, found.group(1)) is not None
    ]
    for name in stale:
        place.remove(name)
    return len(stale)


def remove_shards(directory: str, pattern: str, numbers: Iterable[int], storage_options: dict | None = None) -> None:
    """Delete the given shards; missing ones are fine."""
    validate_pattern(pattern)
    place = _Place.of(directory, storage_options)
    for number in numbers:
        place.remove(shard_name(pattern, number))


def rewrite_without(directory: str, name: str, member_keys: set[str], storage_options: dict | None = None) -> int:
    """Rewrite finished shard `name` without the samples whose (escaped) keys are in `member_keys`,
    atomically; the number of samples dropped (0: the shard is left untouched)."""
    place = _Place.of(directory, storage_options)
    dropped: set[str] = set()
    built = place.build_path(name)
    try:
        with (
            place.open(name) as source,
            tarfile.open(fileobj=source, mode="r:") as old,
            tarfile.open(built, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as new,
        ):
            for info in old:
                split = split_member_name(info.name)
                if split is not None and split[0] in member_keys:
                    dropped.add(split[0])
                else:
                    new.addfile(info, old.extractfile(info) if info.isreg() else None)
        if dropped:
            place.commit(built, name)
    finally:
        built.unlink(missing_ok=True)
    return len(dropped)


def shard_documents(directory: str, name: str, storage_options: dict | None = None) -> Iterator[dict[str, Any]]:
    """The `.json` document of every sample in finished shard `name`, in shard order: each holds the
    whole row (`row_json`), which is what `caprl repair` rebuilds a lost state from."""
    place = _Place.of(directory, storage_options)
    with place.open(name) as source, tarfile.open(fileobj=source, mode="r|") as tar:
        for info in tar:
            split = split_member_name(info.name)
            if info.isreg() and split is not None and split[1] == "json":
                handle = tar.extractfile(info)
                assert handle is not None
                yield json.loads(handle.read().decode("utf-8"))


def shard_rows(
    directory: str, name: str, storage_options: dict | None = None
) -> Iterator[tuple[dict[str, Any], bytes | None, str | None]]:
    """Every sample of finished shard `name`, in shard order, as (its `.json` row, its image bytes or
    None, the image's extension or None): what `caprl gallery` shows, read front to back with one
    sample's bytes in memory at a time. Members outside the layout `ShardSetWriter` writes are skipped."""
    place = _Place.of(directory, storage_options)
    key: str | None = None
    document: dict[str, Any] | None = None
    image: tuple[bytes, str] | None = None
    with place.open(name) as source, tarfile.open(fileobj=source, mode="r|") as tar:
        for info in tar:
            split = split_member_name(info.name)
            if not info.isreg() or split is None:
                continue
            if split[0] != key:
                if document is not None:
                    yield document, *(image or (None, None))
                key, document, image = split[0], None, None
            if split[1] == "json":
                handle = tar.extractfile(info)
                assert handle is not None
                document = json.loads(handle.read().decode("utf-8"))
            elif split[1] not in _RESERVED_EXTS and image is None:
                handle = tar.extractfile(info)
                assert handle is not None
                image = (handle.read(), split[1])
            tar.members = []  # stream mode would otherwise keep every header of the shard
    if document is not None:
        yield document, *(image or (None, None))
