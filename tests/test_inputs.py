"""Listing inputs: which files become samples and under which key; keys must be stable and unique."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from corpus import SKIPPED_KEYS

from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import is_image_name
from caprl_cli.inputs.resolve import list_samples


def _touch(root: Path, *keys: str) -> None:
    """Listing never opens a file, so placeholder bytes are enough."""
    for key in keys:
        path = root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"placeholder " + key.encode())


def _keys(inputs: list[Path | str]) -> list[str]:
    return [sample.key for sample in list_samples([str(item) for item in inputs])]


def test_corpus_keys_are_exactly_the_images(corpus) -> None:
    """Every image of the corpus, and nothing else, is listed once, sorted by key."""
    root, expected = corpus
    keys = _keys([root])
    assert keys == sorted(expected)
    assert len(keys) == len(set(keys))
    for skipped in SKIPPED_KEYS:
        assert skipped not in keys


def test_corpus_keys_are_relative_posix_paths(corpus) -> None:
    """Keys are the POSIX path relative to the input root; sources are absolute and point at the file."""
    root, _ = corpus
    for sample in list_samples([str(root)]):
        assert "\\" not in sample.key
        assert not sample.key.startswith(("/", "./"))
        assert ".." not in PurePosixPath(sample.key).parts
        assert Path(sample.path).relative_to(root).as_posix() == sample.key
        assert Path(sample.source).is_absolute()
        assert Path(sample.source) == (root / sample.key).resolve()
        assert sample.data is None


def test_same_name_in_two_subfolders(corpus) -> None:
    """`a/same.jpg` and `b/same.jpg` are two samples with two keys."""
    root, _ = corpus
    samples = {sample.key: sample for sample in list_samples([str(root)])}
    assert {"a/same.jpg", "b/same.jpg"} <= set(samples)
    assert samples["a/same.jpg"].source != samples["b/same.jpg"].source


def test_nested_and_awkward_names(corpus) -> None:
    """Deeply nested, spaced and non-ASCII names keep their exact key."""
    root, _ = corpus
    keys = set(_keys([root]))
    assert {"deep/er/nest.webp", "my photo 1.jpg", "café_ß_日本.png", "PHOTO_UPPER.JPG"} <= keys


def test_listing_is_stable(corpus) -> None:
    """Two listings of the same tree give the same samples in the same order."""
    root, _ = corpus
    assert list_samples([str(root)]) == list_samples([str(root)])


def test_single_file_keyed_by_name(corpus) -> None:
    """An image given directly is keyed by its file name alone."""
    root, _ = corpus
    samples = list_samples([str(root / "deep" / "er" / "nest.webp")])
    assert [sample.key for sample in samples] == ["nest.webp"]
    assert Path(samples[0].source) == (root / "deep" / "er" / "nest.webp").resolve()


def test_nonexistent_input_is_usage_error(tmp_path: Path) -> None:
    """A missing input is the caller's mistake."""
    with pytest.raises(UsageError):
        list_samples([str(tmp_path / "missing")])
    with pytest.raises(UsageError):
        list_samples([str(tmp_path / "missing.jpg")])


def test_non_image_file_is_usage_error(corpus) -> None:
    """A file that is not an image by extension is refused as input."""
    root, _ = corpus
    with pytest.raises(UsageError):
        list_samples([str(root / "notes.txt")])


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_neither_file_nor_folder_is_usage_error() -> None:
    """Something that exists but is neither a regular file nor a folder is refused."""
    with pytest.raises(UsageError):
        list_samples(["/dev/null"])


def test_colliding_keys_from_two_folders_are_usage_error(tmp_path: Path) -> None:
    """The same relative key under two different roots would make two rows share a key: refused."""
    _touch(tmp_path / "one", "x.jpg", "only_one.png")
    _touch(tmp_path / "two", "x.jpg", "only_two.png")
    with pytest.raises(UsageError):
        list_samples([str(tmp_path / "one"), str(tmp_path / "two")])


def test_colliding_file_and_folder_key_is_usage_error(tmp_path: Path) -> None:
    """A single file named like a top-level image of a folder input is a collision too."""
    _touch(tmp_path / "folder", "x.jpg")
    _touch(tmp_path / "elsewhere", "x.jpg")
    with pytest.raises(UsageError):
        list_samples([str(tmp_path / "folder"), str(tmp_path / "elsewhere" / "x.jpg")])


def test_disjoint_folders_merge_sorted(tmp_path: Path) -> None:
    """Two folders without collisions are merged into one sorted listing."""
    _touch(tmp_path / "one", "b.jpg", "sub/d.png")
    _touch(tmp_path / "two", "a.jpg", "c.png")
    assert _keys([tmp_path / "one", tmp_path / "two"]) == ["a.jpg", "b.jpg", "c.png", "sub/d.png"]


def test_same_folder_twice_is_fine(corpus) -> None:
    """Giving a folder twice (even spelled differently) lists each image once."""
    root, expected = corpus
    other_spelling = root / "a" / ".."
    assert _keys([root, root]) == sorted(expected)
    assert _keys([root, other_spelling]) == sorted(expected)


def test_file_inside_folder_input_is_not_duplicated(tmp_path: Path) -> None:
    """A top-level file also given on its own is the same sample, listed once."""
    _touch(tmp_path, "x.jpg", "y.png")
    assert _keys([tmp_path, tmp_path / "x.jpg"]) == ["x.jpg", "y.png"]


def test_uppercase_and_mixed_case_extensions(tmp_path: Path) -> None:
    """Extensions are matched in any case."""
    names = ["A.JPG", "b.Jpeg", "c.PNG", "d.WebP", "e.BMP", "f.GIF", "g.TIF", "h.TiFf", "i.txt", "j.JSON", "k"]
    _touch(tmp_path, *names)
    assert _keys([tmp_path]) == ["A.JPG", "b.Jpeg", "c.PNG", "d.WebP", "e.BMP", "f.GIF", "g.TIF", "h.TiFf"]
    assert _keys([tmp_path / "A.JPG"]) == ["A.JPG"]


def test_is_image_name() -> None:
    """Only supported extensions count, whatever their case; the name alone decides."""
    for name in ["x.jpg", "x.JPEG", "x.png", "x.webp", "x.bmp", "x.gif", "x.tif", "x.TIFF", "a.b.jpg"]:
        assert is_image_name(name), name
    for name in ["x.txt", "x", "jpg", "x.jpg.txt", "x.svg", "x.heic"]:
        assert not is_image_name(name), name


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    """Dot folders (.git, .thumbnails) and dot files (._x.jpg, .DS_Store) are never inputs."""
    _touch(
        tmp_path,
        "keep.jpg",
        "sub/keep.png",
        ".git/objects/pic.jpg",
        ".thumbnails/big.png",
        "sub/.cache/x.jpg",
        "._keep.jpg",
        "sub/.hidden.png",
        ".DS_Store",
    )
    assert _keys([tmp_path]) == ["keep.jpg", "sub/keep.png"]


def test_empty_folder_lists_nothing(tmp_path: Path) -> None:
    """An empty folder is not an error, just no samples."""
    assert list_samples([str(tmp_path)]) == []


def test_symlinked_image_is_followed(tmp_path: Path) -> None:
    """A symlink to an image is an input under the link's own key; its source is the link's absolute
    path (the input folder is resolved once, files are not: no realpath per file on huge folders)."""
    _touch(tmp_path / "real", "x.jpg")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "link.jpg").symlink_to(tmp_path / "real" / "x.jpg")
    samples = list_samples([str(tmp_path / "in")])
    assert [sample.key for sample in samples] == ["link.jpg"]
    assert Path(samples[0].source) == (tmp_path / "in").resolve() / "link.jpg"
    assert Path(samples[0].path).read_bytes() == (tmp_path / "real" / "x.jpg").read_bytes()


def test_symlink_loop_is_walked_once(tmp_path: Path) -> None:
    """A folder link back to an ancestor neither loops nor fails the listing."""
    from PIL import Image

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sub" / "x.png")
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)
    assert [sample.key for sample in list_samples([str(root)])] == ["sub/x.png"]
