"""WebDataset shards: WebDataset itself and tarfile read back exactly what was written, member keys are
an injective escape of caption keys, and a shard only ever exists whole under its real name."""

from __future__ import annotations

import json
import random
import re
import tarfile
import uuid
from pathlib import Path

import fsspec
import pytest
import webdataset as wds

from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.outputs.rows import COLUMNS, caption_row, error_row
from caprl_cli.inputs.shards import split_member_name
from caprl_cli.outputs.tar_shards import DEFAULT_SHARD_PATTERN, ShardSetWriter, existing_shard_numbers, member_key, remove_shards, rewrite_without, shard_name, split_output_pattern

WDS_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _rows(n: int, long_keys: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        key = f"sub/ünï {i}/" + ("x" * 300 if long_keys and i % 2 else "") + f"img.{i}.jpg"
        if i % 4 == 3:
            rows.append(error_row(key=key, source=f"/d/{key}", model="tiny", kind=ErrorKind.DECODE, message="bad"))
        else:
            rows.append(caption_row(
                key=key, source=f"/d/{key}", model="tiny", caption=f"A café № {i}\nline two", finish_reason="stop",
                prompt_tokens=10, output_tokens=i, width=640, height=480,
                meta=json.dumps({"i": i, "tags": ["a"]}) if i % 2 else None,
            ))
    return rows


def _image(row: dict) -> bytes:
    """Stand-in image bytes, distinct per row and not valid UTF-8, so any re-encoding would show."""
    return b"\xff\xd8\xff" + row["key"].encode("utf-8") + b"\x00\xff\xd9"


def _write(directory: str, rows: list[dict], *, shard_size: int = 3, with_images: bool = True, first: int = 0,
           pattern: str = DEFAULT_SHARD_PATTERN) -> list[str]:
    writer = ShardSetWriter(directory, pattern, first_number=first, shard_size=shard_size, with_images=with_images)
    for row in rows:
        writer.add(row, _image(row), "jpg")
    return writer.close()


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _check_samples(samples: list[dict], rows: list[dict], with_images: bool = True) -> None:
    assert [s["__key__"] for s in samples] == [member_key(r["key"]) for r in rows]
    for sample, row in zip(samples, rows):
        document = json.loads(sample["json"])
        assert list(document) == list(COLUMNS)
        assert document["meta"] == (json.loads(row["meta"]) if row["meta"] else None)
        assert {k: v for k, v in document.items() if k != "meta"} == {k: row[k] for k in COLUMNS if k != "meta"}
        extensions = {k for k in sample if not k.startswith("__")}
        if row["status"] == "ok":
            assert sample["txt"].decode("utf-8") == row["caption"]
            assert extensions == ({"json", "txt", "jpg"} if with_images else {"json", "txt"})
            if with_images:
                assert sample["jpg"] == _image(row)
        else:
            assert extensions == {"json"}


def test_local_shards_read_back_with_webdataset_and_tarfile(tmp_path: Path) -> None:
    rows = _rows(8, long_keys=True)
    names = _write(str(tmp_path / "out"), rows, shard_size=3)
    assert names == ["000000.tar", "000001.tar", "000002.tar"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temporaries left
    urls = [str(tmp_path / "out" / name) for name in names]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    _check_samples(samples, rows)
    counts = [len({split_member_name(m.name)[0] for m in _tar_members(Path(u))}) for u in urls]
    assert counts == [3, 3, 2]


def test_members_are_plain_contiguous_and_normalised(tmp_path: Path) -> None:
    rows = _rows(5)
    _write(str(tmp_path), rows, shard_size=10)
    members = _tar_members(tmp_path / "000000.tar")
    keys = [split_member_name(m.name)[0] for m in members]
    runs = [k for j, k in enumerate(keys) if j == 0 or keys[j - 1] != k]
    assert runs == [member_key(r["key"]) for r in rows]  # each sample's members are contiguous
    assert len({m.mtime for m in members}) == 1
    for m in members:
        assert m.isreg() and m.mode == 0o644 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
    assert all(m.pax_headers["path"] == m.name for m in members)  # PAX: non-ASCII names are exact


def test_without_images_and_default_extension(tmp_path: Path) -> None:
    rows = _rows(4)
    names = _write(str(tmp_path / "a"), rows, with_images=False)
    _check_samples(list(wds.WebDataset([str(tmp_path / "a" / n) for n in names], shardshuffle=False)), rows, False)
    writer = ShardSetWriter(str(tmp_path / "b"), DEFAULT_SHARD_PATTERN, first_number=0, shard_size=5,
                            with_images=True)
    writer.add(rows[0], b"raw", None)
    writer.add(rows[1], None, "png")  # no bytes: no image member
    writer.close()
    exts = sorted(split_member_name(m.name)[1] for m in _tar_members(tmp_path / "b" / "000000.tar"))
    assert exts == ["jpg", "json", "json", "txt", "txt"]
    with pytest.raises(ValueError):
        writer.add(rows[0], b"raw", "json")


def test_memory_and_file_urls(tmp_path: Path) -> None:
    rows = _rows(7)
    base = f"memory://wds-{uuid.uuid4().hex}/caps"
    names = _write(base, rows, shard_size=4, first=5, pattern="caps-%05d.tar")
    assert names == ["caps-00005.tar", "caps-00006.tar"]
    fs = fsspec.filesystem("memory")
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base.removeprefix("memory://"), detail=False))
    assert listed == names  # no temporaries, remote or local
    local = []
    for name in names:
        (tmp_path / name).write_bytes(fs.cat(f"{base}/{name}"))
        local.append(str(tmp_path / name))
    _check_samples(list(wds.WebDataset(local, shardshuffle=False)), rows)
    assert existing_shard_numbers(base, "caps-%05d.tar") == [5, 6]
    removed = rewrite_without(base, names[0], {member_key(rows[0]["key"]), member_key(rows[3]["key"])})
    assert removed == 2
    (tmp_path / names[0]).write_bytes(fs.cat(f"{base}/{names[0]}"))
    _check_samples(list(wds.WebDataset(local, shardshuffle=False)), [rows[1], rows[2], *rows[4:]])
    remove_shards(base, "caps-%05d.tar", [5, 6, 7])
    assert existing_shard_numbers(base, "caps-%05d.tar") == []

    url = f"file://{tmp_path / 'viafile'}"
    names = _write(url, rows, shard_size=7)
    assert names == ["000000.tar"] and sorted(p.name for p in (tmp_path / "viafile").iterdir()) == names
    _check_samples(list(wds.WebDataset([str(tmp_path / "viafile" / names[0])], shardshuffle=False)), rows)


def test_abort_keeps_nothing_half_written(tmp_path: Path) -> None:
    rows = _rows(5)
    writer = ShardSetWriter(str(tmp_path / "o"), DEFAULT_SHARD_PATTERN, first_number=0, shard_size=10,
                            with_images=True)
    for row in rows:
        writer.add(row, _image(row), "jpg")
    assert len(list((tmp_path / "o").iterdir())) == 1  # the hidden temporary, never a real name
    writer.abort()
    assert list((tmp_path / "o").iterdir()) == []

    writer = ShardSetWriter(str(tmp_path / "p"), DEFAULT_SHARD_PATTERN, first_number=0, shard_size=3,
                            with_images=False)
    for row in rows:
        writer.add(row, None, None)
    writer.abort()  # the finished first shard is whole and stays; the partial second one goes
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["000000.tar"]

    base = f"memory://wds-{uuid.uuid4().hex}/o"
    writer = ShardSetWriter(base, DEFAULT_SHARD_PATTERN, first_number=0, shard_size=10, with_images=True)
    writer.add(rows[0], _image(rows[0]), "jpg")
    built = writer._built
    writer.abort()
    assert fsspec.filesystem("memory").ls(base.removeprefix("memory://"), detail=False) == []
    assert built is not None and not built.exists()


def test_empty_run_writes_no_shard(tmp_path: Path) -> None:
    writer = ShardSetWriter(str(tmp_path), DEFAULT_SHARD_PATTERN, first_number=0, shard_size=3, with_images=False)
    assert writer.close() == []
    assert list(tmp_path.iterdir()) == []


def test_existing_remove_and_rewrite_local(tmp_path: Path) -> None:
    rows = _rows(6)
    _write(str(tmp_path), rows, shard_size=2)
    for stray in ["000007.tar.tmp", ".000009.tar.1.tmp", "7.tar", "0000010.tar", "x000003.tar", "000008.tar.gz"]:
        (tmp_path / stray).write_bytes(b"")
    (tmp_path / "1234567.tar").write_bytes(b"")  # wider than the padding: still exactly what %06d gives
    assert existing_shard_numbers(str(tmp_path), DEFAULT_SHARD_PATTERN) == [0, 1, 2, 1234567]
    assert existing_shard_numbers(str(tmp_path / "missing"), DEFAULT_SHARD_PATTERN) == []
    assert existing_shard_numbers(str(tmp_path), "%d.tar") == [7, 1234567]

    assert rewrite_without(str(tmp_path), "000001.tar", {"nothing-here"}) == 0
    assert rewrite_without(str(tmp_path), "000001.tar", {member_key(rows[2]["key"])}) == 1
    samples = list(wds.WebDataset([str(tmp_path / "000001.tar")], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [member_key(rows[3]["key"])]
    assert json.loads(samples[0]["json"])["key"] == rows[3]["key"]
    assert rewrite_without(str(tmp_path), "000001.tar", {member_key(rows[3]["key"])}) == 1
    assert _tar_members(tmp_path / "000001.tar") == []  # an empty shard keeps the numbering whole
    assert not list(tmp_path.glob(".000001.tar.*"))  # no temporary left behind

    remove_shards(str(tmp_path), DEFAULT_SHARD_PATTERN, [0, 2, 99])
    assert existing_shard_numbers(str(tmp_path), DEFAULT_SHARD_PATTERN) == [1, 1234567]


@pytest.mark.parametrize(
    "key,expected",
    [
        ("000123", "000123"),
        ("dir.v2/000123", "dir.v2/000123"),
        ("a/b/c", "a/b/c"),
        ("sub/cat.jpg", "sub/cat%2Ejpg"),
        ("../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd"),
        ("./a", "%2E/a"),
        ("/abs/x", "%2Fabs/x"),
        ("a//b", "a/%2Fb"),
        ("a/", "a%2F"),
        ("a.b/", "a%2Eb%2F"),  # the trailing slash is escaped, so a.b is the last component
        ("50%.png", "50%25%2Epng"),
        ("a\\b", "a%5Cb"),
        ("line\nbreak\x7f", "line%0Abreak%7F"),
        (".hidden", "%2Ehidden"),
        ("__meta__/x", "%5F_meta__/x"),
        ("café/日本.jpg", "café/日本%2Ejpg"),
    ],
)
def test_member_key_examples(key: str, expected: str) -> None:
    assert member_key(key) == expected


def _decode(escaped: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), escaped)


def test_member_key_is_injective_and_webdataset_safe() -> None:
    rng = random.Random(1234)
    alphabet = "ab./%\\_\n\x00\x85 é日-"
    keys = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(50_000)}
    keys |= {"a", ".", "..", "/", "//", "%", "%2E", ".a", "a.", "_", "__a__/b"}
    escaped: dict[str, str] = {}
    for key in keys:
        mk = member_key(key)
        assert escaped.setdefault(mk, key) == key, f"{key!r} and {escaped[mk]!r} both escape to {mk!r}"
        assert _decode(mk) == key
        match = WDS_SPLIT.match(f"{mk}.txt")
        assert match and match.groups() == (mk, "txt")
        components = mk.split("/")
        assert "" not in components and "." not in components and ".." not in components
        assert not re.match(r"__[^/]*__($|/)", f"{mk}.txt")  # WebDataset would skip it as metadata
    with pytest.raises(ValueError):
        member_key("")


def test_patterns() -> None:
    assert split_output_pattern("caps") == ("caps", DEFAULT_SHARD_PATTERN)
    assert split_output_pattern("caps/") == ("caps", DEFAULT_SHARD_PATTERN)
    assert split_output_pattern("caps/out-%06d.tar") == ("caps", "out-%06d.tar")
    assert split_output_pattern("out-%d.tar") == (".", "out-%d.tar")
    assert split_output_pattern("/out-%d.tar") == ("/", "out-%d.tar")
    assert split_output_pattern("s3://b/caps/") == ("s3://b/caps", DEFAULT_SHARD_PATTERN)
    assert split_output_pattern("memory://x/out-%05d.tar") == ("memory://x", "out-%05d.tar")
    assert split_output_pattern("memory://out-%05d.tar") == ("memory://", "out-%05d.tar")
    assert split_output_pattern("file:///tmp/c/%06d.tar") == ("file:///tmp/c", "%06d.tar")
    assert shard_name("out-%06d.tar", 42) == "out-000042.tar"
    for bad in ["caps/out.tar", "caps/%s.tar", "caps/%d-%d.tar", "caps/%06d.tgz", "caps/%6d.tar", "caps/%x.tar",
                "caps/%%%d.tar", "caps/%-3d.tar"]:
        with pytest.raises(UsageError):
            split_output_pattern(bad)
    for bad in ["%d", "a/%d.tar", "%06d.tar.gz"]:
        with pytest.raises(UsageError):
            existing_shard_numbers(".", bad)
        with pytest.raises(UsageError):
            ShardSetWriter(".", bad, first_number=0, shard_size=1, with_images=False)


def test_remove_stale_temporaries_only_touches_this_patterns_temporaries(tmp_path: Path) -> None:
    """A killed publish leaves `.<shard>.<pid>.tmp`; only those of this pattern go, shards stay."""
    from caprl_cli.outputs.tar_shards import remove_stale_temporaries

    names = [".000003.tar.4242.tmp", ".train-00001.tar.7.tmp", "000001.tar", ".other.tmp", ".000003.tar.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path), "%06d.tar") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(set(names) - {".000003.tar.4242.tmp"})
