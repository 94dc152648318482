"""A hostile folder: good images among every kind of entry a scraped corpus or a real disk holds that
is no image, can't be read, or has a name nobody expected.

``build_hostile`` writes it and returns what a run must make of it: the key of every row (None for a
captioned image, else the error kind), the entries that must be skipped, and the file list naming a
FIFO. The unreadable folder and file only stop a process without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH, so a root test runs caprl under ``drop_dac_capabilities()``.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# A file name that is not valid UTF-8 (Latin-1 "café"), and the text form keys give it.
NON_UTF8_NAME = b"caf\xe9.jpg"
NON_UTF8_KEY = "caf%E9.jpg"
# An image name of 250 bytes: its `.txt` fits in 255, but `.<name>.txt.<pid>.tmp` does not.
LONG_NAME = "l" * 246 + ".jpg"
# Two images sharing a 250-byte stem each get `<whole name>.txt`, 258 bytes: no such file can exist, so
# both are captioned and neither gets a sidecar.
TOO_LONG_FOR_TXT = ("m" * 250 + ".jpg", "m" * 250 + ".png")


@dataclass
class Hostile:
    root: Path
    expected: dict[str, str | None]  # row key -> error kind (None: captioned)
    skipped: list[str] = field(default_factory=list)  # entries that must get no row
    file_list: Path | None = None  # a --files-from list naming good images and a FIFO
    list_expected: dict[str, str | None] = field(default_factory=dict)


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40 + 4 * index, 32 + 2 * index), (index * 40 % 256, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def build_hostile(base: Path) -> Hostile:
    """The folder under `base/hostile`, a file list beside it, and what a run must make of them."""
    root = base / "hostile"
    (root / "sub").mkdir(parents=True)
    expected: dict[str, str | None] = {}
    for index, key in enumerate(["a.jpg", "sub/b.jpg", LONG_NAME, *TOO_LONG_FOR_TXT]):
        (root / key).write_bytes(jpeg(index))
        expected[key] = None
    with open(os.path.join(os.fsencode(root), NON_UTF8_NAME), "wb") as handle:
        handle.write(jpeg(7))
    expected[NON_UTF8_KEY] = None

    os.mkfifo(root / "fifo.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket.jpg"))
    listener.close()  # the socket file stays
    (root / "self.jpg").symlink_to("self.jpg")  # ELOOP
    (root / "dangling.jpg").symlink_to("nowhere.jpg")
    (root / "sub" / "up").symlink_to("..")  # a loop back to an ancestor folder
    (root / "cycle1.jpg").symlink_to("cycle2.jpg")
    (root / "cycle2.jpg").symlink_to("cycle1.jpg")

    locked = root / "locked"
    locked.mkdir()
    (locked / "inside.jpg").write_bytes(jpeg(3))
    locked.chmod(0)
    expected["locked/"] = "read"  # the folder's loss is visible as one row
    (root / "secret.jpg").write_bytes(jpeg(4))
    (root / "secret.jpg").chmod(0)
    expected["secret.jpg"] = "read"

    skipped = ["fifo.jpg", "socket.jpg", "self.jpg", "dangling.jpg", "cycle1.jpg", "cycle2.jpg", "locked/inside.jpg"]

    listed = base / "listed"
    listed.mkdir()
    (listed / "one.jpg").write_bytes(jpeg(5))
    os.mkfifo(listed / "pipe.jpg")
    os.mkfifo(listed / "pipe-000.tar")  # named as a shard: never opened either
    file_list = base / "list.txt"
    file_list.write_text("".join(f"{listed / name}\n" for name in ("one.jpg", "pipe.jpg", "pipe-000.tar")))
    list_expected = {
        str(listed / "one.jpg"): None,
        str(listed / "pipe.jpg"): "read",
        f"{listed.resolve() / 'pipe-000.tar'}@0": "read",
    }
    return Hostile(root, expected, skipped, file_list, list_expected)


def remove_hostile(hostile: Hostile) -> None:
    """Make everything removable again (the locked folder) so pytest can clean up."""
    (hostile.root / "locked").chmod(0o755)
    shutil.rmtree(hostile.root, ignore_errors=True)


def drop_dac_capabilities() -> list[str] | None:
    """A command prefix that runs a program without the capabilities that let root read any file,
    so chmod 000 stops it as it stops everyone else; [] when not root (chmod already does); None
    when nothing here can drop them (the unreadable entries then can't be tested)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None
