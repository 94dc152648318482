"""Hostile shards: members that would escape a folder, links, devices and oversized members become error
samples without being read, the good samples around them still come through, and nothing touches the
filesystem (like webdataset's own test_security.py, but nothing here is ever extracted)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.inputs.shards import read_shard

SOURCE = "shards/hostile.tar"


def _member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _shard(*hostile: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """Good samples 000000 and 000009 around the hostile members."""
    members = [_member("000000.jpg", b"good 0"), _member("000000.json", b'{"i": 0}'), *hostile]
    members += [_member("000009.jpg", b"good 9"), _member("000009.txt", b"nine")]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _snapshot(root: Path) -> set[str]:
    return {os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files}


@pytest.fixture
def untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Runs the test in an empty cwd, makes any extraction fail loudly, and checks no file appeared."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a shard member was extracted")

    for method in ("extract", "extractall", "_extract_member", "makefile", "makelink", "makefifo", "makedev"):
        monkeypatch.setattr(tarfile.TarFile, method, refuse)
    before = _snapshot(tmp_path)
    yield
    assert _snapshot(tmp_path) == before
    assert not any(cwd.iterdir())


def _read(raw: bytes, **options: object) -> list[Sample]:
    return list(read_shard(SOURCE, io.BytesIO(raw), **options))  # type: ignore[arg-type]


def _assert_good_around(samples: list[Sample]) -> None:
    good = [(s.key, s.data) for s in samples if s.error_kind is None]
    assert good == [("000000", b"good 0"), ("000009", b"good 9")]


def _assert_error(sample: Sample, key: str, kind: ErrorKind) -> None:
    assert (sample.key, sample.error_kind, sample.source) == (key, kind, SOURCE)
    assert sample.data is None and sample.meta is None and sample.ext is None
    assert sample.error_message and "\n" not in sample.error_message


@pytest.mark.parametrize(
    ("member", "key"),
    [
        (_member("/abs/evil.jpg", b"evil"), "/abs/evil"),
        (_member("/evil.jpg", b"evil"), "/evil"),
        (_member("../evil.jpg", b"evil"), "../evil"),
        (_member("a/../../b.jpg", b"evil"), "a/../../b"),
        (_member("deep/../../../../etc/cron.d/x.jpg", b"evil"), "deep/../../../../etc/cron.d/x"),
        (_member("..", b"evil"), ".."),
        (_member("../escape", kind=tarfile.DIRTYPE), "../escape"),
        (_member("000001.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"), "000001"),
        (_member("000001.jpg", kind=tarfile.LNKTYPE, link="/etc/passwd"), "000001"),
        (_member("000001.jpg", kind=tarfile.SYMTYPE, link="../../../etc/passwd"), "000001"),
        (_member("evil", kind=tarfile.SYMTYPE, link="/etc/passwd"), "evil"),
        (_member("000001.jpg", kind=tarfile.FIFOTYPE), "000001"),
        (_member("000001.jpg", kind=tarfile.CHRTYPE), "000001"),
        (_member("000001.jpg", kind=tarfile.BLKTYPE), "000001"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_hostile_member_is_an_unsafe_error_sample(
    untouched: None, member: tuple[tarfile.TarInfo, bytes], key: str
) -> None:
    raw = _shard(member)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getmembers()[2].name == member[0].name  # the hostile name was written as meant
    samples = _read(raw)
    assert len(samples) == 3
    _assert_good_around(samples)
    _assert_error(samples[1], key, ErrorKind.UNSAFE)


def test_hostile_side_member_spoils_its_whole_sample(untouched: None) -> None:
    raw = _shard(
        _member("000001.jpg", b"image"),
        _member("000001.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _member("000001.json", b"{}"),
    )
    samples = _read(raw)
    assert [s.key for s in samples] == ["000000", "000001", "000009"]
    _assert_good_around(samples)
    _assert_error(samples[1], "000001", ErrorKind.UNSAFE)


def test_many_hostile_members_in_one_shard(untouched: None) -> None:
    raw = _shard(
        _member("/abs.jpg", b"x"),
        _member("000002.jpg", kind=tarfile.LNKTYPE, link="/etc/shadow"),
        _member("../up.jpg", b"x"),
        _member("000003.png", kind=tarfile.FIFOTYPE),
    )
    samples = _read(raw)
    assert [(s.key, s.error_kind) for s in samples] == [
        ("000000", None),
        ("/abs", ErrorKind.UNSAFE),
        ("000002", ErrorKind.UNSAFE),
        ("../up", ErrorKind.UNSAFE),
        ("000003", ErrorKind.UNSAFE),
        ("000009", None),
    ]


def test_plain_folder_members_are_skipped(untouched: None) -> None:
    samples = _read(_shard(_member("sub", kind=tarfile.DIRTYPE), _member("sub/a.b", kind=tarfile.DIRTYPE)))
    assert [(s.key, s.error_kind) for s in samples] == [("000000", None), ("000009", None)]


@pytest.mark.parametrize("big", ["000001.webp", "000001.json", "000001.txt"])
def test_member_over_the_size_limit_is_too_large_and_not_read(untouched: None, big: str) -> None:
    raw = _shard(_member("000001.jpg", b"small"), _member(big, b"x" * 5000))
    samples = _read(raw, max_member_bytes=1000)
    assert len(samples) == 3
    _assert_good_around(samples)
    _assert_error(samples[1], "000001", ErrorKind.TOO_LARGE)


def test_huge_declared_size_is_never_allocated(untouched: None) -> None:
    """A header claiming 10 GB with a few bytes behind it: refused by size, then the stream runs out."""
    good = _shard()[:1024]  # the header and data block of 000000.jpg, no end-of-archive
    huge = tarfile.TarInfo("000001.jpg")
    huge.size = 10 * 1024**3
    raw = good + huge.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 4096
    for max_member_bytes in (1000, 20 * 1024**3):  # over the limit, or under it: either way never held
        samples = _read(raw, max_member_bytes=max_member_bytes)
        assert (samples[0].key, samples[0].data) == ("000000", b"good 0")
        assert len(samples) == 2 and samples[1].error_kind == ErrorKind.SHARD
        assert samples[1].key.startswith(f"{SOURCE}@") and "000001" in (samples[1].error_message or "")


def test_unsafe_outranks_too_large(untouched: None) -> None:
    raw = _shard(_member("000001.jpg", b"x" * 5000), _member("000001.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"))
    samples = _read(raw, max_member_bytes=1000)
    _assert_error(samples[1], "000001", ErrorKind.UNSAFE)
