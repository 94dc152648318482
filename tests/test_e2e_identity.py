"""What a key is, end to end through the real CLI (transformers engine, tiny model): a different image
under a committed key becomes a conflict row and is said so, a moved input folder is not captioned
again, URLs that differ in their query are two images, and a URL signed again is the same one.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

from contract import read_rows
from PIL import Image

FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "4", "--no-progress", "--workers", "1")


def _jpeg(path: Path, shade: int, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 90, 200)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())
    return path


def _closing(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_dated_drop_folders_conflict_and_a_moved_folder_is_done(run_caprl, tiny_model: Path, tmp_path: Path) -> None:
    """day1 then day2, each with its own IMG_0001.jpg, into one output: day 2's image is not skipped as
    done but recorded as a conflict row naming both sources, and the closing line says so; a rerun adds
    nothing. day1 renamed (mtimes kept) is recognised: nothing to do, no new rows."""
    day1 = tmp_path / "incoming" / "day1"
    day2 = tmp_path / "incoming" / "day2"
    _jpeg(day1 / "IMG_0001.jpg", 10)
    _jpeg(day1 / "IMG_0002.jpg", 40)
    _jpeg(day2 / "IMG_0001.jpg", 200, (80, 60))
    output = tmp_path / "caps.parquet"
    caption = ("caption", "-o", output, "--model", tiny_model, *FAST)

    first = run_caprl(*caption[:1], day1, *caption[1:])
    assert first.returncode == 0, first.stderr
    assert sorted(row["key"] for row in read_rows(output)) == ["IMG_0001.jpg", "IMG_0002.jpg"]

    moved = tmp_path / "incoming" / "day1-archived"
    os.rename(day1, moved)
    again = run_caprl(*caption[:1], moved, *caption[1:])
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in _closing(again.stderr)
    assert len(read_rows(output)) == 2

    second = run_caprl(*caption[:1], day2, *caption[1:])
    assert second.returncode == 0, second.stderr
    rows = {row["key"]: row for row in read_rows(output)}
    assert len(rows) == 3
    (conflict_key,) = [key for key in rows if key.startswith("IMG_0001.jpg@")]
    conflict = rows[conflict_key]
    assert conflict["status"] == "error" and conflict["error"].startswith("conflict: ")
    assert str(day1 / "IMG_0001.jpg") in conflict["error"] and str(day2 / "IMG_0001.jpg") in conflict["error"]
    assert conflict["source"] == str(day2 / "IMG_0001.jpg")
    assert rows["IMG_0001.jpg"]["status"] == "ok" and rows["IMG_0001.jpg"]["source"] == str(day1 / "IMG_0001.jpg")
    assert "1 key conflict: a different image under a committed key (conflict rows)" in _closing(second.stderr)

    for extra in ((), ("--retry-errors",)):
        third = run_caprl(*caption[:1], day2, *caption[1:], *extra)
        assert third.returncode == 0, third.stderr
        assert "nothing to do" in _closing(third.stderr) and "conflict" not in _closing(third.stderr)
        assert {row["key"]: row for row in read_rows(output)} == rows


def test_urls_differing_in_their_query_and_signed_again(
    run_caprl, tiny_model: Path, tmp_path: Path, serve_folder: Callable[[Path], str]
) -> None:
    """`img.jpg?id=1` and `img.jpg?id=2` in a file list are two rows with distinct keys; the same URLs
    signed again (another X-Amz-Signature) are done; no signature value reaches any file or log."""
    served = tmp_path / "served"
    _jpeg(served / "img.jpg", 60)
    base = serve_folder(served)  # the query does not change what is served: the keys must tell them apart
    signed = "&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={}"
    lines = [f"{base}/img.jpg?id={n}" + signed.format(f"SIGN-{word}-aaaa") for n, word in ((1, "ONE"), (2, "TWO"))]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "caps.parquet"
    caption = ("caption", "--files-from", listing, "-o", output, "--model", tiny_model, *FAST)

    first = run_caprl(*caption)
    assert first.returncode == 0, first.stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == [f"{base}/img.jpg?id=1", f"{base}/img.jpg?id=2"]
    assert all(row["status"] == "ok" for row in rows)

    listing.write_text("\n".join(line.replace("SIGN-", "RESIGNED-") for line in lines) + "\n")
    again = run_caprl(*caption)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in _closing(again.stderr)
    assert read_rows(output) == rows

    texts = [first.stdout, first.stderr, again.stdout, again.stderr] + [
        path.read_bytes().decode("utf-8", "replace") for path in (tmp_path / "out").rglob("*") if path.is_file()
    ]
    for secret in ("SIGN-ONE", "SIGN-TWO", "RESIGNED-", "AKIAEXAMPLE"):
        assert not any(secret in text for text in texts), secret
