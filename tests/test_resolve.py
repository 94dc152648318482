"""INPUT strings become listed samples, shard references and manifests, with stable, secret-free keys.

Folders (local or remote) are walked for images and shards, shard specs are expanded, `@LIST` files and
`--files-from` (also `-`) are followed, image URLs are keyed by their redacted form, and every way two
inputs could claim one key, or an input could be something caprl cannot read, is a usage error.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_shard

from caprl_cli.errors import UsageError
from caprl_cli.inputs.resolve import InputOptions, InputSet, ShardRef, resolve_inputs, shard_ref
from caprl_cli.storage import read_bytes


def _keys(found: InputSet) -> list[str]:
    return [sample.key for sample in found.listed]


def _image(path: Path, data: bytes = b"not decoded while listing") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tar(path: Path, key: str = "k") -> Path:
    return write_shard(path, [{"__key__": key, "jpg": b"x"}])


# --- local folders and files ---------------------------------------------------------------------


def test_local_folder_with_images_and_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images are listed by relative key, sorted; shards in subfolders become absolute ShardRefs."""
    root = tmp_path / "data"
    _image(root / "b.jpg")
    _image(root / "sub" / "a.png")
    _image(root / ".hidden" / "h.png")
    _tar(root / "shards" / "s-0.tar")
    _tar(root / "shards" / "deeper" / "s-1.TAR")
    (root / "notes.txt").write_text("ignored inside a folder")
    monkeypatch.chdir(tmp_path)
    found = resolve_inputs(["data"])  # relative on purpose: sources must still be absolute
    assert _keys(found) == ["b.jpg", "sub/a.png"]
    assert [s.source for s in found.listed] == [str(root.resolve() / "b.jpg"), str(root.resolve() / "sub/a.png")]
    assert all(Path(s.path or "").is_file() for s in found.listed)
    expected = [root.resolve() / "shards" / "deeper" / "s-1.TAR", root.resolve() / "shards" / "s-0.tar"]
    assert sorted(found.shards, key=lambda ref: ref.source) == sorted(
        (ShardRef(url=str(p), source=str(p)) for p in expected), key=lambda ref: ref.source
    )
    assert all(Path(ref.source).is_absolute() for ref in found.shards)
    assert found.manifests == []
    assert found.streams == 2


def test_image_file_is_keyed_by_its_name(tmp_path: Path) -> None:
    """An image named on the command line is keyed by its file name, sourced by its absolute path."""
    image = _image(tmp_path / "deep" / "photo.JPG")
    found = resolve_inputs([str(image)])
    assert _keys(found) == ["photo.JPG"]
    assert found.listed[0].source == str(image.resolve())
    assert found.shards == [] and found.manifests == []


def test_listed_samples_sorted_by_key_across_inputs(tmp_path: Path) -> None:
    """Samples from several inputs are merged and sorted by key; naming one file twice is fine."""
    folder = tmp_path / "f"
    _image(folder / "m.png")
    single = _image(tmp_path / "a.png")
    found = resolve_inputs([str(folder), str(single), str(single)])
    assert _keys(found) == ["a.png", "m.png"]


def test_brace_shard_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`shard-{0..2}.tar` expands to three shards, in order, recorded by absolute path."""
    for i in range(3):
        _tar(tmp_path / f"shard-{i}.tar", key=f"k{i}")
    monkeypatch.chdir(tmp_path)
    found = resolve_inputs(["shard-{0..2}.tar"])
    assert [ref.source for ref in found.shards] == [str(tmp_path.resolve() / f"shard-{i}.tar") for i in range(3)]
    assert [ref.url for ref in found.shards] == [ref.source for ref in found.shards]
    assert found.listed == []


def test_spec_of_several_shards_may_name_missing_ones(tmp_path: Path) -> None:
    """Only a single missing shard is refused: in a spec of several, a gap becomes an error row later."""
    _tar(tmp_path / "s-0.tar")
    found = resolve_inputs([str(tmp_path / "s-{0..1}.tar")])
    assert [ref.source for ref in found.shards] == [str(tmp_path / "s-0.tar"), str(tmp_path / "s-1.tar")]


def test_chained_shard_spec(tmp_path: Path) -> None:
    """`a.tar::b.tar` names two shards, in the order written."""
    b, a = _tar(tmp_path / "b.tar"), _tar(tmp_path / "a.tar")
    found = resolve_inputs([f"{b}::{a}"])
    assert [ref.source for ref in found.shards] == [str(b), str(a)]


def test_single_missing_local_shard_is_a_usage_error(tmp_path: Path) -> None:
    """A single local shard that does not exist is a mistake in the command, not an error row."""
    with pytest.raises(UsageError):
        resolve_inputs([str(tmp_path / "nope.tar")])


def test_shard_ref_of_file_url_and_remote(tmp_path: Path) -> None:
    """file:// shards are recorded by absolute path; remote ones by their redacted URL."""
    local = _tar(tmp_path / "s.tar")
    assert shard_ref(f"file://{local}") == ShardRef(url=str(local), source=str(local))
    remote = shard_ref("https://user:pw@127.0.0.1:1/s.tar?sig=abc")
    assert remote.url == "https://user:pw@127.0.0.1:1/s.tar?sig=abc"
    assert "pw" not in remote.source and "sig=abc" not in remote.source


# --- lists ---------------------------------------------------------------------------------------


def test_at_list_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`@LIST` entries are keyed by the line as written; comments and blanks are skipped."""
    _image(tmp_path / "imgs" / "a.jpg")
    absolute = _image(tmp_path / "other" / "b.png")
    shard = _tar(tmp_path / "s.tar")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\nimgs/a.jpg\n\n{absolute}\r\n{shard}\n")
    monkeypatch.chdir(tmp_path)
    found = resolve_inputs([f"@{listing}"])
    assert _keys(found) == sorted(["imgs/a.jpg", str(absolute)])
    by_key = {s.key: s for s in found.listed}
    assert by_key["imgs/a.jpg"].source == str((tmp_path / "imgs" / "a.jpg").resolve())
    assert [ref.source for ref in found.shards] == [str(shard.resolve())]


def test_files_from_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--files-from LIST` adds the list's entries to the INPUTs given."""
    _image(tmp_path / "x" / "one.png")
    _image(tmp_path / "two.png")
    listing = tmp_path / "files.txt"
    listing.write_text("x/one.png\n")
    monkeypatch.chdir(tmp_path)
    found = resolve_inputs(["two.png"], InputOptions(files_from=str(listing)))
    assert _keys(found) == ["two.png", "x/one.png"]


def test_files_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--files-from -` reads the list from standard input."""
    _image(tmp_path / "p" / "q.jpg")
    shard = _tar(tmp_path / "s.tar")
    monkeypatch.chdir(tmp_path)
    stdin = io.StringIO(f"p/q.jpg\n# skipped\n{shard}\n")
    found = resolve_inputs([], InputOptions(files_from="-"), stdin=stdin)
    assert _keys(found) == ["p/q.jpg"]
    assert [ref.source for ref in found.shards] == [str(shard)]


def test_at_list_entries_that_are_gone_are_still_samples(tmp_path: Path) -> None:
    """A list entry that does not exist (or is no image) is still a sample, keyed by its line: reading
    it gives an error row later, and the rest of the list is captioned."""
    (tmp_path / "notes.txt").write_text("not an image")
    listing = tmp_path / "list.txt"
    lines = [str(tmp_path / "missing.jpg"), str(tmp_path / "notes.txt"), str(tmp_path / "gone-000.tar")]
    listing.write_text("\n".join(lines) + "\n")
    found = resolve_inputs([f"@{listing}"])
    assert _keys(found) == sorted(lines[:2])
    assert [ref.source for ref in found.shards] == [lines[2]]


def test_missing_list_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        resolve_inputs([f"@{tmp_path / 'no-such-list.txt'}"])


# --- manifests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m.jsonl", "M.JSONL", "m.jsonl.gz", "m.parquet", "memory://bucket/m.parquet?x=1"])
def test_manifests_recognised_by_suffix(tmp_path: Path, name: str, memory_fs) -> None:
    """Manifests are recognised by name alone and kept, in order, to be streamed later (only their
    first record is read, to refuse an unreadable one before any work)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    location = name if "://" in name else str(tmp_path / name)
    if name.lower().endswith(".parquet") or ".parquet?" in name:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": ["a.jpg"]}), buffer)
        if "://" in name:
            memory_fs.pipe(name[len("memory:/"):], buffer.getvalue())
        else:
            (tmp_path / name).write_bytes(buffer.getvalue())
    else:
        (tmp_path / name).write_text("")
    found = resolve_inputs([location])
    assert found.manifests == [location]
    assert found.listed == [] and found.shards == []
    assert found.streams == 1


# --- URLs ----------------------------------------------------------------------------------------


def test_image_url_keyed_by_its_identity(tmp_path: Path, serve_folder: Callable[[Path], str]) -> None:
    """An image URL is one listed sample keyed by its identity, recorded redacted, opened by the full one."""
    _image(tmp_path / "x.jpg")
    base = serve_folder(tmp_path)
    plain = f"{base}/x.jpg"
    signed = f"{base}/x.jpg?sig=abc"
    found = resolve_inputs([plain])
    assert _keys(found) == [plain]
    assert found.listed[0].path == plain and found.listed[0].source == plain
    (sample,) = resolve_inputs([signed]).listed
    assert sample.path == signed
    assert "sig=abc" not in sample.key and "sig=abc" not in sample.source
    assert sample.key.startswith(plain)


def test_urls_differing_in_their_query_are_two_samples() -> None:
    """`?id=1` and `?id=2` are two objects: two samples with distinct keys (whole-query redaction keyed
    both `?REDACTED` and dropped one); the same URL signed again keeps its key and source."""
    urls = ["http://127.0.0.1:1/img.jpg?id=1", "http://127.0.0.1:1/img.jpg?id=2&X-Amz-Signature=s1"]
    found = resolve_inputs(urls)
    assert _keys(found) == ["http://127.0.0.1:1/img.jpg?id=1", "http://127.0.0.1:1/img.jpg?id=2"]
    assert [sample.signature for sample in found.listed] == [None, None]
    (resigned,) = resolve_inputs(["http://127.0.0.1:1/img.jpg?id=2&X-Amz-Signature=s2"]).listed
    assert (resigned.key, resigned.source) == (found.listed[1].key, found.listed[1].source)
    assert "s1" not in found.listed[1].source and "s2" not in resigned.source


def test_local_samples_carry_stat_signatures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder images, image files and file-list entries are signed `size:mtime_ns` from a stat, which a
    rename keeps; a list entry that is gone has none."""
    import os

    monkeypatch.chdir(tmp_path)
    image = _image(tmp_path / "in" / "a.jpg", b"12345")
    os.utime(image, ns=(1_000_000_007, 1_000_000_007))
    expected = "5:1000000007"
    (folder,) = resolve_inputs([str(tmp_path / "in")]).listed
    (single,) = resolve_inputs([str(image)]).listed
    (tmp_path / "list.txt").write_text("in/a.jpg\ngone.jpg\n")
    listed = resolve_inputs(["@list.txt"]).listed
    assert [folder.signature, single.signature] == [expected, expected]
    assert {s.key: s.signature for s in listed} == {"in/a.jpg": expected, "gone.jpg": None}
    os.rename(tmp_path / "in", tmp_path / "moved")
    (moved,) = resolve_inputs([str(tmp_path / "moved")]).listed
    assert (moved.key, moved.signature) == (folder.key, expected) and moved.source != folder.source


def test_remote_folder_samples_carry_listing_signatures(memory_fs: object) -> None:
    """A remote folder's images are signed from the listing's detail (size and a content tag or time)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/sig/a.jpg", b"1234")
    (sample,) = resolve_inputs(["memory://sig/"]).listed
    assert sample.signature is not None and sample.signature.startswith("4:")


def test_credentials_in_image_url_never_reach_key_or_source() -> None:
    """user:password@ and signed query strings are removed from what rows record."""
    url = "http://user:secret@127.0.0.1:1/x.jpg?sig=abc"
    (sample,) = resolve_inputs([url]).listed
    assert sample.path == url
    for recorded in (sample.key, sample.source):
        assert "secret" not in recorded
        assert "user" not in recorded
        assert "sig=abc" not in recorded
        assert "127.0.0.1:1/x.jpg" in recorded


def test_http_folder_listing(tmp_path: Path, serve_folder: Callable[[Path], str]) -> None:
    """An HTTP folder with a directory listing is walked like any remote folder."""
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "sub" / "b.png")
    _tar(tmp_path / "s.tar")
    base = serve_folder(tmp_path)
    found = resolve_inputs([f"{base}/"])
    assert _keys(found) == ["a.jpg", "sub/b.png"]
    assert [s.path for s in found.listed] == [f"{base}/a.jpg", f"{base}/sub/b.png"]
    assert found.shards == [ShardRef(url=f"{base}/s.tar", source=f"{base}/s.tar")]


def test_remote_folder_on_memory_fs(memory_fs: object) -> None:
    """A memory:// folder is listed like a local one: images by relative key, shards as ShardRefs."""
    memory_fs.pipe("/bucket/data/a.jpg", b"a")  # type: ignore[attr-defined]
    memory_fs.pipe("/bucket/data/sub/b.png", b"b")  # type: ignore[attr-defined]
    memory_fs.pipe("/bucket/data/.cache/c.png", b"c")  # type: ignore[attr-defined]
    memory_fs.pipe("/bucket/data/notes.txt", b"t")  # type: ignore[attr-defined]
    memory_fs.pipe("/bucket/data/shards/s-0.tar", b"tar")  # type: ignore[attr-defined]
    found = resolve_inputs(["memory://bucket/data"])
    assert _keys(found) == ["a.jpg", "sub/b.png"]
    assert [read_bytes(s.path or "") for s in found.listed] == [b"a", b"b"]
    assert all(s.path and s.path.startswith("memory://") for s in found.listed)
    assert all(s.source.endswith(s.key) for s in found.listed)
    (shard,) = found.shards
    assert shard.url.startswith("memory://") and shard.url.endswith("/bucket/data/shards/s-0.tar")
    assert read_bytes(shard.url) == b"tar"


def test_remote_folder_sources_are_the_urls(memory_fs: object) -> None:
    """A credential-free remote URL is recorded as it is: source equals the URL that opens it."""
    memory_fs.pipe("/bucket/data/a.jpg", b"a")  # type: ignore[attr-defined]
    memory_fs.pipe("/bucket/data/s-0.tar", b"tar")  # type: ignore[attr-defined]
    found = resolve_inputs(["memory://bucket/data"])
    assert [s.source for s in found.listed] == [s.path for s in found.listed]
    assert [ref.source for ref in found.shards] == [ref.url for ref in found.shards]


def test_remote_folder_that_does_not_exist(memory_fs: object) -> None:
    with pytest.raises(UsageError):
        resolve_inputs(["memory://bucket/nothing-here"])


def test_remote_shard_spec_is_not_listed(memory_fs: object) -> None:
    """Remote shard specs become refs without being checked: a missing one is an error row later."""
    found = resolve_inputs(["memory://bucket/s-{0..1}.tar"])
    assert [ref.url for ref in found.shards] == ["memory://bucket/s-0.tar", "memory://bucket/s-1.tar"]


# --- mistakes ------------------------------------------------------------------------------------


def test_same_key_from_two_sources_is_a_usage_error(tmp_path: Path) -> None:
    """Two folders that both hold `a.jpg` would write two rows with one key: refused."""
    _image(tmp_path / "one" / "a.jpg")
    _image(tmp_path / "two" / "a.jpg")
    with pytest.raises(UsageError):
        resolve_inputs([str(tmp_path / "one"), str(tmp_path / "two")])


def test_same_name_from_two_files_is_a_usage_error(tmp_path: Path) -> None:
    one, two = _image(tmp_path / "one" / "a.jpg"), _image(tmp_path / "two" / "a.jpg")
    with pytest.raises(UsageError):
        resolve_inputs([str(one), str(two)])


def test_non_image_file_is_a_usage_error(tmp_path: Path) -> None:
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(UsageError):
        resolve_inputs([str(text)])


def test_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        resolve_inputs([str(tmp_path / "missing.jpg")])


def test_missing_local_manifest_is_a_usage_error(tmp_path: Path) -> None:
    """A manifest that is not there is refused before any work, like a missing folder."""
    with pytest.raises(UsageError):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
