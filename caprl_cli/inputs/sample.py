"""The sample: one image to caption, with the key that names it in every output, and image names.

Listing never opens an image; it only decides keys (the path relative to the input root, POSIX, with
extension), sources and, where it is cheap, a signature of the image's content. Keys are what later
stages, outputs and resumed runs match on, so they must be stable across runs and unique within one;
signatures let a later run tell the same image reached another way from a different one.

File names are bytes; keys and sources are text. A name that is not valid UTF-8 is keyed by a lossless
text form (`name_text`: `caf%E9.jpg`), while `Sample.path` keeps the name Python gives it, which opens
the real file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

from caprl_cli.errors import ErrorKind

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# The most bytes one image may have: image files and URLs (`--max-image-bytes`) and shard members.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    """One image to caption. `path` (a local path or a URL) is read by a preprocessing worker; `data`
    is already in memory (a shard member). A sample found broken while listing (a hostile tar member,
    a manifest line without an image) carries `error_kind`/`error_message` and becomes an error row
    without being decoded: the run records it and goes on.
    """

    key: str
    source: str
    path: str | None = None
    data: bytes | None = None
    meta: str | None = None  # JSON text: the sample's side members or manifest columns
    signature: str | None = None  # a cheap fingerprint of the image's content, known at listing time
    ext: str | None = None  # the image's extension as stored ("jpg"), for WebDataset output members
    error_kind: ErrorKind | None = None
    error_message: str | None = None


def stat_signature(info: os.stat_result) -> str:
    """A local file's signature from a stat: `size:mtime_ns`. A rename or a moved folder keeps it; a
    file written again in place changes it."""
    return f"{info.st_size}:{info.st_mtime_ns}"


def path_signature(path: str | os.PathLike[str]) -> str | None:
    """The stat signature of a local file; None when it cannot be stat'ed (it becomes a read error)."""
    try:
        return stat_signature(os.stat(path))
    except OSError:
        return None


def content_signature(data: bytes) -> str:
    """The signature of bytes already in memory (a shard member, a manifest's embedded image): a short
    content hash, so the same image read from a moved shard or manifest is recognised."""
    return "blake2b:" + hashlib.blake2b(data, digest_size=12).hexdigest()


def listing_signature(info: dict[str, Any]) -> str | None:
    """The signature of a remote file from its fsspec listing detail: size plus the first content tag
    the backend gives (ETag, MD5, generation) or else its modification time; None when it gives
    neither, since a size alone cannot tell two images apart."""
    size = info.get("size")
    for name in _CONTENT_TAGS:
        value = info.get(name)
        if value not in (None, ""):
            return f"{size}:{str(value).strip(chr(34))}"
    return None


# Listing detail names, across fsspec backends, of a content tag (first) or a modification time.
_CONTENT_TAGS = (
    "ETag", "etag", "md5Hash", "content_md5", "generation", "version_id",
    "mtime", "LastModified", "last_modified", "updated", "created",
)


def is_image_name(name: str) -> bool:
    """True for file names with a supported image extension, in any case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_ext(name: str) -> str:
    """The extension of an image's name as WebDataset members carry it: `Cat.JPG` -> `jpg`."""
    return os.path.splitext(name)[1][1:].lower()


# Python gives each byte of a file name that is not valid UTF-8 as one lone surrogate, U+DC80..U+DCFF
# (the "surrogateescape" form): `open()` takes it back to the real bytes, but no text file, Parquet
# column or JSON line can hold it.
_ESCAPED_BYTES = range(0xDC80, 0xDD00)
_PERCENT_BYTE = re.compile(r"%([0-9A-F]{2})")


def _has_undecodable(name: str) -> bool:
    return any(ord(char) in _ESCAPED_BYTES for char in name)


def name_text(name: str) -> str:
    """The text form of a local name or path, as keys and sources hold it.

    A name that is valid UTF-8 is itself. In a name that is not, each byte that is not valid UTF-8 is
    written `%XX` (two upper-case hex digits) and each `%` as `%25`, so the form is lossless:
    `b"caf\\xe9.jpg"` is `caf%E9.jpg`. A valid name that literally reads like such a form (a file
    really called `caf%E9.jpg` beside `b"caf\\xe9.jpg"`) gets the same key, which the run refuses as a
    key naming two files.
    """
    if not _has_undecodable(name):
        return name
    return "".join(
        f"%{ord(char) - 0xDC00:02X}" if ord(char) in _ESCAPED_BYTES else "%25" if char == "%" else char
        for char in name
    )


def name_from_text(text: str) -> str | None:
    """The name (surrogate-escaped, as `open()` takes it) whose `name_text` is `text`, when `text` is
    the escaped form of a name that is not valid UTF-8; None when it is not (a plain valid name)."""
    if "%" not in text:
        return None
    raw = _PERCENT_BYTE.sub(lambda match: chr(0xDC00 + int(match.group(1), 16)), text)
    raw = raw.replace("\udc25", "%")
    try:  # a %XX for a byte that was valid UTF-8 in its place is no escape this function wrote
        name = os.fsdecode(os.fsencode(raw))
    except UnicodeError:
        return None
    return name if name != text and name_text(name) == text else None


def printable_text(text: str) -> str:
    """`text` with every byte of a non-UTF-8 name in it as `%XX`: safe for messages, logs and rows."""
    return text.translate(_BYTE_ESCAPES) if _has_undecodable(text) else text


_BYTE_ESCAPES = {code: f"%{code - 0xDC00:02X}" for code in _ESCAPED_BYTES}


def is_hidden(name: str) -> bool:
    """Dot files, including macOS `._*` resource forks and `.DS_Store`, are never inputs."""
    return name.startswith(".")
