"""Crash truth: the real CLI killed with SIGKILL at every step that writes, for every output format.

`CAPRL_CRASH_AT=<point>` makes the process SIGKILL itself at a named write step (`caprl_cli.faults`), so
no `except`, `finally` or atexit handler runs: exactly what a power loss leaves. For each format:

- a baseline run captions part of a folder (`--limit`) and publishes;
- a run over the whole folder, committing one part per row, is killed while writing its second part
  (`part.temp:2`);
- the next run (with `--retry-errors`, so the baseline's error row is replaced and a WebDataset publish
  must drop a stale sample) is killed right after its last part is committed (`part.renamed:N`),
  before publishing: the "pending" state, every row committed and none published since the baseline.
  A plain run from a copy of it must publish every key. Every publish step is tested from a copy of
  it too: a run that has nothing to caption but must publish is killed at the step, then a plain run
  recovers, so a crash in a publish costs no model load.

After every kill the output still reads with the format's usual reader and holds every key of the
baseline; after the recovery every key is there exactly once and no temporary file is left. A kill
that never happens (returncode not -9) fails the test, so a point no run reaches cannot pass silently.
Parquet runs use enough images for the merge to compact the parts (more than 64); JSONL shares that
merge code and only changes the file writer, so it runs on the dozen.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from caprl_cli.faults import CRASH_ENV
from caprl_cli.outputs.table import COMPACT_ABOVE_PARTS

KILLED = -9
ENGINE = ("--engine", "transformers", "--max-tokens", "4", "--batch-size", "4", "--no-progress", "--workers", "0",
          "--flush-every", "1")
BASELINE = 6
BAD = "a-bad.png"  # sorts first: the baseline holds its error row, and the pending run replaces it
S3_KEY, S3_SECRET = "AKIA-caprl-crash-key", "s3-crash-secret"


def make_images(folder: Path, count: int) -> None:
    """`count - 1` small PNGs and one file that does not decode (an error row)."""
    folder.mkdir(parents=True)
    (folder / BAD).write_bytes(b"not an image")
    for index in range(count - 1):
        Image.new("RGB", (28 + 4 * (index % 8), 28), (index * 7 % 256, 90, 160)).save(folder / f"img-{index:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dozen images, and enough for a Parquet/JSONL merge to compact (pending parts > 64)."""
    root = tmp_path_factory.mktemp("crash-images")
    small, large = root / "small", root / "large"
    make_images(small, 12)
    make_images(large, COMPACT_ABOVE_PARTS + BASELINE + 2)
    return {"small": small, "large": large}


@dataclass
class Case:
    """One output format: where it is written, how it is read back, what is temporary."""

    name: str
    images: Path
    work: Path
    args: list[str]
    read_keys: Callable[[], list[str]]
    temporaries: Callable[[], list[str]]
    snapshot: Callable[[], object]
    restore: Callable[[object], None]
    errors_published: bool = True  # sidecar: error rows have no .txt

    def expected_keys(self) -> list[str]:
        names = sorted(path.name for path in self.images.iterdir() if path.suffix == ".png")
        return names if self.errors_published else [name for name in names if name != BAD]


# -- readers: each format read back with the libraries its users have ----------------------------------


def parquet_keys(path: Path) -> list[str]:
    return pq.read_table(path)["key"].to_pylist() if path.exists() else []


def dataset_keys(folder: Path) -> list[str]:
    """Every row's key across a Parquet dataset folder, read as one table (hidden state folders skipped)."""
    return pq.read_table(folder)["key"].to_pylist() if list(folder.glob("*.parquet")) else []


def jsonl_keys(path: Path) -> list[str]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["key"] for line in handle]


def tar_keys(handles: list[Callable[[], object]]) -> list[str]:
    """The key of every sample's `.json` member across the shards (a sample in two shards counts twice)."""
    keys: list[str] = []
    for opener in handles:
        with opener() as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    keys.append(json.loads(tar.extractfile(member).read())["key"])
    return keys


def local_shard_keys(folder: Path) -> list[str]:
    shards = sorted(folder.glob("[0-9]*.tar")) if folder.is_dir() else []
    return tar_keys([lambda shard=shard: open(shard, "rb") for shard in shards])


def sidecar_keys(folder: Path) -> list[str]:
    """The image each `.txt` beside the images belongs to."""
    return sorted(path.stem + ".png" for path in folder.glob("*.txt"))


def local_temporaries(*folders: Path) -> list[str]:
    return [str(path) for folder in folders if folder.exists() for path in folder.rglob("*") if ".tmp" in path.name]


def copy_folder(folder: Path) -> Callable[[], object]:
    def snapshot() -> object:
        saved = folder.with_name(folder.name + f"-snapshot-{len(list(folder.parent.iterdir()))}")
        shutil.copytree(folder, saved, symlinks=True)
        return saved

    return snapshot


def restore_folder(folder: Path) -> Callable[[object], None]:
    """Put a snapshot back at the same path (sidecar rows name their images by absolute path)."""

    def restore(saved: object) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(saved, folder, symlinks=True)  # type: ignore[arg-type]

    return restore


# -- the S3 API, served by moto on 127.0.0.1 ---------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[object, str]]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=endpoint, use_listings_cache=False,
                           skip_instance_cache=True)
    fs.mkdir("crash")
    yield fs, endpoint
    server.stop()


def s3_options(endpoint: str) -> list[str]:
    return ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", f"key={S3_KEY}",
            "--storage-option", f"secret={S3_SECRET}"]


def s3_snapshot(fs, prefix: str, state: Path) -> Callable[[], object]:
    def snapshot() -> object:
        objects = {name: fs.cat_file(name) for name in fs.find(prefix)}
        return objects, copy_folder(state)()

    return snapshot


def s3_restore(fs, prefix: str, state: Path) -> Callable[[object], None]:
    def restore(saved: object) -> None:
        objects, folder = saved  # type: ignore[misc]
        if fs.find(prefix):
            fs.rm(prefix, recursive=True)
        for name, data in objects.items():
            fs.pipe_file(name, data)
        restore_folder(state)(folder)

    return restore


def s3_temporaries(fs, prefix: str, state: Path) -> Callable[[], list[str]]:
    return lambda: [name for name in fs.find(prefix) if ".tmp" in name.rsplit("/", 1)[-1]] + local_temporaries(state)


def build_case(name: str, root: Path, folders: dict[str, Path], request: pytest.FixtureRequest) -> Case:
    if name in ("parquet", "jsonl"):
        output = root / f"caps.{name}"
        images = folders["large" if name == "parquet" else "small"]
        return Case(name, images, root, [str(images), "-o", str(output), "--format", name],
                    read_keys=lambda: (parquet_keys if name == "parquet" else jsonl_keys)(output),
                    temporaries=lambda: local_temporaries(root), snapshot=copy_folder(root),
                    restore=restore_folder(root))
    if name.startswith("webdataset"):
        output = root / "shards"
        images = ["--no-images"] if name.endswith("no-images") else []
        return Case(name, folders["small"], root,
                    [str(folders["small"]), "-o", f"{output}/", "--format", "webdataset", "--shard-size", "4", *images],
                    read_keys=lambda: local_shard_keys(output), temporaries=lambda: local_temporaries(root),
                    snapshot=copy_folder(root), restore=restore_folder(root))
    if name == "parquet-dataset":
        output = root / "captions"
        return Case(name, folders["small"], root,
                    [str(folders["small"]), "-o", f"{output}/", "--format", "parquet", "--rows-per-file", "4"],
                    read_keys=lambda: dataset_keys(output), temporaries=lambda: local_temporaries(root),
                    snapshot=copy_folder(root), restore=restore_folder(root))
    if name == "sidecar":
        images = root / "images"
        shutil.copytree(folders["small"], images)
        return Case(name, images, root, [str(images), "--format", "sidecar"],
                    read_keys=lambda: sidecar_keys(images), temporaries=lambda: local_temporaries(root),
                    snapshot=copy_folder(root), restore=restore_folder(root), errors_published=False)
    fs, endpoint = request.getfixturevalue("s3")
    prefix = f"crash/{name}"
    state = root / "state"
    state_args = ["--state-dir", str(state), *s3_options(endpoint)]
    common = {"temporaries": s3_temporaries(fs, prefix, state), "snapshot": s3_snapshot(fs, prefix, state),
              "restore": s3_restore(fs, prefix, state)}
    if name == "s3-parquet":
        return Case(name, folders["large"], root,
                    [str(folders["large"]), "-o", f"s3://{prefix}/caps.parquet", *state_args],
                    read_keys=lambda: remote_parquet_keys(fs, f"{prefix}/caps.parquet"), **common)
    return Case(name, folders["small"], root,
                [str(folders["small"]), "-o", f"s3://{prefix}/", "--format", "webdataset", "--shard-size", "4",
                 *state_args],
                read_keys=lambda: remote_shard_keys(fs, prefix), **common)


def remote_parquet_keys(fs, path: str) -> list[str]:
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)["key"].to_pylist()


def remote_shard_keys(fs, prefix: str) -> list[str]:
    shards = sorted(name for name in fs.find(prefix) if name.rsplit("/", 1)[-1][:1].isdigit() and name.endswith(".tar"))
    return tar_keys([lambda shard=shard: fs.open(shard, "rb") for shard in shards])


# -- runs ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A format with its baseline published and its pending state (every row committed, none
    published since), saved so every test starts from a copy."""

    case: Case
    baseline_keys: set[str]
    pending: object
    run: Callable[..., subprocess.CompletedProcess]

    def killed_at(self, point: str, *extra: str) -> subprocess.CompletedProcess:
        result = self.run(*extra, crash_at=point)
        assert result.returncode == KILLED, (
            f"the run was not killed at {point} (exit {result.returncode}): {result.stderr[-2000:]}"
        )
        self.assert_not_smaller(f"right after the kill at {point}")
        return result

    def assert_not_smaller(self, when: str) -> None:
        keys = self.case.read_keys()
        lost = self.baseline_keys - set(keys)
        assert not lost, f"{when}: the output lost {sorted(lost)[:5]} ({len(lost)} keys the baseline published)"

    def assert_recovered(self, *extra: str) -> None:
        result = self.run(*extra)
        assert result.returncode == 0, result.stderr[-3000:]
        keys = self.case.read_keys()
        assert sorted(keys) == self.case.expected_keys(), (
            f"missing {sorted(set(self.case.expected_keys()) - set(keys))[:5]}, "
            f"twice {sorted({key for key in keys if keys.count(key) > 1})[:5]}"
        )
        assert not self.case.temporaries(), self.case.temporaries()


FORMATS = ["parquet", "jsonl", "webdataset", "webdataset-no-images", "sidecar", "s3-parquet", "s3-webdataset",
           "parquet-dataset"]


@pytest.fixture(scope="module")
def prepare(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, folders, tiny_model: Path,
            run_caprl) -> Callable[[str], Prepared]:
    """The prepared format of each name, made once per module and shared by its tests."""
    made: dict[str, Prepared] = {}

    def get(name: str) -> Prepared:
        if name not in made:
            made[name] = prepare_format(name, request, tmp_path_factory, folders, tiny_model, run_caprl)
        return made[name]

    return get


def prepare_format(name: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   folders: dict[str, Path], tiny_model: Path, run_caprl) -> Prepared:
    case = build_case(name, tmp_path_factory.mktemp(f"crash-{name}") / "work", folders, request)
    case.work.mkdir(exist_ok=True)

    def run(*extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
        return run_caprl("caption", *case.args, "--model", tiny_model, *ENGINE, *extra,
                         env={CRASH_ENV: crash_at} if crash_at else None)

    first = run("--limit", str(BASELINE))
    assert first.returncode == 0, first.stderr[-3000:]
    baseline_keys = case.read_keys()
    assert len(baseline_keys) == (BASELINE if case.errors_published else BASELINE - 1)
    assert case.errors_published == (BAD in baseline_keys)
    prepared = Prepared(case, set(baseline_keys), None, run)
    prepared.killed_at("part.temp:2")  # one part (one row: --flush-every 1) committed, the second half written
    # The last part of the next run is its row count: the images no part holds yet, and the
    # baseline's error row captioned again.
    not_committed = len(list(case.images.glob("*.png"))) - BASELINE - 1
    last_part = not_committed + 1
    prepared.killed_at(f"part.renamed:{last_part}", "--retry-errors")
    prepared.pending = case.snapshot()
    return prepared


PUBLISH_POINTS = {
    "parquet": ["merge.output_temp", "merge.output_renamed", "compact.committed", "compact.recorded"],
    "webdataset": ["wds.shards_written", "wds.stale_rewritten", "wds.compacted", "wds.recorded"],
    "sidecar": ["sidecar.txt", "sidecar.txt:3", "sidecar.written"],
    "s3-parquet": ["merge.output_temp", "merge.output_renamed", "compact.committed", "compact.recorded",
                   "upload.put", "upload.done", "upload.put:2"],
    "s3-webdataset": ["upload.put", "wds.shards_written", "wds.stale_rewritten", "wds.compacted", "wds.recorded",
                      "upload.put:4"],
}
PUBLISH_POINTS["jsonl"] = ["merge.output_temp", "merge.output_renamed"]
# The pending publish writes two new files (4 + 3 rows) and rewrites the baseline's first file without
# its replaced error row.
PUBLISH_POINTS["parquet-dataset"] = ["dataset.file_written", "dataset.file_written:2", "dataset.stale_rewritten",
                                     "dataset.recorded", "dataset.parts_dropped"]
PUBLISH_POINTS["webdataset-no-images"] = PUBLISH_POINTS["webdataset"]


@pytest.mark.parametrize(
    ("fmt", "point"), [(name, point) for name in FORMATS for point in PUBLISH_POINTS[name]]
)
def test_a_publish_killed_at_any_step_is_finished_by_the_next_run(prepare, fmt: str, point: str) -> None:
    """Killed inside the publish of rows already committed: the output never loses a published key,
    and the next plain run publishes every key exactly once and leaves no temporary file."""
    prepared = prepare(fmt)
    prepared.case.restore(prepared.pending)
    prepared.killed_at(point)
    prepared.assert_recovered()


@pytest.mark.parametrize("fmt", FORMATS)
def test_runs_killed_while_committing_parts_lose_nothing(prepare, fmt: str) -> None:
    """Killed with a part half written, then killed after the last part of the rest was committed:
    the next plain run publishes every key exactly once (and loads no model: the parts hold them all)."""
    prepared = prepare(fmt)
    prepared.case.restore(prepared.pending)
    prepared.assert_recovered()
