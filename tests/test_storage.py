"""Local paths and fsspec URLs read, written and named alike, with credentials kept out of every text.

`redact` strips user:password@ and hides the values of signing and credential parameters in any URL in a
message (and leaves plain text and credential-free URLs alone), `url_identity` keys a URL by what it
names (signing parameters aside), locations are classified and joined the same way for disks and
object stores, `--storage-option` pairs parse to fsspec arguments, reads work on local, file://, memory://
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
    url_identity,
)

# --- redact --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pass@example.com/a.jpg", "http://example.com/a.jpg"),
        ("https://token@example.com:8443/a.jpg", "https://example.com:8443/a.jpg"),
        (
            "https://example.com/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=k",
            "https://example.com/a.jpg?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED",
        ),
        ("s3://key:secret@bucket/dir/x.tar", "s3://bucket/dir/x.tar"),
        ("https://u:p@h/x.tar?sig=1", "https://h/x.tar?sig=REDACTED"),
        ("https://h/img.jpg?id=1&token=t0k&size=big", "https://h/img.jpg?id=1&token=REDACTED&size=big"),
        ("https://h/a.jpg#access_token=abc&state=x", "https://h/a.jpg#access_token=REDACTED&state=x"),
    ],
)
def test_redact_one_url(text: str, expected: str) -> None:
    """user:password@ goes, the values of signing and credential parameters are replaced, and every
    other parameter stays: redaction hides secrets without merging distinct objects."""
    assert redact(text) == expected


def test_redact_keeps_distinct_objects_distinct() -> None:
    """`?id=1` and `?id=2` are two objects: their records stay apart (whole-query redaction merged them)."""
    assert redact("http://h/img.jpg?id=1") != redact("http://h/img.jpg?id=2")


# Every kind of signing or credential parameter, each with a value that must never be recorded.
SECRET_PARAMETERS = [
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "x-amz-date", "AWSAccessKeyId", "Signature",
    "Expires", "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId", "sig", "se", "sp", "sv", "st", "spr",
    "srt", "ss", "sr", "skoid", "sktid", "Policy", "Key-Pair-Id", "token", "access_token", "api_key", "apikey",
    "API-KEY", "key", "secret", "password", "auth", "credential", "session", "hf_token", "client_secret",
]


@pytest.mark.parametrize("name", SECRET_PARAMETERS)
def test_secret_parameters_are_hidden_and_not_identity(name: str) -> None:
    """Each signing or credential parameter (any case) has its value hidden by `redact` and is no part
    of `url_identity`; the parameters around it are kept, in order."""
    url = f"https://h/img.jpg?a=1&{name}=V4LUE-s3cr3t&b=2"
    assert "s3cr3t" not in redact(url)
    assert redact(url) == f"https://h/img.jpg?a=1&{name}=REDACTED&b=2"
    assert url_identity(url) == "https://h/img.jpg?a=1&b=2"
    assert url_identity(url.replace(name, name.upper())) == url_identity(url)


@pytest.mark.parametrize(
    ("url", "identity"),
    [
        ("http://h/img.jpg?id=1", "http://h/img.jpg?id=1"),
        ("http://user:pw@h/img.jpg?id=2#part", "http://h/img.jpg?id=2"),
        ("https://b.s3.example/k/x.jpg?X-Amz-Algorithm=A&X-Amz-Signature=s", "https://b.s3.example/k/x.jpg"),
        ("https://h/x.jpg?sv=2022&se=2030&sp=r&sig=abc&v=3", "https://h/x.jpg?v=3"),
        ("https://h/x.jpg?b=%2F&a=2&b=1", "https://h/x.jpg?b=%2F&a=2&b=1"),
        ("simplecache::s3://k:s@bucket/x.jpg?token=t&v=1", "simplecache::s3://bucket/x.jpg?v=1"),
        ("memory:///bucket/a.jpg", "memory:///bucket/a.jpg"),
        ("/data/images/a.jpg", "/data/images/a.jpg"),
    ],
)
def test_url_identity(url: str, identity: str) -> None:
    """A URL's identity: no user:password@, no signing parameters, no fragment; every other parameter
    kept as written and in order."""
    assert url_identity(url) == identity


def test_url_identity_tells_objects_apart_and_survives_signing_again() -> None:
    """Distinct objects keep distinct identities; the same object signed again keeps its identity."""
    first = "https://h/img.jpg?id=1&X-Amz-Date=20240101&X-Amz-Signature=aaa"
    again = "https://h/img.jpg?id=1&X-Amz-Date=20250606&X-Amz-Signature=bbb&X-Amz-Security-Token=t"
    other = "https://h/img.jpg?id=2&X-Amz-Date=20240101&X-Amz-Signature=aaa"
    assert url_identity(first) == url_identity(again) == "https://h/img.jpg?id=1"
    assert url_identity(other) != url_identity(first)


def test_redact_every_url_in_a_message() -> None:
    """Several URLs quoted in one message are each redacted; the words around them stay."""
    message = (
        "cannot open 'https://alice:pw1@one.example/a.tar?sig=s1' "
        "nor \"http://bob:pw2@two.example/b.jpg\" (tried s3://k:pw3@bucket/c.jpg?token=s4&v=2)"
    )
    redacted = redact(message)
    for secret in ("alice", "pw1", "s1", "bob", "pw2", "pw3", "s4"):
        assert secret not in redacted
    assert redacted.startswith(
        "cannot open 'https://one.example/a.tar?sig=REDACTED' nor \"http://two.example/b.jpg\""
    )
    assert "s3://bucket/c.jpg?token=REDACTED&v=2)" in redacted


def test_redact_chained_url() -> None:
    """In `simplecache::s3://...` the link carrying credentials is redacted, the chain kept."""
    chained = "simplecache::s3://key:secret@bucket/x.tar?token=t"
    assert redact(chained) == "simplecache::s3://bucket/x.tar?token=REDACTED"


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


@pytest.mark.parametrize("remote", [False, True])
def test_remove_stale_uploads_takes_only_this_locations_temporaries(memory_fs, tmp_path: Path, remote: bool) -> None:
    """What a killed upload of `caps.parquet` left goes; the output, other outputs' temporaries and
    look-alikes stay."""
    from caprl_cli.storage import remove_stale_uploads

    names = ["caps.parquet", ".caps.parquet.123.tmp", ".caps.parquet.9.tmp", ".caps.parquet.summary.json.5.tmp",
             ".caps.parquet2.7.tmp", ".caps.parquet.x.tmp", "caps.parquet.1.tmp"]
    if remote:
        for name in names:
            memory_fs.pipe(f"/bucket/out/{name}", b"x")
        location = "memory://bucket/out/caps.parquet"
        listed = lambda: sorted(path.rsplit("/", 1)[1] for path in memory_fs.ls("/bucket/out", detail=False))  # noqa: E731
    else:
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        location = str(tmp_path / "caps.parquet")
        listed = lambda: sorted(path.name for path in tmp_path.iterdir())  # noqa: E731
    assert remove_stale_uploads(location) == 2
    assert listed() == sorted(set(names) - {".caps.parquet.123.tmp", ".caps.parquet.9.tmp"})
    assert remove_stale_uploads(location + ".summary.json") == 1
    assert remove_stale_uploads("memory://bucket/nowhere/caps.parquet") == 0
