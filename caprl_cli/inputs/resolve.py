"""Every kind of INPUT a corpus builder has, turned into two things: listed samples and streams.

Folders (local or remote), image files, image URLs and file lists are *listed*: each image is one
small `Sample` known up front, sorted by key, so planning is one vectorised lookup. WebDataset shards
and manifests are *streamed*: their samples are only known by reading them front to back, which for a
remote shard is a download, so they are read once, lazily, while the engine runs (see `plan.py`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import Sample, image_ext, is_image_name, path_signature
from caprl_cli.inputs.walk import walk_images
from caprl_cli.inputs.locations import expand_shard_spec, read_file_list, walk_remote_folder
from caprl_cli.inputs.manifests import is_manifest_name
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
        return ShardRef(url=absolute, source=absolute)
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
            missing = len(shards) == 1 and not is_url(shards[0]) and not Path(shards[0]).expanduser().is_file()
            if missing and listed_in is None:  # a list entry that is gone is an error row, not a refusal
                raise UsageError(f"shard {raw} does not exist")
            for shard in shards:
                self.add_shard(shard_ref(shard))
        elif is_manifest_name(raw):
            if not is_url(raw) and not Path(raw).expanduser().is_file():
                raise UsageError(f"manifest {raw} does not exist")
            if raw not in self.found.manifests:  # named twice: read once
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
        path = Path(raw).expanduser()
        where = f" (listed in {listed_in})" if listed_in else ""
        if path.is_dir():
            base = path.resolve()
            for found in walk_images(path, wanted=lambda name: is_image_name(name) or is_shard_name(name)):
                relative = found.path.relative_to(path).as_posix()
                if self.options.is_output(found.path):
                    continue
                if is_shard_name(found.path.name):
                    self.add_shard(shard_ref(str(found.path)))
                else:
                    source, ext, signature = str(base / relative), image_ext(found.path.name), found.signature
                    self.add_sample(Sample(key=relative, source=source, path=source, ext=ext, signature=signature))
        elif path.is_file() and is_image_name(path.name):
            source = str(path.resolve())
            # An image named on the command line is keyed by its name; one in a list by the line itself.
            key = raw if listed_in else path.name
            ext, signature = image_ext(path.name), path_signature(path)
            self.add_sample(Sample(key=key, source=source, path=str(path), ext=ext, signature=signature))
        elif listed_in is not None:
            # A list of a million paths names a few that are gone or are no images: each becomes an
            # error row (read or decode) when it is read, and the run goes on.
            source = str(path.absolute())
            self.add_sample(Sample(key=raw, source=source, path=str(path), ext=image_ext(path.name) or None))
        elif path.exists():
            raise UsageError(f"{raw}{where} is not a folder, image, shard or manifest")
        else:
            raise UsageError(f"input {raw}{where} does not exist")

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


def resolve_inputs(inputs: list[str], options: InputOptions | None = None, stdin: TextIO | None = None) -> InputSet:
    """All INPUTs (and `--files-from`) as listed samples, shards and manifests."""
    return InputResolver(options or InputOptions(), stdin).resolve(inputs)


def list_samples(inputs: list[str]) -> list[Sample]:
    """The listed samples of local folders and images, sorted by key (shards and manifests aside)."""
    return resolve_inputs(inputs).listed
