"""Where bytes live: local paths and fsspec URLs (s3://, gs://, hf://, https://, memory://, file://).

Everything that reads an input or writes an output goes through here, so a corpus on object storage
is handled exactly like one on disk. Credentials only ever come through fsspec's own mechanisms
(environment, config files, `--storage-option`), and `redact` hides whatever a URL itself carries
(user:password@, signing and credential parameters) before a URL reaches a log line, an error row or
metadata. What a URL sample is keyed by is a separate function, `url_identity`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from caprl_cli.errors import UsageError
from caprl_cli.faults import crash_point

StorageOptions = dict[str, Any]

# What to install for each scheme's fsspec backend (the README lists the same).
BACKEND_PACKAGES = {
    "s3": '"caprl-cli[s3]"',
    "gs": '"caprl-cli[gcs]"',
    "gcs": '"caprl-cli[gcs]"',
    "az": '"caprl-cli[azure]"',
    "abfs": '"caprl-cli[azure]"',
    "http": '"caprl-cli[http]"',
    "https": '"caprl-cli[http]"',
    "hf": "huggingface_hub",
}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Schemes whose readers stream (no random access, no local copy) when asked for a block size of 0.
_STREAMING_SCHEMES = frozenset({"http", "https"})


def is_url(text: str) -> bool:
    """True for `scheme://...` (fsspec URLs, including chained `simplecache::s3://...`)."""
    return bool(_URL.match(text)) or ("::" in text and bool(_URL.match(text.split("::")[-1])))


def scheme_of(url: str) -> str:
    """The scheme of the last link of a URL: `simplecache::s3://b/k` -> `s3`; a local path -> `file`."""
    last = url.split("::")[-1]
    return last.split("://", 1)[0].lower() if _URL.match(last) else "file"


def is_process_local(location: str) -> bool:
    """True for `memory://`: its files exist only in the process that wrote them, so a worker process
    cannot read them and the parent must."""
    return is_url(location) and scheme_of(location) == "memory"


def path_part(location: str) -> str:
    """A location without its URL query (`https://h/x.tar?sig=..` -> `/x.tar`): what names and
    suffixes are judged by. A local path is returned as it is."""
    return urlsplit(location.split("::")[-1]).path if is_url(location) else location


def local_path_of(location: str) -> Path | None:
    """The local path a location names (a plain path or `file://`), else None."""
    if not is_url(location):
        return Path(location).expanduser()
    if location.lower().startswith("file://"):
        return Path(location[len("file://") :])
    return None


def parse_storage_options(pairs: tuple[str, ...] | list[str]) -> StorageOptions:
    """`key=value` pairs into fsspec keyword arguments; values are JSON when they parse as JSON."""
    options: StorageOptions = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--storage-option takes key=value, got {redact(pair.split('=')[0])!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        options[name.strip()] = value
    return options


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for `url`; a missing backend is a usage error."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as exc:
        raise no_backend(url, url, exc) from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise no_backend(url, url, exc) from None
        raise


def require_backend(url: str) -> None:
    """Refuse a URL whose fsspec backend is not installed before any work starts (exit 2, not an
    error row per shard or image)."""
    if not is_url(url):
        return
    import fsspec

    for link in url.split("::"):
        if not _URL.match(link):
            continue
        try:
            fsspec.get_filesystem_class(scheme_of(link))
        except (ImportError, ValueError) as exc:
            raise no_backend(url, link, exc) from None


def no_backend(url: str, link: str, exc: BaseException) -> UsageError:
    """The usage error for `url` when fsspec has no backend for `link`'s scheme: unknown, or known but
    not installed (then naming the package that brings it)."""
    scheme = scheme_of(link)
    if not isinstance(exc, ImportError):
        return UsageError(f"cannot read {redact(url)}: no fsspec backend for {scheme}://")
    package = BACKEND_PACKAGES.get(scheme)
    hint = f" (pip install {package})" if package else ""
    return UsageError(f"cannot read {redact(url)}: the fsspec backend for {scheme}:// is not installed{hint}: {exc}")


def open_input(location: str, options: StorageOptions | None = None, stream: bool = False) -> IO[bytes]:
    """Open a local path or URL for reading. With `stream`, HTTP is read front to back as it arrives,
    never downloaded whole first and never asked for byte ranges."""
    path = local_path_of(location)
    if path is not None:
        return open(path, "rb")
    fs, inner = filesystem(location, options)
    kwargs: dict[str, Any] = {}
    if stream and scheme_of(location) in _STREAMING_SCHEMES:
        kwargs["block_size"] = 0
    return fs.open(inner, "rb", **kwargs)


def read_bytes(location: str, options: StorageOptions | None = None) -> bytes:
    """The whole content of a local path or URL."""
    with open_input(location, options) as handle:
        return handle.read()


def join(base: str, relative: str) -> str:
    """`relative` under `base`, for local folders and URLs alike (an absolute `relative` wins)."""
    if is_url(relative) or relative.startswith("/"):
        return relative
    if is_url(base):
        return base.rstrip("/") + "/" + relative.lstrip("/")
    return os.path.join(base, relative)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it hidden: user:password@ goes, and the value of
    every signing or credential parameter (see `is_secret_parameter`) becomes `REDACTED`.

    Other parameters stay as they are, so two distinct objects (`?id=1`, `?id=2`) stay told apart in
    records. Works on a bare URL and on a message that quotes one. This hides secrets; what a URL
    sample is keyed by is `url_identity`.
    """
    return _URL_IN_TEXT.sub(lambda found: _redact_one(found.group(0)), text)


def url_identity(url: str) -> str:
    """What a URL names, as a key: without user:password@, without signing and credential parameters,
    without a fragment; every other parameter kept, in its original order and spelling.

    The same object behind a re-signed URL (only `X-Amz-*`, `X-Goog-*`, SAS or token parameters
    changed) keeps its identity, while `img.jpg?id=1` and `img.jpg?id=2` stay two objects. A local
    path is returned as it is.
    """
    return _URL_IN_TEXT.sub(lambda found: _identity_one(found.group(0)), url)


REDACTED = "REDACTED"
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")

# Query parameters that sign a URL or carry a credential, compared lowercased with `-` and `_` removed:
# AWS (SigV2 and presigned CloudFront), GCS, Azure SAS (service and user delegation), and common names.
_SECRET_NAMES = frozenset(
    {
        # AWS SigV2, GCS signed URLs, CloudFront signed URLs
        "awsaccesskeyid", "signature", "expires", "googleaccessid", "policy", "keypairid",
        # Azure shared access signatures
        "sig", "se", "st", "sp", "sv", "spr", "srt", "ss", "sr", "sip", "si", "sdd", "ses",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
        # tokens, keys and passwords by their usual names
        "token", "accesstoken", "apikey", "key", "secret", "password", "passwd", "pwd",
        "auth", "authorization", "credential", "credentials", "session", "sessionid",
    }
)
_SECRET_PREFIXES = ("xamz", "xgoog")  # every X-Amz-* and X-Goog-* parameter belongs to a signature
_SECRET_SUFFIXES = ("token", "secret", "password", "apikey", "signature")


def is_secret_parameter(name: str) -> bool:
    """True for a query parameter name that signs a URL or carries a credential, in any case."""
    plain = unquote(name).lower().replace("-", "").replace("_", "")
    return plain in _SECRET_NAMES or plain.startswith(_SECRET_PREFIXES) or plain.endswith(_SECRET_SUFFIXES)


def _parameters(query: str) -> list[tuple[str, str | None]]:
    """`a=1&b&c=` as [(a, 1), (b, None), (c, "")], exactly as written (nothing decoded)."""
    pairs: list[tuple[str, str | None]] = []
    for piece in query.split("&"):
        if piece:
            name, sep, value = piece.partition("=")
            pairs.append((name, value if sep else None))
    return pairs


def _join_parameters(pairs: list[tuple[str, str | None]]) -> str:
    return "&".join(name if value is None else f"{name}={value}" for name, value in pairs)


def _redact_parameters(query: str) -> str:
    pairs = _parameters(query)
    return _join_parameters(
        [(name, REDACTED if value is not None and is_secret_parameter(name) else value) for name, value in pairs]
    )


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable (a broken IPv6 host): keep only what cannot hold a secret
        return url.split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1]
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url  # nothing secret; rebuilding would turn memory:///x into memory:/x
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = f"?{_redact_parameters(parts.query)}" if parts.query else ""
    fragment = f"#{_redact_parameters(parts.fragment)}" if parts.fragment else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}{fragment}"


def _identity_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1]
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    kept = [(name, value) for name, value in _parameters(parts.query) if not is_secret_parameter(name)]
    query = f"?{_join_parameters(kept)}" if kept else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def upload(local: Path, url: str, options: StorageOptions | None = None) -> None:
    """Publish a finished local file at `url`: under a temporary name first, renamed when complete,
    so a reader of the remote location never sees half a file."""
    fs, inner = filesystem(url, options)
    parent, _, name = inner.rpartition("/")
    temp = f"{parent}/.{name}.{os.getpid()}.tmp" if parent else f".{name}.{os.getpid()}.tmp"
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(str(local), temp)
    crash_point("upload.put")
    try:
        fs.mv(temp, inner)
    except BaseException:
        fs.rm(temp)
        raise


def remove_stale_uploads(location: str, options: StorageOptions | None = None) -> int:
    """Delete the `.<name>.<pid>.tmp` files that a killed `upload` (or a killed atomic write, locally)
    of `location` left beside it; only called under the run's lock. Returns how many went."""
    temporary = re.compile(r"\." + re.escape(path_part(location).rstrip("/").rsplit("/", 1)[-1]) + r"\.\d+\.tmp")
    path = local_path_of(location)
    if path is not None:
        stale = [entry for entry in path.parent.glob(".*.tmp") if temporary.fullmatch(entry.name)]
        for entry in stale:
            entry.unlink(missing_ok=True)
        return len(stale)
    fs, inner = filesystem(location, options)
    parent = inner.rpartition("/")[0]
    try:
        names = fs.ls(parent, detail=False) if parent else []
    except FileNotFoundError:
        return 0
    stale_names = [name for name in names if temporary.fullmatch(str(name).rstrip("/").rsplit("/", 1)[-1])]
    for name in stale_names:
        fs.rm(name)
    return len(stale_names)


def remove(location: str, options: StorageOptions | None = None) -> None:
    """Delete a local path or URL; one that is not there is fine."""
    path = local_path_of(location)
    if path is not None:
        path.unlink(missing_ok=True)
        return
    fs, inner = filesystem(location, options)
    if fs.exists(inner):
        fs.rm(inner)


def exists(location: str, options: StorageOptions | None = None) -> bool:
    """Whether a local path or URL exists."""
    path = local_path_of(location)
    if path is not None:
        return path.exists()
    fs, inner = filesystem(location, options)
    return bool(fs.exists(inner))
