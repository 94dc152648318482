"""Every kind of INPUT a corpus builder has, turned into two things: listed samples and streams.

Folders (local or remote), image files, image URLs and file lists are *listed*: each image is one
small `Sample` known up front, sorted by key, so planning is one vectorised lookup. WebDataset shards
and manifests are *streamed*: their samples are only known by reading them front to back, which for a
remote shard is a download, so they are read once, lazily, while the engine runs (see `plan.py`).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.inputs.sample import Sample, image_ext, is_image_name, name_text, printable_text, stat_signature
from caprl_cli.inputs.walk import UnreadableFolder, WalkSkips, special_file_kind, walk_images
from caprl_cli.inputs.locations import expand_shard_spec, read_file_list, walk_remote_folder
from caprl_cli.inputs.manifests import check_manifest, is_manifest_name
from caprl_cli.inputs.shards import is_shard_name
from caprl_cli.storage import (
    StorageOptions,
    is_url,
    local_path_of,
    path_part,
    redact,
    require_backend,
    url_identity,
)

log = logging.getLogger("caprl")


@dataclass(frozen=True)
class ShardRef:
    """One tar shard: `url` opens it (it may carry credentials); `source` is what rows record."""

    url: str
    source: str


@dataclass(frozen=True)
class InputOptions:
    """How inputs are read: storage credentials, manifest columns, whether side data is kept."""

    storage_options: StorageOptions = field(default_factory=dict)
    files_from: str | None = None
    image_column: str | None = None
    image_root: str | None = None
    keep_meta: bool = True
    is_output: Callable[[Path], bool] = lambda path: False  # an output's own shards are never inputs


@dataclass
class InputSet:
    """What the inputs name: listed samples (sorted, unique keys), shards and manifests, in order."""

    listed: list[Sample] = field(default_factory=list)
    shards: list[ShardRef] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)

    @property
    def streams(self) -> int:
        return len(self.shards) + len(self.manifests)


def shard_ref(location: str) -> ShardRef:
    """A shard by location; local shards are recorded by absolute path, so a resumed run matches."""
    path = local_path_of(location)
    if path is not None:
        absolute = str(path.resolve())
        return ShardRef(url=absolute, source=name_text(absolute))
    return ShardRef(url=location, source=redact(location))


class InputResolver:
    """Resolves INPUT strings one by one into an `InputSet`; keys must stay unique across inputs."""

    def __init__(self, options: InputOptions, stdin: TextIO | None = None) -> None:
        self.options = options
        self.stdin = stdin or sys.stdin
        self.found = InputSet()
        self._by_key: dict[str, Sample] = {}
        self._shard_sources: set[str] = set()

    def resolve(self, inputs: list[str]) -> InputSet:
        entries = list(inputs)
        if self.options.files_from:
            entries.append("@" + self.options.files_from)
        for raw in entries:
            self.add(raw)
        self.found.listed = [self._by_key[key] for key in sorted(self._by_key)]
        return self.found

    def add(self, raw: str, listed_in: str | None = None) -> None:
        """One INPUT: `@LIST`, a shard spec, a manifest, a URL, a folder or an image file."""
        if raw.startswith("@") and listed_in is None:
            listing = raw[1:]
            for entry in read_file_list(listing, self.options.storage_options, stdin=self.stdin):
                self.add(entry, listed_in=listing)
            return
        require_backend(raw)
        shards = expand_shard_spec(raw)
        if shards is not None:
            missing = (
                len(shards) == 1
                and not is_url(shards[0])
                and not Path(shards[0]).expanduser().is_file()
                and _special_local_file(shards[0]) is None
            )
            if missing and listed_in is None:  # a list entry that is gone is an error row, not a refusal
                raise UsageError(f"shard {raw} does not exist")
            for shard in shards:
                special = _special_local_file(shard)
                if special is None:
                    self.add_shard(shard_ref(shard))
                    continue
                # A FIFO or device named as a shard is never opened (a FIFO would block forever).
                source = name_text(str(Path(shard).expanduser().resolve()))  # as `shard_ref` records it
                message = f"not a regular file ({special}): {printable_text(shard)}"
                self.add_sample(
                    Sample(key=f"{source}@0", source=source, path=shard, error_kind=ErrorKind.READ, error_message=message)
                )
        elif is_manifest_name(raw):
            if not is_url(raw) and not Path(raw).expanduser().is_file():
                raise UsageError(f"manifest {raw} does not exist")
            if raw not in self.found.manifests:  # named twice: read once
                check_manifest(raw, image_column=self.options.image_column, options=self.options.storage_options)
                self.found.manifests.append(raw)
        elif is_url(raw):
            self.add_url(raw, listed_in)
        else:
            self.add_local(raw, listed_in)

    def add_url(self, url: str, listed_in: str | None) -> None:
        name = path_part(url)
        if is_image_name(name):
            # Keyed by what the URL names (distinct objects stay distinct, a re-signed one keeps its
            # key), recorded with its secrets hidden; nothing cheap tells its content, so no signature.
            self.add_sample(Sample(key=url_identity(url), source=redact(url), path=url, ext=image_ext(name)))
            return
        images, shards = walk_remote_folder(url, self.options.storage_options)
        if not images and not shards:
            log.warning("no images or shards found in %s", redact(url))
        for entry in images:
            self.add_sample(
                Sample(
                    key=entry.key,
                    source=redact(entry.url),
                    path=entry.url,
                    ext=image_ext(entry.key),
                    signature=entry.signature,
                )
            )
        for entry in shards:
            self.add_shard(shard_ref(entry.url))

    def add_local(self, raw: str, listed_in: str | None) -> None:
        """A local folder (walked), an image file, or a list entry. Each is stat'ed before anything
        is opened: a FIFO, socket or device named directly is a `read` row, never opened (opening a
        FIFO blocks forever). Keys and sources hold the text form of names (`name_text`); `path`
        keeps the real name the file is read by."""
        path = Path(raw).expanduser()
        where = printable_text(f" (listed in {listed_in})" if listed_in else "")
        info = _stat_or_none(path)
        if info is not None and stat.S_ISDIR(info.st_mode):
            self.add_folder(path)
            return
        special = special_file_kind(info.st_mode) if info is not None else None
        if info is not None and special is None and is_image_name(path.name):
            source = str(path.resolve())
            # An image named on the command line is keyed by its name; one in a list by the line itself.
            key = raw if listed_in else path.name
            self.add_sample(
                Sample(
                    key=name_text(key),
                    source=name_text(source),
                    path=str(path),
                    ext=image_ext(path.name),
                    signature=stat_signature(info),
                )
            )
        elif special is not None and (listed_in is not None or is_image_name(path.name)):
            key = raw if listed_in else path.name
            self.add_sample(
                Sample(
                    key=name_text(key),
                    source=name_text(str(path.absolute())),
                    path=str(path),
                    ext=image_ext(path.name) or None,
                    error_kind=ErrorKind.READ,
                    error_message=f"not a regular file ({special}): {printable_text(str(path))}",
                )
            )
        elif listed_in is not None:
            # A list of a million paths names a few that are gone or are no images: each becomes an
            # error row (read or decode) when it is read, and the run goes on.
            source = name_text(str(path.absolute()))
            self.add_sample(Sample(key=name_text(raw), source=source, path=str(path), ext=image_ext(path.name) or None))
        elif info is not None:
            raise UsageError(f"{printable_text(raw)}{where} is not a folder, image, shard or manifest")
        else:
            raise UsageError(f"input {printable_text(raw)}{where} does not exist")

    def add_folder(self, path: Path) -> None:
        """Every image and shard under a local folder; a subfolder that cannot be listed is one `read`
        row keyed by its relative path with a trailing `/`; skipped entries are counted in one warning."""
        base = path.resolve()
        skips = WalkSkips()
        unreadable = 0
        for found in walk_images(path, wanted=lambda name: is_image_name(name) or is_shard_name(name), skips=skips):
            relative = found.path.relative_to(path).as_posix()
            if isinstance(found, UnreadableFolder):
                unreadable += 1
                self.add_sample(
                    Sample(
                        key=name_text(relative) + "/",
                        source=name_text(str(base / relative)) + "/",
                        path=str(found.path),  # a local place (never read: the row is made up front)
                        error_kind=ErrorKind.READ,
                        error_message=f"{found.reason}: {printable_text(str(base / relative))}",
                    )
                )
                continue
            if self.options.is_output(found.path):
                continue
            if is_shard_name(found.path.name):
                self.add_shard(shard_ref(str(found.path)))
            else:
                source = str(base / relative)
                self.add_sample(
                    Sample(
                        key=name_text(relative),
                        source=name_text(source),
                        path=source,
                        ext=image_ext(found.path.name),
                        signature=found.signature,
                    )
                )
        shown = printable_text(str(path))
        if unreadable:
            log.warning(
                "%d folder%s under %s cannot be listed; each is one read error row (key ending in /)",
                unreadable,
                "" if unreadable == 1 else "s",
                shown,
            )
        if skips:
            log.warning("skipped under %s: %s (never opened; see README)", shown, skips.described())

    def add_shard(self, shard: ShardRef) -> None:
        """A shard named twice (a folder and one of its shards, say) is read once."""
        if shard.source not in self._shard_sources:
            self._shard_sources.add(shard.source)
            self.found.shards.append(shard)

    def add_sample(self, sample: Sample) -> None:
        seen = self._by_key.get(sample.key)
        if seen is not None and seen.source != sample.source:
            raise UsageError(
                f"key {sample.key!r} names both {seen.source} and {sample.source}; "
                "caption these inputs into separate outputs"
            )
        self._by_key[sample.key] = sample


def _stat_or_none(path: Path) -> os.stat_result | None:
    """The stat of `path` (following links); None when it cannot be stat'ed (gone, a loop)."""
    try:
        return path.stat()
    except OSError:
        return None


def _special_local_file(location: str) -> str | None:
    """`FIFO`, `socket` or `device` when `location` is a local path to one of those, else None."""
    if is_url(location):
        return None
    info = _stat_or_none(Path(location).expanduser())
    return special_file_kind(info.st_mode) if info is not None and not stat.S_ISDIR(info.st_mode) else None


def resolve_inputs(inputs: list[str], options: InputOptions | None = None, stdin: TextIO | None = None) -> InputSet:
    """All INPUTs (and `--files-from`) as listed samples, shards and manifests."""
    return InputResolver(options or InputOptions(), stdin).resolve(inputs)


def list_samples(inputs: list[str]) -> list[Sample]:
    """The listed samples of local folders and images, sorted by key (shards and manifests aside)."""
    return resolve_inputs(inputs).listed
