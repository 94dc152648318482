"""Reading WebDataset tar shards: keys group exactly as webdataset groups them, image bytes come through
untouched, and damaged or malformed shards give error samples instead of exceptions."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.inputs.shards import MAX_META_MEMBER_BYTES, is_shard_name, read_shard, split_member_name

SOURCE = "s3://bucket/shard-000.tar"


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _tar(members: list[tuple[str, bytes]], compression: str = "") -> bytes:
    """A shard holding `members` (name, bytes) in order; names ending in `/` are folders."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _members(raw: bytes) -> list[tarfile.TarInfo]:
    """The members as tarfile lists them from a seekable copy: the reference for offsets."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


def _read(raw: bytes, **options: object) -> list[Sample]:
    return list(read_shard(SOURCE, io.BytesIO(raw), **options))  # type: ignore[arg-type]


def _good(samples: list[Sample]) -> list[tuple[str, bytes | None, str | None]]:
    return [(s.key, s.data, s.ext) for s in samples if s.error_kind is None]


class NonSeekable(io.RawIOBase):
    """A network-like stream: reads forward only, cannot seek or tell, and counts what was read."""

    def __init__(self, raw: bytes) -> None:
        self._inner = io.BytesIO(raw)
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args: object) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        data = self._inner.read(min(len(buffer), 4096))
        buffer[: len(data)] = data
        self.consumed += len(data)
        return len(data)


SHARD_MEMBERS = [
    ("dir.v2/", b""),
    ("dir.v2/000001.jpg", _bytes(1, 700)),
    ("dir.v2/000001.json", json.dumps({"caption": "a cat", "n": 1}).encode()),
    ("dir.v2/000001.txt", "naïve text".encode()),
    ("000002.png", _bytes(2, 1300)),
    ("000002.cls", b"7"),
    ("000003.JPG", _bytes(3, 90)),
    ("000004.seg.png", _bytes(4, 200)),
    ("000004.webp", _bytes(5, 2100)),
    ("000004.json", b"{not json"),
    ("000005.tiff", _bytes(6, 513)),
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.tar", True),
        ("a.TAR", True),
        ("a.tar.gz", True),
        ("a.tgz", True),
        ("a.Tar.Gz", True),
        ("a.tar.bz2", False),
        ("a.zip", False),
        ("tar", False),
        ("a.jpg", False),
    ],
)
def test_is_shard_name(name: str, expected: bool) -> None:
    assert is_shard_name(name) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000001.jpg", ("000001", "jpg")),
        ("dir.v2/000001.jpg", ("dir.v2/000001", "jpg")),
        ("a.seg.png", ("a", "seg.png")),
        ("x.JPG", ("x", "jpg")),
        ("a/b/c.Tar.GZ", ("a/b/c", "tar.gz")),
        ("noext", None),
        ("dir.v2/noext", None),
        (".hidden", None),
        ("a/.b", ("a/", "b")),  # the regex lets the key end at the folder, as in webdataset
        ("", None),
    ],
)
def test_split_member_name(name: str, expected: tuple[str, str] | None) -> None:
    assert split_member_name(name) == expected
    base, ext = base_plus_ext(name)
    assert (None if base is None else (base, ext.lower())) == expected  # webdataset's own rule agrees


def test_tarfile_shard_groups_members_into_samples() -> None:
    samples = _read(_tar(SHARD_MEMBERS))
    by_key = {s.key: s for s in samples}
    assert [s.key for s in samples] == ["dir.v2/000001", "000002", "000003", "000004", "000005"]
    assert all(s.error_kind is None and s.error_message is None for s in samples)
    assert all(s.source == SOURCE and s.path is None for s in samples)
    assert (by_key["dir.v2/000001"].data, by_key["dir.v2/000001"].ext) == (_bytes(1, 700), "jpg")
    assert (by_key["000002"].data, by_key["000002"].ext) == (_bytes(2, 1300), "png")
    assert (by_key["000003"].data, by_key["000003"].ext) == (_bytes(3, 90), "jpg")  # uppercase .JPG
    assert (by_key["000004"].data, by_key["000004"].ext) == (_bytes(5, 2100), "webp")  # seg.png is no image
    assert (by_key["000005"].data, by_key["000005"].ext) == (_bytes(6, 513), "tiff")


def test_meta_holds_side_members_by_extension() -> None:
    by_key = {s.key: s for s in _read(_tar(SHARD_MEMBERS))}
    assert json.loads(by_key["dir.v2/000001"].meta or "") == {"json": {"caption": "a cat", "n": 1}, "txt": "naïve text"}
    assert json.loads(by_key["000002"].meta or "") == {"cls": "7"}
    assert json.loads(by_key["000004"].meta or "") == {"json": "{not json"}  # invalid JSON stays text
    assert by_key["000003"].meta is None and by_key["000005"].meta is None
    assert all(s.meta is None for s in _read(_tar(SHARD_MEMBERS), keep_meta=False))


def test_meta_leaves_out_binary_oversized_and_further_images() -> None:
    raw = _tar(
        [
            ("k.jpg", b"first image"),
            ("k.png", b"second image"),
            ("k.bin", b"\xff\xfe\x00binary"),
            ("k.big.txt", b"x" * (MAX_META_MEMBER_BYTES + 1)),
            ("k.nan.json", b'{"v": NaN}'),
            ("k.ok.json", b'{"b": [1, 2], "a": "\xc3\xa9"}'),
        ]
    )
    (sample,) = _read(raw)
    assert (sample.key, sample.data, sample.ext) == ("k", b"first image", "jpg")
    assert json.loads(sample.meta or "") == {"nan.json": '{"v": NaN}', "ok.json": {"a": "é", "b": [1, 2]}}


def test_shard_written_by_webdataset_matches_webdataset_reader(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"part.{i % 2}/{i:06d}", "jpg": _bytes(i, 100 + 37 * i), "json": {"i": i}, "txt": f"t{i}"}
        for i in range(12)
    ]
    for name in ("shard.tar", "shard.tar.gz"):
        path = tmp_path / name
        with wds.TarWriter(str(path)) as writer:
            for sample in samples:
                writer.write(sample)
        with path.open("rb") as stream:
            ours = list(read_shard(str(path), stream))
        theirs = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
        assert [s.key for s in ours] == [t["__key__"] for t in theirs] == [s["__key__"] for s in samples]
        assert [s.data for s in ours] == [t["jpg"] for t in theirs] == [s["jpg"] for s in samples]
        assert [json.loads(s.meta or "") for s in ours] == [{"json": {"i": i}, "txt": f"t{i}"} for i in range(12)]


def test_grouping_matches_webdataset_reader_on_tarfile_shard(tmp_path: Path) -> None:
    """Folders and names without an extension are skipped without splitting the sample around them."""
    members = SHARD_MEMBERS[:3] + [("README", b"readme"), ("notes/", b"")] + SHARD_MEMBERS[3:]
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar(members))
    ours = _read(path.read_bytes())
    theirs = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    assert [s.key for s in ours] == [t["__key__"] for t in theirs]
    assert all(s.error_kind is None for s in ours)
    assert json.loads(ours[0].meta or "")["txt"] == "naïve text"


def test_gzip_shard_reads_like_plain() -> None:
    assert _read(_tar(SHARD_MEMBERS, "gz")) == _read(_tar(SHARD_MEMBERS))


def test_non_seekable_stream() -> None:
    for raw in (_tar(SHARD_MEMBERS), _tar(SHARD_MEMBERS, "gz")):
        stream = NonSeekable(raw)
        assert list(read_shard(SOURCE, stream)) == _read(raw)
        assert not stream.closed  # the caller owns the stream


def test_samples_stream_out_before_the_shard_is_read() -> None:
    raw = _tar([(f"{i:04d}.jpg", _bytes(i, 64 * 1024)) for i in range(32)])
    stream = NonSeekable(raw)
    samples = read_shard(SOURCE, stream)
    first = next(samples)
    assert first.key == "0000" and stream.consumed < len(raw) // 4
    assert [s.key for s in samples] == [f"{i:04d}" for i in range(1, 32)]


def test_group_without_image_is_an_error_sample() -> None:
    raw = _tar([("a.jpg", b"A"), ("b.json", b"{}"), ("b.txt", b"t"), ("c.seg.png", b"S"), ("d.png", b"D")])
    samples = _read(raw)
    assert [(s.key, s.error_kind) for s in samples] == [
        ("a", None),
        ("b", ErrorKind.SHARD),
        ("c", ErrorKind.SHARD),
        ("d", None),
    ]
    assert all(s.data is None and s.meta is None for s in samples if s.error_kind)
    assert "b.json" in (samples[1].error_message or "") and "\n" not in (samples[1].error_message or "")


def test_duplicate_member_makes_the_sample_ambiguous() -> None:
    raw = _tar([("a.jpg", b"A"), ("b.jpg", b"B1"), ("b.json", b"{}"), ("b.jpg", b"B2"), ("c.jpg", b"C")])
    samples = _read(raw)
    assert [(s.key, s.error_kind) for s in samples] == [("a", None), ("b", ErrorKind.SHARD), ("c", None)]
    assert samples[1].data is None
    assert [(s.key, s.error_kind) for s in _read(_tar([("b.jpg", b"1"), ("b.JPG", b"2")]))] == [("b", ErrorKind.SHARD)]


def test_key_repeated_apart_from_its_sample_gets_its_own_error_key() -> None:
    raw = _tar([("a.jpg", b"A"), ("b.jpg", b"B"), ("a.json", b"{}"), ("a.png", b"A2"), ("c.jpg", b"C")])
    offset = _members(raw)[2].offset
    samples = _read(raw)
    assert [(s.key, s.error_kind) for s in samples] == [
        ("a", None),
        ("b", None),
        (f"a@{offset}", ErrorKind.SHARD),
        ("c", None),
    ]
    assert samples[0].data == b"A" and samples[2].data is None
    assert len({s.key for s in samples}) == len(samples)


def test_error_keys_never_collide_with_real_keys() -> None:
    first = _tar([("a.jpg", b"A"), ("b.jpg", b"B"), ("a.png", b"A2")])
    offset = _members(first)[2].offset
    samples = _read(_tar([("a.jpg", b"A"), ("b.jpg", b"B"), ("a.png", b"A2"), (f"a@{offset}.jpg", b"X")]))
    assert [s.key for s in samples][:3] == ["a", "b", f"a@{offset}"]
    assert len({s.key for s in samples}) == 4 and samples[3].error_kind == ErrorKind.SHARD


@pytest.mark.parametrize("raw", [b"", _bytes(9, 4096), b"\0" * 100, gzip.compress(_bytes(9, 4096)), b"\x1f\x8b"])
def test_not_a_tar_is_one_error_sample(raw: bytes) -> None:
    (sample,) = _read(raw)
    assert (sample.key, sample.source, sample.error_kind, sample.data) == (f"{SOURCE}@0", SOURCE, ErrorKind.SHARD, None)
    assert SOURCE in (sample.error_message or "")


def test_empty_archive_has_no_samples() -> None:
    assert _read(_tar([])) == []


def _group_ends(raw: bytes) -> list[tuple[str, int]]:
    """(key, byte just past its last member's data) for each sample of a clean shard."""
    ends: dict[str, int] = {}
    for member in _members(raw):
        split = split_member_name(member.name)
        if split and member.isfile():
            ends[split[0]] = member.offset_data + member.size
    return list(ends.items())


def _check_cut(samples: list[Sample], clean: list[Sample]) -> Sample | None:
    """A cut shard yields a prefix of the clean samples and at most one damage sample, last."""
    errors = [s for s in samples if s.error_kind is not None]
    assert len(errors) <= 1
    assert samples[: len(samples) - len(errors)] == clean[: len(samples) - len(errors)]
    if not errors:
        return None
    (error,) = errors
    assert error is samples[-1] and error.error_kind == ErrorKind.SHARD and error.data is None
    assert error.key.startswith(f"{SOURCE}@") and error.key.rsplit("@", 1)[1].isdigit()
    message = error.error_message or ""
    assert SOURCE in message and error.key.rsplit("@", 1)[1] in message and "\n" not in message
    return error


def test_truncation_at_any_offset_keeps_the_samples_before_it() -> None:
    members = [(n, d) for n, d in SHARD_MEMBERS if not n.endswith("/")]
    raw = _tar(members)
    clean = _read(raw)
    ends = _group_ends(raw)
    end_block = -(-max(end for _, end in ends) // 512) * 512  # the end-of-archive block starts here
    boundaries = [m.offset for m in _members(raw)] + [end_block, end_block + 512]
    for cut in sorted(set(range(0, len(raw), 97)) | set(boundaries)):
        samples = _read(raw[:cut])
        error = _check_cut(samples, clean)
        complete = sum(1 for _, end in ends if end <= cut)
        good = len(samples) - (error is not None)
        assert good >= complete - 1, cut
        if cut < end_block + 512:  # cut before the end-of-archive block is whole: always reported
            assert error is not None, cut
            assert int(error.key.rsplit("@", 1)[1]) <= -(-cut // 512) * 512
        else:
            assert error is None and samples == clean, cut


def test_truncated_gzip_shard_at_any_offset() -> None:
    raw = _tar(SHARD_MEMBERS, "gz")
    clean = _read(raw)
    for cut in range(0, len(raw), 97):
        samples = list(read_shard(SOURCE, NonSeekable(raw[:cut])))
        _check_cut(samples, clean)
        assert samples[-1].error_kind == ErrorKind.SHARD, cut  # the compressed tail holds the end block


def test_corrupt_header_in_the_middle_is_damage() -> None:
    raw = bytearray(_tar([("a.jpg", b"A"), ("b.jpg", b"B"), ("c.jpg", b"C")]))
    offset = _members(bytes(raw))[1].offset
    raw[offset + 100] ^= 0xFF  # breaks the header checksum
    samples = _read(bytes(raw))
    assert [(s.key, s.error_kind) for s in samples] == [(f"{SOURCE}@{offset}", ErrorKind.SHARD)]
    assert "'a'" in (samples[0].error_message or "")  # the sample being read when it broke is named


def test_corrupt_gzip_data_never_raises() -> None:
    """Garbled deflate data may still decode (tarfile's stream mode checks no CRC), or fail anywhere."""
    raw = bytearray(_tar([(f"{i}.jpg", _bytes(i, 5000)) for i in range(8)], "gz"))
    for position in range(10, len(raw) - 20, 301):
        broken = raw[:position] + bytes(b ^ 0x5A for b in raw[position : position + 16]) + raw[position + 16 :]
        samples = _read(bytes(broken))
        errors = [s for s in samples if s.error_kind is not None]
        assert all(s.error_kind in (ErrorKind.SHARD, ErrorKind.UNSAFE, ErrorKind.TOO_LARGE) for s in errors)
        assert len({s.key for s in samples}) == len(samples)


def test_samples_are_signed_by_their_image_bytes() -> None:
    """Each sample carries a short hash of its image's bytes: equal images sign equal, others differ,
    so a shard moved elsewhere is recognised and another image under the same key is not."""
    raw = _tar([("a.jpg", b"image one"), ("b.jpg", b"image two"), ("c.jpg", b"image one")])
    signatures = [sample.signature for sample in _read(raw)]
    assert signatures[0] == signatures[2] != signatures[1]
    assert all(signature and "image" not in signature for signature in signatures)
