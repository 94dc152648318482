"""`caprl gallery OUTPUT`: a static page for reviewing a sample of the captions an output holds.

`reading` streams the published rows of any output format, `sampling` draws a seeded sample and counts
while it reads, `thumbnails` finds and shrinks each sampled image, `page` writes the HTML. The result
is `DIR/index.html` plus `DIR/thumbs/*.jpg`, which opens from disk with no server and no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from caprl_cli.errors import UsageError
from caprl_cli.outputs.atomic import fsync_rename, temp_path_for
from caprl_cli.storage import StorageOptions, is_url, local_path_of, redact

DEFAULT_SAMPLE = 200
PAGE = "index.html"
THUMBS = "thumbs"
_THUMB_NAME = re.compile(r"\d{6}\.jpg")


def _is_temporary(name: str) -> bool:
    """A page a killed run was still writing (`.index.html.<pid>.tmp`)."""
    return name.startswith(f".{PAGE}.") and name.endswith(".tmp")


@dataclass(frozen=True)
class GalleryReport:
    """What `build_gallery` wrote."""

    folder: Path
    rows: int
    sampled: int
    thumbnails: int


def default_folder(output: str) -> Path:
    """`<output>.gallery` beside a local output: `out.parquet` -> `out.parquet.gallery`, a shard folder
    `caps/` (or pattern `caps/train-%05d.tar`) -> `caps.gallery`. Never inside the output: a sidecar
    folder is an input folder, and a later caption run would walk the thumbnails as images."""
    path = local_path_of(output)
    if path is None:
        raise UsageError(f"{redact(output)} is remote: pass -o DIR, a local folder for the page")
    if "%" in path.name and path.name.endswith(".tar"):
        path = path.parent
    return path.with_name(path.name + ".gallery")


def check_folder(folder: Path) -> None:
    """Refuse a folder that holds something other than an earlier gallery: it is replaced in part."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    foreign = [entry.name for entry in folder.iterdir() if entry.name not in (PAGE, THUMBS) and not _is_temporary(entry.name)]
    if foreign:
        raise UsageError(f"{folder} holds other files ({', '.join(sorted(foreign)[:3])}); give -o an empty or new folder")


def build_gallery(
    output: str,
    folder: str | Path | None = None,
    *,
    sample: int = DEFAULT_SAMPLE,
    status: str | None = None,
    seed: int = 0,
    output_format: str | None = None,
    storage_options: StorageOptions | None = None,
    state_dir: Path | None = None,
) -> GalleryReport:
    """Write the gallery of `output` into `folder` (default: `default_folder`)."""
    from caprl_cli.gallery.page import render_page
    from caprl_cli.gallery.reading import find_target, published_rows, read_provenance
    from caprl_cli.gallery.sampling import sample_output
    from caprl_cli.gallery.thumbnails import write_thumbnails

    if sample < 1:
        raise UsageError("--sample must be at least 1")
    if folder is not None and is_url(str(folder)):
        raise UsageError("-o/--output of caprl gallery is a local folder (the page opens from disk)")
    target = find_target(output, output_format, storage_options or {}, state_dir)
    destination = Path(folder) if folder is not None else default_folder(output)
    check_folder(destination)
    chosen, stats = sample_output(published_rows(target), sample, seed, status)
    thumbs = destination / THUMBS
    if thumbs.is_dir():  # thumbnails of an earlier page would sit beside this one unused
        for old in thumbs.iterdir():
            if _THUMB_NAME.fullmatch(old.name):
                old.unlink()
    thumbnails = write_thumbnails(chosen, thumbs, storage_options)
    page = render_page(target.label, chosen, thumbnails, stats, read_provenance(target), seed=seed, status=status)
    temp = temp_path_for(destination / PAGE)
    temp.write_text(page, encoding="utf-8")
    fsync_rename(temp, destination / PAGE)
    return GalleryReport(
        folder=destination,
        rows=stats.rows,
        sampled=len(chosen),
        thumbnails=sum(1 for thumbnail in thumbnails if thumbnail.name is not None),
    )
