"""Shard specs, file lists and remote folder listings expand into plain locations."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pytest

from caprl_cli.errors import UsageError
from caprl_cli.inputs.locations import RemoteEntry, expand_shard_spec, read_file_list, walk_remote_folder

# --- shard specs -------------------------------------------------------------------------------


def test_brace_range_keeps_zero_padding_and_order() -> None:
    shards = expand_shard_spec("data/shard-{00008..00011}.tar")
    assert shards == [f"data/shard-{i:05d}.tar" for i in range(8, 12)]


def test_brace_alternatives_and_suffixes() -> None:
    assert expand_shard_spec("{b,a}.tgz") == ["b.tgz", "a.tgz"]
    assert expand_shard_spec("x-{0..1}.TAR.GZ") == ["x-0.TAR.GZ", "x-1.TAR.GZ"]
    assert expand_shard_spec("one.tar") == ["one.tar"]


def test_braces_inside_urls() -> None:
    shards = expand_shard_spec("http://127.0.0.1:8000/s-{0..3}.tar")
    assert shards == [f"http://127.0.0.1:8000/s-{i}.tar" for i in range(4)]
    signed = expand_shard_spec("https://h/s-{0..1}.tar?sig=abc")
    assert signed == ["https://h/s-0.tar?sig=abc", "https://h/s-1.tar?sig=abc"]
    assert expand_shard_spec("http://[::1]:8000/s-{0..1}.tar") == [
        "http://[::1]:8000/s-0.tar",
        "http://[::1]:8000/s-1.tar",
    ]


def test_double_colon_lists_expand_each_piece_in_order() -> None:
    assert expand_shard_spec("a.tar::b-{0..1}.tar::a.tar") == ["a.tar", "b-0.tar", "b-1.tar", "a.tar"]
    assert expand_shard_spec("s3://b/x.tar::s3://b/y-{1..2}.tgz") == [
        "s3://b/x.tar",
        "s3://b/y-1.tgz",
        "s3://b/y-2.tgz",
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "photo.jpg",
        "folder",
        "folder/",
        "img-{0..3}.jpg",
        "{a.tar,b.jpg}",
        "a.tar::b.jpg",
        "a.tar::",
        "simplecache::s3://b/x.tar",
        "filecache::https://h/s-{0..2}.tar",
        "manifest.jsonl",
        "archive.tar.bz2",
    ],
)
def test_non_shard_specs_are_not_split(spec: str) -> None:
    assert expand_shard_spec(spec) is None


def test_unbalanced_braces_in_a_shard_spec_are_a_usage_error() -> None:
    with pytest.raises(UsageError):
        expand_shard_spec("shard-{0..3.tar")
    assert expand_shard_spec("odd{name.jpg") is None


# --- file lists --------------------------------------------------------------------------------


def test_file_list_skips_comments_blanks_and_crlf(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(
        b"# header\r\na.jpg\r\n\r\n  sub/b.png  \r\n   # indented comment\r\ns3://b/c.jpg\r\n/abs/d.jpg"
    )
    assert read_file_list(str(listing)) == ["a.jpg", "sub/b.png", "s3://b/c.jpg", "/abs/d.jpg"]


def test_file_list_relative_paths_stay_as_written(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "l.txt"
    listing.write_text("../img/x.jpg\nx.jpg\n")
    assert read_file_list(str(listing)) == ["../img/x.jpg", "x.jpg"]


def test_file_list_from_stdin() -> None:
    stdin = io.StringIO("a.jpg\n\n# c\nb.tar\r\n")
    assert read_file_list("-", stdin=stdin) == ["a.jpg", "b.tar"]


def test_file_list_from_a_url(memory_fs, tmp_path: Path) -> None:
    memory_fs.pipe("/lists/l.txt", b"\xef\xbb\xbfa.jpg\nmemory://imgs/b.jpg\n")  # a BOM is not part of a path
    assert read_file_list("memory://lists/l.txt") == ["a.jpg", "memory://imgs/b.jpg"]
    (tmp_path / "l.txt").write_text("x.jpg\n")
    assert read_file_list(f"file://{tmp_path}/l.txt") == ["x.jpg"]


def test_missing_file_list_is_a_usage_error_naming_it_redacted(tmp_path: Path, memory_fs) -> None:
    with pytest.raises(UsageError, match="nope.txt"):
        read_file_list(str(tmp_path / "nope.txt"))
    with pytest.raises(UsageError) as caught:
        read_file_list("memory://user:secret@lists/none.txt?token=hunter2")
    assert "secret" not in str(caught.value) and "hunter2" not in str(caught.value)


# --- remote folders ----------------------------------------------------------------------------


def test_memory_folder_walk_finds_images_and_shards_sorted(memory_fs) -> None:
    for path in ["/data/z.jpg", "/data/a/b.PNG", "/data/s-1.tar", "/data/s-0.tgz", "/data/notes.txt", "/data/m.jsonl"]:
        memory_fs.pipe(path, b"x")
    images, shards = walk_remote_folder("memory://data/")
    assert images == [RemoteEntry("a/b.PNG", "memory:///data/a/b.PNG"), RemoteEntry("z.jpg", "memory:///data/z.jpg")]
    assert [entry.key for entry in shards] == ["s-0.tgz", "s-1.tar"]
    assert all(entry.url.startswith("memory://") for entry in shards)
    assert walk_remote_folder("memory://data") == (images, shards)


def test_walked_urls_open_the_same_bytes(memory_fs) -> None:
    memory_fs.pipe("/d/sub/x.jpg", b"pixels")
    (entry,), _ = walk_remote_folder("memory://d")
    with fsspec.open(entry.url, "rb") as handle:
        assert handle.read() == b"pixels"


def test_hidden_paths_are_skipped(memory_fs) -> None:
    for path in ["/d/.hidden.jpg", "/d/._x.jpg", "/d/.cache/y.jpg", "/d/sub/.git/s.tar", "/d/ok/k.jpg"]:
        memory_fs.pipe(path, b"x")
    images, shards = walk_remote_folder("memory://d/")
    assert [entry.key for entry in images] == ["ok/k.jpg"] and shards == []


def test_file_url_folder_walk(tmp_path: Path) -> None:
    root = tmp_path / ".parent-may-be-hidden" / "corpus"
    (root / "deep" / ".skip").mkdir(parents=True)
    for name in ["b.jpg", "deep/a.webp", "deep/.skip/c.jpg", "deep/s.tar.gz", "readme.md"]:
        (root / name).write_bytes(b"x")
    images, shards = walk_remote_folder(f"file://{root}")
    assert images == [
        RemoteEntry("b.jpg", f"file://{root}/b.jpg"),
        RemoteEntry("deep/a.webp", f"file://{root}/deep/a.webp"),
    ]
    assert shards == [RemoteEntry("deep/s.tar.gz", f"file://{root}/deep/s.tar.gz")]


def test_existing_empty_folder_gives_empty_lists(tmp_path: Path, memory_fs) -> None:
    assert walk_remote_folder(f"file://{tmp_path}") == ([], [])
    memory_fs.mkdir("/empty")
    assert walk_remote_folder("memory://empty/") == ([], [])


def test_missing_folder_is_a_usage_error(tmp_path: Path, memory_fs) -> None:
    with pytest.raises(UsageError, match="cannot list"):
        walk_remote_folder("memory://nowhere/")
    with pytest.raises(UsageError, match="cannot list"):
        walk_remote_folder(f"file://{tmp_path}/missing")
