"""Local paths and fsspec URLs read, written and named alike, with credentials kept out of every text.

`redact` strips user:password@ and query strings from any URL in a message (and leaves plain text and
credential-free URLs alone), locations are classified and joined the same way for disks and object
stores, `--storage-option` pairs parse to fsspec arguments, reads work on local, file://, memory://
and HTTP, and `upload` publishes atomically without leaving its temporary file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from caprl_cli.errors import UsageError
from caprl_cli.storage import (
    exists,
    filesystem,
    is_process_local,
    is_url,
    join,
    local_path_of,
    no_backend,
    open_input,
    parse_storage_options,
    read_bytes,
    redact,
    scheme_of,
    upload,
)

# --- redact --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pass@example.com/a.jpg", "http://example.com/a.jpg"),
        ("https://token@example.com:8443/a.jpg", "https://example.com:8443/a.jpg"),
        ("https://example.com/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=k", "https://example.com/a.jpg?REDACTED"),
        ("s3://key:secret@bucket/dir/x.tar", "s3://bucket/dir/x.tar"),
        ("https://u:p@h/x.tar?sig=1", "https://h/x.tar?REDACTED"),
    ],
)
def test_redact_one_url(text: str, expected: str) -> None:
    """user:password@ goes, and a query string is replaced as a whole."""
    assert redact(text) == expected


def test_redact_every_url_in_a_message() -> None:
    """Several URLs quoted in one message are each redacted; the words around them stay."""
    message = (
        "cannot open 'https://alice:pw1@one.example/a.tar?sig=s1' "
        "nor \"http://bob:pw2@two.example/b.jpg\" (tried s3://k:pw3@bucket/c.jpg?t=s4)"
    )
    redacted = redact(message)
    for secret in ("alice", "pw1", "s1", "bob", "pw2", "pw3", "t=s4"):
        assert secret not in redacted
    assert redacted.startswith("cannot open 'https://one.example/a.tar?REDACTED' nor \"http://two.example/b.jpg\"")
    assert "s3://bucket/c.jpg?REDACTED" in redacted


def test_redact_chained_url() -> None:
    """In `simplecache::s3://...` the link carrying credentials is redacted, the chain kept."""
    assert redact("simplecache::s3://key:secret@bucket/x.tar?token=t") == "simplecache::s3://bucket/x.tar?REDACTED"


@pytest.mark.parametrize(
    "text",
    [
        "plain words, no URL at all",
        "user:pass@host is not a URL without a scheme",
        "/data/images/a.jpg?not=a-url",
        "",
        "https://example.com/a/b.jpg",
        "s3://bucket/key/x.tar",
        "file:///tmp/x.jpg",
    ],
)
def test_redact_leaves_the_rest_unchanged(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize("url", ["memory:///bucket/a.jpg", "hdfs:///data/x.tar", "local:///tmp/x.jpg"])
def test_redact_keeps_an_empty_authority(url: str) -> None:
    """A credential-free URL with an empty authority (`scheme:///path`) is left as it is."""
    assert redact(url) == url


# --- naming locations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "url"),
    [
        ("s3://bucket/key", True),
        ("https://h/x.jpg", True),
        ("memory://x", True),
        ("file:///tmp/x", True),
        ("simplecache::s3://bucket/key", True),
        ("/tmp/x.jpg", False),
        ("relative/x.jpg", False),
        ("a.tar::b.tar", False),
        ("C:\\data\\x.jpg", False),
        ("~/x.jpg", False),
    ],
)
def test_is_url(location: str, url: bool) -> None:
    assert is_url(location) is url


@pytest.mark.parametrize(
    ("location", "scheme"),
    [
        ("s3://bucket/key", "s3"),
        ("HTTPS://h/x", "https"),
        ("simplecache::s3://bucket/key", "s3"),
        ("filecache::gs://b/k", "gs"),
        ("/tmp/x", "file"),
        ("relative/x", "file"),
        ("file:///tmp/x", "file"),
    ],
)
def test_scheme_of(location: str, scheme: str) -> None:
    assert scheme_of(location) == scheme


def test_is_process_local() -> None:
    assert is_process_local("memory://bucket/x.jpg")
    assert not is_process_local("s3://bucket/x.jpg")
    assert not is_process_local("/tmp/memory/x.jpg")


def test_local_path_of() -> None:
    """Plain paths and file:// URLs name local paths; other URLs do not."""
    assert local_path_of("file:///tmp/x.jpg") == Path("/tmp/x.jpg")
    assert local_path_of("/tmp/x.jpg") == Path("/tmp/x.jpg")
    assert local_path_of("rel/x.jpg") == Path("rel/x.jpg")
    assert local_path_of("~/x.jpg") == Path.home() / "x.jpg"
    assert local_path_of("s3://bucket/x.jpg") is None
    assert local_path_of("memory://x.jpg") is None
    assert local_path_of("simplecache::file:///tmp/x.jpg") is None


@pytest.mark.parametrize(
    ("base", "relative", "joined"),
    [
        ("/data", "a/b.jpg", "/data/a/b.jpg"),
        ("data", "b.jpg", os.path.join("data", "b.jpg")),
        ("s3://bucket/dir", "a/b.jpg", "s3://bucket/dir/a/b.jpg"),
        ("s3://bucket/dir/", "/abs.jpg", "/abs.jpg"),
        ("s3://bucket/dir/", "b.jpg", "s3://bucket/dir/b.jpg"),
        ("/data", "https://h/x.jpg", "https://h/x.jpg"),
        ("s3://bucket", "gs://other/x.jpg", "gs://other/x.jpg"),
    ],
)
def test_join(base: str, relative: str, joined: str) -> None:
    """`relative` under `base`, for folders and URLs; an absolute path or a URL wins."""
    assert join(base, relative) == joined


# --- storage options -----------------------------------------------------------------------------


def test_parse_storage_options_json_and_strings() -> None:
    """Values that parse as JSON are JSON; anything else is the string as written."""
    options = parse_storage_options(
        [
            "anon=true",
            "retries=3",
            "ratio=0.5",
            'client_kwargs={"region_name": "eu-west-1"}',
            "endpoint_url=http://127.0.0.1:9000",
            "profile=default",
            " spaced =x",
            "empty=",
            "expr=a=b",
            "nothing=null",
        ]
    )
    assert options == {
        "anon": True,
        "retries": 3,
        "ratio": 0.5,
        "client_kwargs": {"region_name": "eu-west-1"},
        "endpoint_url": "http://127.0.0.1:9000",
        "profile": "default",
        "spaced": "x",
        "empty": "",
        "expr": "a=b",
        "nothing": None,
    }


def test_parse_storage_options_later_pair_wins() -> None:
    assert parse_storage_options(("anon=true", "anon=false")) == {"anon": False}
    assert parse_storage_options([]) == {}


@pytest.mark.parametrize("pair", ["anon", "=true", " =x", ""])
def test_parse_storage_options_bad_pair(pair: str) -> None:
    with pytest.raises(UsageError):
        parse_storage_options([pair])


# --- reading -------------------------------------------------------------------------------------


def test_read_local_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"local bytes")
    assert read_bytes(str(path)) == b"local bytes"
    assert read_bytes(f"file://{path}") == b"local bytes"
    with open_input(str(path), stream=True) as handle:
        assert handle.read() == b"local bytes"
    with open_input(f"file://{path}") as handle:
        assert handle.read(5) == b"local"


def test_read_memory(memory_fs: object) -> None:
    memory_fs.pipe("/bucket/x.bin", b"in memory")  # type: ignore[attr-defined]
    assert read_bytes("memory://bucket/x.bin") == b"in memory"
    with open_input("memory://bucket/x.bin", stream=True) as handle:
        assert handle.read() == b"in memory"


def test_read_http(tmp_path: Path, serve_folder: Callable[[Path], str]) -> None:
    """HTTP reads whole and as a stream; a query string does not stop a static server."""
    payload = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(payload)
    base = serve_folder(tmp_path)
    assert read_bytes(f"{base}/blob.bin") == payload
    with open_input(f"{base}/blob.bin", stream=True) as handle:
        chunks = []
        while chunk := handle.read(65_536):
            chunks.append(chunk)
    assert b"".join(chunks) == payload
    assert read_bytes(f"{base}/blob.bin?sig=abc") == payload


def test_read_missing(tmp_path: Path, memory_fs: object) -> None:
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError):
        read_bytes("memory://bucket/nope.bin")


# --- writing and existence -----------------------------------------------------------------------


def test_upload_to_memory_leaves_no_temporary(tmp_path: Path, memory_fs: object) -> None:
    local = tmp_path / "out.parquet"
    local.write_bytes(b"published")
    upload(local, "memory://bucket/results/out.parquet")
    assert read_bytes("memory://bucket/results/out.parquet") == b"published"
    assert memory_fs.find("/bucket") == ["/bucket/results/out.parquet"]  # type: ignore[attr-defined]


def test_upload_replaces_an_existing_file(tmp_path: Path, memory_fs: object) -> None:
    local = tmp_path / "out.jsonl"
    local.write_bytes(b"old")
    upload(local, "memory://bucket/out.jsonl")
    local.write_bytes(b"new")
    upload(local, "memory://bucket/out.jsonl")
    assert read_bytes("memory://bucket/out.jsonl") == b"new"
    assert memory_fs.find("/bucket") == ["/bucket/out.jsonl"]  # type: ignore[attr-defined]


def test_upload_to_file_url_leaves_no_temporary(tmp_path: Path) -> None:
    local = tmp_path / "src.bin"
    local.write_bytes(b"to disk")
    target = tmp_path / "published" / "deep" / "dst.bin"
    upload(local, f"file://{target}")
    assert target.read_bytes() == b"to disk"
    assert sorted(p.name for p in target.parent.iterdir()) == ["dst.bin"]
    assert local.read_bytes() == b"to disk"  # the local file is copied, not moved


def test_exists(tmp_path: Path, memory_fs: object) -> None:
    path = tmp_path / "here.bin"
    path.write_bytes(b"x")
    assert exists(str(path)) and exists(f"file://{path}")
    assert not exists(str(tmp_path / "gone.bin")) and not exists(f"file://{tmp_path / 'gone.bin'}")
    memory_fs.pipe("/bucket/here.bin", b"x")  # type: ignore[attr-defined]
    assert exists("memory://bucket/here.bin")
    assert not exists("memory://bucket/gone.bin")


def test_filesystem_of_unknown_scheme_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        filesystem("nosuchscheme://bucket/key")


def test_unknown_scheme_error_carries_no_credentials() -> None:
    with pytest.raises(UsageError) as raised:
        filesystem("nosuchscheme://user:secret@bucket/key?sig=abc")
    assert "secret" not in str(raised.value) and "sig=abc" not in str(raised.value)


def test_filesystem_of_memory_url(memory_fs: object) -> None:
    fs, inner = filesystem("memory://bucket/x.jpg")
    assert fs.protocol[0] == "memory" or "memory" in fs.protocol
    assert inner.endswith("bucket/x.jpg")


def missing_backend_hint(url: str, exc: ImportError) -> str:
    return str(no_backend(url, url, exc))


def test_missing_backend_hint() -> None:
    """Known schemes get an install hint; unknown ones none. The import error itself is kept."""
    assert "pip install" in missing_backend_hint("s3://b/k", ImportError("no s3fs"))
    assert "pip install" in missing_backend_hint("simplecache::gs://b/k", ImportError("x"))
    unknown = missing_backend_hint("weird://b/k", ImportError("the import failure"))
    assert "pip install" not in unknown
    assert "the import failure" in unknown
