"""The local walk and the names it keys: entries that are no files to read are skipped and counted, an
unreadable folder is a read row, a FIFO named directly is a read row that is never opened, and names
that are not valid UTF-8 get a lossless text form while the file is still read by its real bytes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hostile import drop_dac_capabilities

from caprl_cli.errors import ErrorKind, format_error
from caprl_cli.inputs.locations import read_file_list
from caprl_cli.inputs.resolve import resolve_inputs
from caprl_cli.inputs.sample import name_from_text, name_text
from caprl_cli.inputs.walk import FoundFile, WalkSkips, walk_images
from caprl_cli.outputs.sidecar import SidecarResult, local_image, sidecar_path, write_sidecar

NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")


def odd_folder(root: Path) -> Path:
    """Two images among a FIFO, a socket, loops, a dangling link and a link back to an ancestor."""
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"x")
    (root / "sub" / "b.jpg").write_bytes(b"y")
    os.mkfifo(root / "fifo.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.jpg"))
    listener.close()
    (root / "self.jpg").symlink_to("self.jpg")
    (root / "one.jpg").symlink_to("two.jpg")
    (root / "two.jpg").symlink_to("one.jpg")
    (root / "gone.jpg").symlink_to("nowhere.jpg")
    (root / "sub" / "up").symlink_to("..")
    return root


def test_walk_skips_and_counts_what_is_no_file_to_read(tmp_path: Path) -> None:
    root = odd_folder(tmp_path / "odd")
    skips = WalkSkips()
    found = list(walk_images(root, skips=skips))
    assert [item.path.relative_to(root).as_posix() for item in found] == ["a.jpg", "sub/b.jpg"]
    assert all(isinstance(item, FoundFile) for item in found)
    assert dict(skips) == {
        "FIFO": 1, "socket": 1, "symlink loop": 3, "dangling link": 1, "link to a folder already walked": 1,
    }
    assert skips.described() == (
        "1 FIFO, 1 dangling link, 1 link to a folder already walked, 1 socket, 3 symlink loops"
    )


def test_resolving_a_folder_warns_once_about_its_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = odd_folder(tmp_path / "odd")
    with caplog.at_level(logging.WARNING, logger="caprl"):
        keys = [sample.key for sample in resolve_inputs([str(root)]).listed]
    assert keys == ["a.jpg", "sub/b.jpg"]
    warnings = [record.getMessage() for record in caplog.records if "skipped under" in record.getMessage()]
    assert len(warnings) == 1 and "3 symlink loops" in warnings[0]


def test_an_unreadable_subfolder_is_one_read_row_and_the_walk_goes_on(tmp_path: Path) -> None:
    prefix = drop_dac_capabilities()
    if prefix is None:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here")
    root = tmp_path / "corpus"
    (root / "lost+found").mkdir(parents=True)
    (root / "lost+found" / "x.jpg").write_bytes(b"x")
    (root / "z.jpg").write_bytes(b"z")
    (root / "lost+found").chmod(0)
    probe = (
        "import json, sys; from caprl_cli.inputs.resolve import resolve_inputs; "
        "print(json.dumps([[s.key, s.source, s.error_kind and s.error_kind.value, s.error_message] "
        "for s in resolve_inputs([sys.argv[1]]).listed]))"
    )
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", probe, str(root)], capture_output=True, text=True, timeout=120
        )
    finally:
        (root / "lost+found").chmod(0o755)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [row[:3] for row in rows] == [
        ["lost+found/", str(root.resolve() / "lost+found") + "/", "read"],
        ["z.jpg", str(root.resolve() / "z.jpg"), None],
    ]
    assert "Permission denied" in rows[0][3]
    assert "cannot be listed" in done.stderr


def test_a_fifo_named_in_a_list_or_on_the_command_line_is_a_read_row_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "ok.jpg").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'pipe.jpg'}\n{tmp_path / 'ok.jpg'}\n")
    listed = {sample.key: sample for sample in resolve_inputs(["@" + str(listing)]).listed}
    fifo = listed[str(tmp_path / "pipe.jpg")]
    assert fifo.error_kind is ErrorKind.READ and "not a regular file (FIFO)" in (fifo.error_message or "")
    assert listed[str(tmp_path / "ok.jpg")].error_kind is None
    (direct,) = resolve_inputs([str(tmp_path / "pipe.jpg")]).listed
    assert (direct.key, direct.error_kind) == ("pipe.jpg", ErrorKind.READ)


def test_a_fifo_named_as_a_shard_is_a_read_row_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe-000.tar")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'pipe-000.tar'}\n")
    for inputs in (["@" + str(listing)], [str(tmp_path / "pipe-000.tar")]):
        found = resolve_inputs(inputs)
        assert found.shards == []
        (sample,) = found.listed
        assert sample.key == f"{tmp_path / 'pipe-000.tar'}@0" and sample.error_kind is ErrorKind.READ
        assert "not a regular file (FIFO)" in (sample.error_message or "")


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"caf\xe9.jpg", "caf%E9.jpg"),
        (b"50%\xff.jpg", "50%25%FF.jpg"),  # a `%` in such a name is escaped too: the form is lossless
        (b"caf\xc3\xa9.jpg", "caf\u00e9.jpg"),  # valid UTF-8 is itself
        (b"100%.jpg", "100%.jpg"),
    ],
)
def test_name_text_is_a_lossless_text_form(raw: bytes, text: str) -> None:
    name = os.fsdecode(raw)
    assert name_text(name) == text
    text.encode("utf-8")  # storable anywhere
    assert name_from_text(text) == (name if name != text else None)


def test_name_from_text_refuses_escapes_of_valid_utf8() -> None:
    assert name_from_text("caf%C3%A9.jpg") is None  # that is a file really called so, not an escape
    assert name_from_text("a%41.jpg") is None


def test_a_non_utf8_name_is_keyed_by_its_text_form_and_read_by_its_bytes(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(b"image bytes")
    (sample,) = resolve_inputs([str(root)]).listed
    assert sample.key == "caf%E9.jpg" and sample.source == str(root.resolve() / "caf%E9.jpg")
    assert open(sample.path, "rb").read() == b"image bytes"  # noqa: SIM115
    pa.array([sample.key, sample.source])  # what Parquet needs: no surrogates left
    assert local_image(sample.source) == Path(sample.path)


def test_a_list_line_with_non_utf8_bytes_finds_its_file(tmp_path: Path) -> None:
    raw_path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(raw_path, "wb") as handle:
        handle.write(b"x")
    listing = tmp_path / "list.txt"
    listing.write_bytes(raw_path + b"\n")
    assert read_file_list(str(listing)) == [os.fsdecode(raw_path)]
    (sample,) = resolve_inputs(["@" + str(listing)]).listed
    assert sample.key == str(tmp_path / "caf%E9.jpg") and os.path.exists(sample.path)


def test_error_messages_naming_a_non_utf8_file_can_be_stored() -> None:
    error = format_error(ErrorKind.READ, f"cannot read /x/{NON_UTF8}: Permission denied")
    assert error == "read: cannot read /x/caf%E9.jpg: Permission denied"
    error.encode("utf-8")


def test_a_250_byte_image_name_gets_its_txt(tmp_path: Path) -> None:
    image = tmp_path / ("l" * 246 + ".jpg")
    image.write_bytes(b"x")
    assert write_sidecar(image, "a caption", replace=False) is SidecarResult.WRITTEN
    assert sidecar_path(image).read_text() == "a caption"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image.name, sidecar_path(image).name])


def test_a_txt_name_longer_than_a_file_name_may_be_is_reported_not_raised(tmp_path: Path) -> None:
    stem = "m" * 250
    for ext in (".jpg", ".png"):
        (tmp_path / (stem + ext)).write_bytes(b"x")
    result = write_sidecar(tmp_path / (stem + ".jpg"), "a caption", replace=False, shared_stems={stem})
    assert result is SidecarResult.NAME_TOO_LONG
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem + ".jpg", stem + ".png"]


def test_a_non_utf8_image_gets_its_txt_beside_it(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(raw, "wb") as handle:
        handle.write(b"x")
    image = local_image(str(tmp_path / "caf%E9.jpg"))
    assert image is not None
    assert write_sidecar(image, "a caption", replace=False) is SidecarResult.WRITTEN
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "rb") as handle:
        assert handle.read() == b"a caption"
