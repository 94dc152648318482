"""Turn INPUT strings into concrete locations: shard specs, file lists and remote folders.

A corpus is rarely named one file at a time. WebDataset users write `shard-{00000..00999}.tar` or
`a.tar::b.tar`, large jobs pass `--files-from LIST`, and object stores hold folders that only fsspec can
list. This module expands all of those into plain paths and URLs before anything is opened, so the
rest of the pipeline only ever sees one location per image or shard. Nothing here reads an image.
"""

from __future__ import annotations

import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import is_hidden, is_image_name, listing_signature
from caprl_cli.inputs.shards import is_shard_name
from caprl_cli.storage import StorageOptions, filesystem, open_input, redact

# `::` joins shard specs, but not inside `[...]`: an IPv6 host (`http://[::1]:8000/`) is one piece.
_LIST_SEPARATOR = re.compile(r"::(?![^\[]*\])")


def expand_shard_spec(spec: str) -> list[str] | None:
    """The shards a WebDataset-style spec names (`s-{000..099}.tar`, `a.tar::b-{0..1}.tar`), in order.

    None when the spec is not (only) shards: `photo.jpg`, a folder, or a chained fsspec URL such as
    `simplecache::s3://b/x.tar`, whose first link names no shard. Unbalanced braces in a spec that ends
    like a shard are a usage error rather than a file name nobody meant.
    """
    import braceexpand

    expanded: list[str] = []
    for piece in _LIST_SEPARATOR.split(spec):
        try:
            names = list(braceexpand.braceexpand(piece))
        except ValueError as exc:  # UnbalancedBracesError
            if is_shard_name(spec):
                raise UsageError(f"cannot expand shard spec {redact(spec)}: {exc}") from None
            return None
        if not names or not all(is_shard_name(name) for name in names):
            return None
        expanded.extend(names)
    return expanded


def read_file_list(location: str, options: StorageOptions | None = None, stdin: TextIO | None = None) -> list[str]:
    """The paths and URLs a `--files-from` list names, one per line; `-` reads standard input.

    Blank lines and `#` comments are skipped; CRLF files work. Relative local paths stay as written, so
    they mean what they mean in the user's shell (relative to the current directory, not to the list).
    Lines are names as bytes: what is not valid UTF-8 is kept as Python keeps such file names
    (surrogate-escaped), so a line naming a non-UTF-8 file finds it.
    """
    if location == "-":
        source = stdin if stdin is not None else sys.stdin
        buffer = getattr(source, "buffer", None)
        text = _decoded(buffer.read()) if buffer is not None else source.read()
    else:
        try:
            with open_input(location, options, stream=True) as handle:
                text = _decoded(handle.read())
        except OSError as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise UsageError(f"cannot read file list {redact(location)}: {reason}") from None
    entries = (line.strip() for line in text.splitlines())
    return [entry for entry in entries if entry and not entry.startswith("#")]


def _decoded(data: bytes) -> str:
    """A list's bytes as text: UTF-8 (a BOM dropped), undecodable bytes surrogate-escaped like names."""
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class RemoteEntry:
    """One file found under a remote folder: its key (relative POSIX path) and its full URL; its
    signature, from the listing's detail, is what it was found with, not what it is (not compared)."""

    key: str
    url: str
    signature: str | None = field(default=None, compare=False)


def walk_remote_folder(url: str, options: StorageOptions | None = None) -> tuple[list[RemoteEntry], list[RemoteEntry]]:
    """The images and the shards under a folder any fsspec backend lists, each sorted by key.

    Paths with a hidden component (`.cache/`, `._x.jpg`) are skipped, as on local disk. A folder that
    does not exist is a usage error; one that exists and is empty gives two empty lists.
    """
    fs, inner = filesystem(url, options)
    inner = inner.rstrip("/") or inner
    try:
        if not fs.exists(inner):
            raise UsageError(f"cannot list {redact(url)}: no such folder")
        found = fs.find(inner, withdirs=False, detail=True)
    except OSError as exc:
        raise UsageError(f"cannot list {redact(url)}: {exc.strerror or type(exc).__name__}") from None
    images: list[RemoteEntry] = []
    shards: list[RemoteEntry] = []
    for path, info in found.items():
        key = _relative_key(path, inner)
        if any(is_hidden(part) for part in key.split("/")):
            continue
        if is_image_name(key):
            images.append(RemoteEntry(key, _full_url(fs, path, url), listing_signature(info)))
        elif is_shard_name(key):
            shards.append(RemoteEntry(key, _full_url(fs, path, url)))
    return sorted(images, key=_by_key), sorted(shards, key=_by_key)


def _relative_key(path: str, folder: str) -> str:
    """`path` relative to `folder`, POSIX; a folder URL that named a single file keys it by its name."""
    prefix = folder.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)


def _full_url(fs: Any, path: str, url: str) -> str:
    """The URL of `path` with the folder's protocol; a chained URL keeps its leading links."""
    full = fs.unstrip_protocol(path)
    links = url.split("::")
    return "::".join([*links[:-1], full]) if len(links) > 1 else full


def _by_key(entry: RemoteEntry) -> str:
    return entry.key
