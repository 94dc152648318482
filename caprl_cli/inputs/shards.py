"""Read one WebDataset tar shard as a stream of samples, trusting nothing in it.

Shards come from disks, object stores and URLs, so they are read front to back in tarfile's stream mode:
nothing seeks and only one sample's bytes are held at a time. Members group into samples exactly as the
webdataset library groups them, so keys agree with every other tool reading the same shard. Member names
are only ever keys, never paths: nothing is extracted. A hostile, oversized or malformed sample, and the
point where a damaged shard breaks, become error samples (error rows downstream): the run goes on.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.retry import is_transient
from caprl_cli.inputs.sample import DEFAULT_MAX_IMAGE_BYTES, IMAGE_EXTENSIONS, Sample, content_signature
from caprl_cli.storage import path_part

MAX_MEMBER_BYTES = DEFAULT_MAX_IMAGE_BYTES
MAX_META_MEMBER_BYTES = 1024 * 1024
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# webdataset's rule (tariterators.base_plus_ext): the key is the folder plus the name up to its first dot.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# What tarfile, zlib and the stream under them raise for data that is cut short or not a tar.
_DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, OverflowError)
_SEVERITY = {ErrorKind.SHARD: 1, ErrorKind.TOO_LARGE: 2, ErrorKind.UNSAFE: 3}
_NAMES_SHOWN = 5


def is_shard_name(name: str) -> bool:
    """True for names of tar shards, plain or gzipped, in any case; a URL is judged by its path."""
    return path_part(name).lower().endswith(SHARD_SUFFIXES)


def split_member_name(name: str) -> tuple[str, str] | None:
    """`(key, ext)` of a member name, ext lowercased; None where webdataset would skip the member."""
    match = _MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def read_shard(
    source: str, stream: IO[bytes], *, keep_meta: bool = True, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[Sample]:
    """Yield one sample per group of contiguous members sharing a key, in shard order.

    Never raises for bad data: broken samples and damage come out as error samples. `stream` is read
    front to back and left open; `source` (already redacted) is every sample's source.
    """
    seen: set[str] = set()
    group: _Group | None = None
    try:
        with _open(stream) as tar:
            for member in _members(tar):
                unsafe = _unsafe_reason(member)
                split = split_member_name(member.name)
                if unsafe is None and (member.isdir() or split is None):
                    continue  # as webdataset does: folders and names without an extension are no members
                key, ext = split if split is not None else (member.name, "")
                if group is None or key != group.key:
                    if group is not None:
                        yield _finish(group, source)
                    group = _Group(key, member.offset, repeated=key in seen)
                    seen.update((key, group.sample_key))
                _add(group, tar, member, ext, unsafe, keep_meta, max_member_bytes)
    except _Damage as damage:
        yield _damage_sample(source, damage, group)
        return
    if group is not None:
        yield _finish(group, source)


@dataclass
class _Group:
    """The members of one sample read so far, and the worst thing found wrong with them."""

    key: str
    offset: int  # tar header offset of the first member
    repeated: bool  # the key already had a sample earlier in the shard
    names: list[str] = field(default_factory=list)
    exts: set[str] = field(default_factory=set)
    image: tuple[str, bytes] | None = None
    side: dict[str, object] = field(default_factory=dict)
    problem: tuple[ErrorKind, str] | None = None

    @property
    def sample_key(self) -> str:
        """A repeated key never names a second sample: its row is told apart by where it starts."""
        return f"{self.key}@{self.offset}" if self.repeated else self.key

    def fail(self, kind: ErrorKind, message: str) -> None:
        """Remember a problem; the most serious one found names the error sample."""
        if self.problem is None or _SEVERITY[kind] > _SEVERITY[self.problem[0]]:
            self.problem = (kind, message)


class _Damage(Exception):
    """`(offset, reason, transient)`: the shard cannot be read on from `offset`, a byte position in the
    uncompressed tar; `transient` when the stream broke off (a reset, a timeout) rather than the bytes
    being bad, so a later read may get further."""


def _damage_of(offset: int, exc: Exception) -> _Damage:
    """The damage a read failure means, or `exc` itself again when it is neither bad data nor a broken
    stream (a bug must not pass for a damaged shard)."""
    transient = is_transient(exc)
    if not transient and not isinstance(exc, _DAMAGE):
        raise exc
    return _Damage(offset, _reason(exc), transient)


class _HeaderNoting(tarfile.TarInfo):
    """tarfile ends a stream quietly at a header it cannot read; this notes why on the archive, so a cut
    or corrupt header is told apart from the end-of-archive block (see `_members`)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.shard_header_error = exc  # type: ignore[attr-defined]
            raise


def _open(stream: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderNoting)
    except Exception as exc:
        raise _damage_of(0, exc) from None


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members in order. Raises `_Damage` where it cannot go on, including a stream that
    ends without its end-of-archive block: that is how a download cut at a member boundary looks."""
    while True:
        offset = tar.offset
        try:
            member = tar.next()
        except Exception as exc:
            raise _damage_of(offset, exc) from None
        if member is None:
            error = getattr(tar, "shard_header_error", None)
            if error is None or isinstance(error, tarfile.EOFHeaderError):
                return
            if isinstance(error, tarfile.EmptyHeaderError):
                raise _Damage(tar.offset, "the stream ends without an end-of-archive block (cut short?)", False)
            raise _Damage(tar.offset, f"unreadable member header ({_reason(error)})", False)
        tar.members = []  # stream mode would otherwise keep every header of the shard
        yield member


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting this member could harm a machine, or None. Plain folders are harmless."""
    if member.name.startswith("/"):
        return "an absolute name"
    if ".." in member.name.split("/"):
        return "a name that climbs out with '..'"
    if member.isfile() or member.isdir():
        return None
    if member.issym() or member.islnk():
        return f"a {'symlink' if member.issym() else 'hardlink'} to {member.linkname!r}"
    return "a device or FIFO" if member.isdev() else "not a regular file"


def _add(
    group: _Group,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    ext: str,
    unsafe: str | None,
    keep_meta: bool,
    max_member_bytes: int,
) -> None:
    """Take one member into its sample. Its bytes are read only while the sample can still be captioned
    and only if they are wanted: the image, or a side member when meta is kept."""
    group.names.append(member.name)
    if ext in group.exts:
        group.fail(ErrorKind.SHARD, f"member {member.name!r} appears twice, so the sample is ambiguous")
    group.exts.add(ext)
    if unsafe is not None:
        group.fail(ErrorKind.UNSAFE, f"member {member.name!r} is {unsafe}; the sample is not read")
        return
    if member.size > max_member_bytes:
        group.fail(ErrorKind.TOO_LARGE, f"member {member.name!r} has {member.size} bytes, over {max_member_bytes}")
        return
    if group.problem is not None:
        return
    if f".{ext}" in IMAGE_EXTENSIONS:
        if group.image is None:
            group.image = (ext, _read_member(tar, member))
    elif keep_meta and member.size <= MAX_META_MEMBER_BYTES:
        value = _side_value(ext, _read_member(tar, member))
        if value is not None:
            group.side[ext] = value


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        handle = tar.extractfile(member)
        return handle.read() if handle is not None else b""
    except Exception as exc:
        raise _damage_of(member.offset, exc) from None


def _side_value(ext: str, data: bytes) -> object | None:
    """A side member as meta: JSON parsed (kept as text unless it is strict JSON), other members as
    text; None for bytes that are not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if ext.rsplit(".", 1)[-1] != "json":
        return text
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")  # no NaN, no lone surrogates
    except (ValueError, RecursionError):
        return text
    return value


def _finish(group: _Group, source: str) -> Sample:
    """The sample a complete group makes: its image and meta, or an error saying what is wrong with it."""
    key = group.sample_key
    problem = group.problem
    if problem is None and group.repeated:
        problem = (ErrorKind.SHARD, f"key {group.key!r} appears again at byte {group.offset}, apart from its sample")
    if problem is None and group.image is not None:
        ext, data = group.image
        meta = json.dumps(group.side, ensure_ascii=False, sort_keys=True) if group.side else None
        return Sample(key=key, source=source, data=data, ext=ext, meta=meta, signature=content_signature(data))
    kind, message = problem or (ErrorKind.SHARD, f"sample has no image member, only {_show(group.names)}")
    return Sample(key=key, source=source, error_kind=kind, error_message=message)


def _damage_sample(source: str, damage: _Damage, group: _Group | None) -> Sample:
    """The placeholder row where reading stopped: SHARD for bad bytes (final), UNAVAILABLE for a
    stream that broke off (the next run reads the shard again and withdraws this row)."""
    offset, reason, transient = damage.args
    if transient:
        message = f"reading shard {source} broke off at byte {offset}: {reason}; the next run reads it again"
    else:
        message = f"shard {source} is damaged at byte {offset}: {reason}"
    if group is not None:
        message += f"; sample {group.key!r} was being read" + ("" if transient else " and is lost")
    kind = ErrorKind.UNAVAILABLE if transient else ErrorKind.SHARD
    return Sample(key=f"{source}@{offset}", source=source, error_kind=kind, error_message=message)


def _show(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _reason(exc: BaseException) -> str:
    """tarfile's and zlib's own words; an error from the stream itself is named only by its type, since
    its text may carry the unredacted location."""
    if isinstance(exc, (tarfile.TarError, EOFError, zlib.error)):
        return " ".join(str(exc).split()) or type(exc).__name__
    return type(exc).__name__
