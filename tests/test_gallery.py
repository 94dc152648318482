"""`caprl gallery`: a review page for every output format, from one real captioning run.

One CLI run (transformers engine, tiny model) captions a folder of images (one of them broken, one
with markup in its name) and a WebDataset input shard into WebDataset shards with images. The same
committed rows are then published as Parquet, JSONL and sidecar outputs by caprl's own writers, so every
format holds the same rows and the engine runs once. Pages are read back with an HTML parser, and in
Debian's headless chromium when it is installed. Structure only, never caption words.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tracemalloc
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from PIL import Image

from caprl_cli.errors import UsageError
from caprl_cli.gallery import build_gallery, default_folder
from caprl_cli.gallery.reading import find_target, published_rows
from caprl_cli.gallery.sampling import Reservoir, sample_output
from caprl_cli.gallery.thumbnails import THUMBNAIL_SIDE
from caprl_cli.outputs import open_target
from caprl_cli.outputs.atomic import write_json_atomically
from caprl_cli.outputs.base import OutputOptions
from caprl_cli.outputs.row_writers import ParquetRowWriter
from caprl_cli.outputs.sidecar import SidecarTarget
from caprl_cli.outputs.table import merge_output
from caprl_cli.outputs.tar_shards import ShardSetWriter
from caprl_cli.state.folder import RunState

FAST = ("--engine", "transformers", "--max-tokens", "8", "--no-progress", "--workers", "1", "--batch-size", "8")
FORMATS = ("parquet", "jsonl", "webdataset", "sidecar", "dataset")  # dataset: a folder of Parquet files
MARKUP_NAME = "a<b>&c.jpg"


def encoded(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


# -- one captioning run, published in every format ----------------------------------------------------


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, run_caprl) -> dict[str, Any]:
    """{format: the output to give `caprl gallery`, "rows": {key: row}, "root": folder}."""
    root = tmp_path_factory.mktemp("gallery")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "red.jpg").write_bytes(encoded((300, 120), (200, 30, 30)))
    (images / "sub" / "green.png").write_bytes(encoded((64, 96), (30, 160, 40), "PNG"))
    (images / MARKUP_NAME).write_bytes(encoded((80, 80), (40, 40, 200)))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    shard = write_shard(root / "in" / "in-0.tar", [
        {"__key__": "s0", "jpg": encoded((90, 60), (250, 200, 0))},
        {"__key__": "s1", "png": encoded((60, 90), (0, 200, 250), "PNG")},
    ])
    wds = root / "wds"
    result = run_caprl("caption", images, shard, "-o", f"{wds}/", "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr

    state = RunState(None, state_dir=wds / ".caprl", label=str(wds))
    index = state.committed()
    provenance = json.loads((wds / "summary.json").read_text())
    found: dict[str, Any] = {"webdataset": str(wds), "root": root}
    for output_format in ("parquet", "jsonl"):
        path = root / f"out.{output_format}"
        merge_output(state, index, output_format, {**provenance, "format": output_format}, path, record=False)
        write_json_atomically(path.with_name(path.name + ".summary.json"), {**provenance, "format": output_format})
        found[output_format] = str(path)
    dataset_state = RunState(None, state_dir=shutil.copytree(wds / ".caprl", root / "dataset-state"), label="ds")
    open_target(f"{root / 'ds'}/", [], OutputOptions(output_format="parquet")).publish(
        dataset_state, dataset_state.committed(), {**provenance, "format": "parquet"}
    )
    found["dataset"] = str(root / "ds")
    shutil.copytree(wds / ".caprl", images / ".caprl")
    sidecar_state = RunState(None, state_dir=images / ".caprl", label=str(images))
    SidecarTarget(str(images), OutputOptions(output_format="sidecar")).publish(
        sidecar_state, sidecar_state.committed(), provenance
    )
    write_json_atomically(images / ".caprl" / "summary.json", {**provenance, "format": "sidecar"})
    found["sidecar"] = str(images)
    found["rows"] = {row["key"]: row for row in pq.read_table(found["parquet"]).to_pylist()}
    assert len(found["rows"]) == 6 and sum(row["status"] == "error" for row in found["rows"].values()) == 1
    return found


# -- reading a page back -------------------------------------------------------------------------------


class Page(HTMLParser):
    """The tiles of a gallery page (key, status, thumbnail, caption texts), error kinds, provenance."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tiles: list[dict[str, Any]] = []
        self.kinds: dict[str, int] = {}
        self.provenance_text = ""
        self._in: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        classes = (found.get("class") or "").split()
        if tag == "figure" and "tile" in classes:
            self.tiles.append({"key": found["data-key"], "status": found["data-status"], "img": None,
                               "loaded": None, "placeholder": False, "captions": [], "texts": []})
        elif tag == "img" and "thumb" in classes:
            self.tiles[-1]["img"] = found["src"]
            self.tiles[-1]["loaded"] = found.get("data-loaded")
        elif "placeholder" in classes:
            self.tiles[-1]["placeholder"] = True
        elif tag == "details" and "kind" in classes:
            self.kinds[found["data-kind"] or ""] = int(found["data-count"] or 0)
        if tag not in ("img", "meta"):
            self._in.append("caption" if "caption" in classes else "provenance" if found.get("id") == "provenance" else tag)

    def handle_endtag(self, tag: str) -> None:
        if self._in:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if "caption" in self._in[-1:]:
            self.tiles[-1]["captions"].append(data)
        if "provenance" in self._in:
            self.provenance_text += data


def read_page(folder: Path) -> Page:
    return Page((folder / "index.html").read_text(encoding="utf-8"))


def check_page(page: Page, folder: Path, rows: dict[str, dict[str, Any]]) -> None:
    """Every tile is a row of the output with its caption, and has a thumbnail unless it is an error."""
    assert page.tiles and len({tile["key"] for tile in page.tiles}) == len(page.tiles)
    for tile in page.tiles:
        row = rows[tile["key"]]
        assert tile["status"] == row["status"]
        if row["status"] == "ok":
            assert tile["captions"] == [row["caption"]]
            assert tile["img"] is not None and not tile["placeholder"]
            with Image.open(folder / tile["img"]) as thumb:
                assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_SIDE
        else:
            assert tile["img"] is None and tile["placeholder"]


# -- every format --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", FORMATS)
def test_gallery_of_every_format(outputs: dict[str, Any], run_caprl, tmp_path: Path, output_format: str) -> None:
    """Each format's page shows every row (the sample is larger than the output), thumbnails for the
    captioned ones (from the shards' own images, the input shard, or the files), the decode error by
    kind, and the run's provenance."""
    folder = tmp_path / "page"
    result = run_caprl("gallery", outputs[output_format], "-o", folder)
    assert result.returncode == 0, result.stderr
    page = read_page(folder)
    check_page(page, folder, outputs["rows"])
    assert {tile["key"] for tile in page.tiles} == set(outputs["rows"])
    assert len(list((folder / "thumbs").glob("*.jpg"))) == 5
    assert page.kinds == {"decode": 1}
    assert outputs["rows"]["red.jpg"]["model"] in page.provenance_text


def test_markup_is_escaped(outputs: dict[str, Any], tmp_path: Path) -> None:
    """A key with markup in it is text on the page, never a tag."""
    build_gallery(outputs["parquet"], tmp_path / "page")
    raw = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")
    assert MARKUP_NAME not in raw and "a&lt;b&gt;&amp;c.jpg" in raw
    assert MARKUP_NAME in {tile["key"] for tile in read_page(tmp_path / "page").tiles}


def test_default_folder_is_beside_the_output(outputs: dict[str, Any], run_caprl) -> None:
    result = run_caprl("gallery", outputs["jsonl"], "-q")
    assert result.returncode == 0 and result.stdout == result.stderr == ""
    assert (Path(outputs["jsonl"] + ".gallery") / "index.html").is_file()
    assert default_folder(outputs["webdataset"] + "/") == outputs["root"] / "wds.gallery"


def test_sample_is_seeded_bounded_and_filtered(outputs: dict[str, Any], tmp_path: Path) -> None:
    keys = []
    for name in ("one", "two"):
        report = build_gallery(outputs["parquet"], tmp_path / name, sample=3, seed=7)
        assert report.sampled == 3 and report.rows == 6
        keys.append([tile["key"] for tile in read_page(tmp_path / name).tiles])
    assert keys[0] == keys[1] and len(set(keys[0])) == 3
    build_gallery(outputs["webdataset"], tmp_path / "errors", status="error")
    assert [tile["key"] for tile in read_page(tmp_path / "errors").tiles] == ["broken.jpg"]
    seeds = {tuple(tile["key"] for tile in read_page(build_gallery(outputs["jsonl"], tmp_path / f"s{seed}",
                                                                      sample=2, seed=seed).folder).tiles)
             for seed in range(6)}
    assert len(seeds) > 1  # the seed decides the sample


def test_remote_output(outputs: dict[str, Any], memory_fs, tmp_path: Path) -> None:
    """A Parquet output on an fsspec filesystem: rows and provenance read through fsspec; a remote
    output needs -o, since the page is written locally."""
    memory_fs.put_file(outputs["parquet"], "/caps/out.parquet")
    report = build_gallery("memory://caps/out.parquet", tmp_path / "page")
    assert report.rows == 6 and report.thumbnails == 5
    page = read_page(tmp_path / "page")
    check_page(page, tmp_path / "page", outputs["rows"])
    assert outputs["rows"]["red.jpg"]["model"] in page.provenance_text
    with pytest.raises(UsageError):
        build_gallery("memory://caps/out.parquet")


def test_refuses_a_folder_that_is_not_a_gallery(outputs: dict[str, Any], run_caprl, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run_caprl("gallery", outputs["parquet"], "-o", tmp_path)
    assert result.returncode == 2 and (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "index.html").exists()


# -- without an engine ----------------------------------------------------------------------------------


def ok_row(key: str, source: str, caption: str = "words here") -> dict[str, Any]:
    return {"key": key, "source": source, "caption": caption, "status": "ok", "error": None,
            "finish_reason": "stop", "output_tokens": 3, "width": 8, "height": 8, "model": "m", "meta": None}


def test_shard_output_shows_its_own_images(tmp_path: Path) -> None:
    """WebDataset shards with images: thumbnails come from the shard even where the source is gone."""
    writer = ShardSetWriter(str(tmp_path / "caps"), "%06d.tar", first_number=0, shard_size=10, with_images=True)
    writer.add(ok_row("k0", str(tmp_path / "gone.jpg")), encoded((40, 30), (1, 2, 3)), "jpg")
    writer.close()
    report = build_gallery(str(tmp_path / "caps"), tmp_path / "page")
    assert report.thumbnails == 1
    assert read_page(tmp_path / "page").tiles[0]["img"] is not None


def test_missing_sources_get_placeholders(tmp_path: Path, serve_folder) -> None:
    """A vanished file, a URL that answers 404, an absent input shard and a non-image each become a
    placeholder; captions with markup are text."""
    base = serve_folder(tmp_path)
    (tmp_path / "text.jpg").write_text("not an image")
    rows = [ok_row("gone", str(tmp_path / "gone.jpg"), "<script>alert(1)</script>"),
            ok_row("url", f"{base}/missing.jpg"), ok_row("s0", str(tmp_path / "absent.tar")),
            ok_row("text", str(tmp_path / "text.jpg"))]
    output = tmp_path / "out.jsonl"
    output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = build_gallery(str(output), tmp_path / "page")
    assert report.rows == 4 and report.thumbnails == 0
    page = read_page(tmp_path / "page")
    assert all(tile["placeholder"] for tile in page.tiles)
    assert "<script>alert" not in (tmp_path / "page" / "index.html").read_text()
    assert [tile["captions"] for tile in page.tiles if tile["key"] == "gone"] == [["<script>alert(1)</script>"]]
    with pytest.raises(UsageError):  # no provenance found is fine; no output at all is not
        build_gallery(str(tmp_path / "nothing.parquet"), tmp_path / "x")


def test_reservoir_is_uniform_and_repeatable() -> None:
    def draw(seed: int) -> list[int]:
        reservoir: Reservoir[int] = Reservoir(200, seed)
        for item in range(20_000):
            reservoir.offer(item)
        return reservoir.items

    first = draw(3)
    assert first == draw(3) and first != draw(4)
    assert len(set(first)) == 200
    assert 8_000 < sum(first) / len(first) < 12_000  # spread over the whole stream, not its head
    assert sum(item >= 10_000 for item in first) > 60


def test_large_outputs_are_streamed(tmp_path: Path) -> None:
    """Sampling 40,000 rows of 1 KB captions holds a few batches in memory, not the output."""
    path = tmp_path / "big.parquet"
    writer = ParquetRowWriter(path, row_group_rows=4096)
    caption = "word " * 200
    for start in range(0, 40_000, 5_000):
        writer.write([ok_row(f"k{i:06d}", f"/none/{i}.jpg", caption) for i in range(start, start + 5_000)])
    writer.commit({})
    target = find_target(str(path), None, {})
    tracemalloc.start()
    try:
        chosen, stats = sample_output(published_rows(target), 10, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.rows == 40_000 and len(chosen) == 10 and stats.finish_reasons == {"stop": 40_000}
    assert peak < 20 * 1024 * 1024, peak  # the captions alone are 40 MB


# -- in a real browser ----------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ("parquet", "webdataset"))
def test_page_in_headless_chromium(outputs: dict[str, Any], tmp_path: Path, output_format: str) -> None:
    """Chromium opens the page from disk: every thumbnail decodes, every sampled caption is shown."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    folder = tmp_path / "page"
    build_gallery(outputs[output_format], folder)
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (folder / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Page(result.stdout)
    check_page(dom, folder, outputs["rows"])
    images = [tile for tile in dom.tiles if tile["img"] is not None]
    assert len(images) == 5 and all(tile["loaded"] == "yes" for tile in images)
