"""Sidecar captions: `<stem>.txt` beside the image, written atomically, never clobbering a different
caption unless asked, and never written through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from caprl_cli.outputs.sidecar import SidecarResult, sidecar_path, write_sidecar

CAPTION = "A café — two\nlines, no trailing newline"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    "image,expected",
    [("cat.jpg", "cat.txt"), ("a.b.png", "a.b.txt"), ("sub/x.JPEG", "sub/x.txt"), ("noext", "noext.txt")],
)
def test_sidecar_path(image: str, expected: str) -> None:
    assert sidecar_path(image) == Path(expected)
    assert sidecar_path(Path("/data") / image) == Path("/data") / expected


def test_written_then_unchanged(tmp_path: Path) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"jpeg")
    assert write_sidecar(image, CAPTION, replace=False) is SidecarResult.WRITTEN
    assert (tmp_path / "cat.txt").read_bytes() == CAPTION.encode("utf-8")
    mtime = (tmp_path / "cat.txt").stat().st_mtime_ns
    assert write_sidecar(image, CAPTION, replace=False) is SidecarResult.UNCHANGED
    assert write_sidecar(image, CAPTION, replace=True) is SidecarResult.UNCHANGED
    assert (tmp_path / "cat.txt").stat().st_mtime_ns == mtime
    assert _names(tmp_path) == ["cat.jpg", "cat.txt"]  # no temporaries left


def test_existing_different_kept_unless_overwrite(tmp_path: Path) -> None:
    image = tmp_path / "a.b.png"
    (tmp_path / "a.b.txt").write_text("hand written tags", encoding="utf-8")
    assert write_sidecar(image, CAPTION, replace=False) is SidecarResult.KEPT_EXISTING
    assert (tmp_path / "a.b.txt").read_text(encoding="utf-8") == "hand written tags"
    # Same length, different bytes: the size check alone must not call it unchanged.
    (tmp_path / "a.b.txt").write_bytes(b"x" * len(CAPTION.encode("utf-8")))
    assert write_sidecar(image, CAPTION, replace=False) is SidecarResult.KEPT_EXISTING
    assert write_sidecar(image, CAPTION, replace=True) is SidecarResult.WRITTEN
    assert (tmp_path / "a.b.txt").read_bytes() == CAPTION.encode("utf-8")
    assert _names(tmp_path) == ["a.b.txt"]


def test_symlinked_sidecar_is_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "important.txt"
    victim.write_text(CAPTION, encoding="utf-8")  # even identical content is not read through the link
    images = tmp_path / "images"
    images.mkdir()
    link = images / "cat.txt"
    link.symlink_to(victim)
    assert write_sidecar(images / "cat.jpg", CAPTION, replace=False) is SidecarResult.KEPT_EXISTING
    assert link.is_symlink()
    assert write_sidecar(images / "cat.jpg", "new caption", replace=True) is SidecarResult.WRITTEN
    assert not link.is_symlink() and link.read_text(encoding="utf-8") == "new caption"
    assert victim.read_text(encoding="utf-8") == CAPTION
    dangling = images / "dog.txt"
    dangling.symlink_to(tmp_path / "nowhere.txt")
    assert write_sidecar(images / "dog.png", "dog", replace=False) is SidecarResult.KEPT_EXISTING
    assert not (tmp_path / "nowhere.txt").exists()
    assert _names(images) == ["cat.txt", "dog.txt"]


def test_stale_temporary_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep", encoding="utf-8")
    temp = tmp_path / f".cat.txt.{os.getpid()}.tmp"
    temp.symlink_to(target)
    assert write_sidecar(tmp_path / "cat.jpg", CAPTION, replace=False) is SidecarResult.WRITTEN
    assert target.read_text(encoding="utf-8") == "keep"
    assert _names(tmp_path) == ["cat.txt", "target"]


def test_directory_in_the_way_is_kept(tmp_path: Path) -> None:
    (tmp_path / "cat.txt").mkdir()
    assert write_sidecar(tmp_path / "cat.jpg", CAPTION, replace=False) is SidecarResult.KEPT_EXISTING
    assert (tmp_path / "cat.txt").is_dir()


def test_failed_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_sidecar(tmp_path / "cat.jpg", CAPTION, replace=False)
    assert _names(tmp_path) == []


def test_images_sharing_a_stem_get_their_whole_name(tmp_path: Path) -> None:
    """`cat.jpg` and `cat.png` would share `cat.txt`: each keeps its caption in `<name>.txt`; a stem no
    other image shares keeps `<stem>.txt` (non-images and hidden files do not count)."""
    for name in ("cat.jpg", "cat.png", "dog.png", "dog.txt", ".bird.png", "bird.png"):
        (tmp_path / name).write_bytes(b"x")
    from caprl_cli.outputs.sidecar import shared_stems_in

    shared = shared_stems_in(tmp_path)
    assert shared == {"cat"}
    assert write_sidecar(tmp_path / "cat.jpg", "one", replace=False, shared_stems=shared) is SidecarResult.WRITTEN
    assert write_sidecar(tmp_path / "cat.png", "two", replace=False, shared_stems=shared) is SidecarResult.WRITTEN
    assert sidecar_path(tmp_path / "bird.png", shared) == tmp_path / "bird.txt"
    assert (tmp_path / "cat.jpg.txt").read_text() == "one" and (tmp_path / "cat.png.txt").read_text() == "two"
    assert not (tmp_path / "cat.txt").exists()
