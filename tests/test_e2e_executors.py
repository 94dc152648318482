"""Every executor keeps the same promises, end to end: the real CLI with two transformers engines on
the CPU (`--num-engines 2`), as local engine worker processes and as Ray actors on a real Ray cluster
(token-authenticated, started once for the module, joined by address), from one test body per
behaviour. Engines are killed (SIGKILL) and frozen
(SIGSTOP) with real signals, decoders crash and hang through their test hooks, a URL is held open by a
real HTTP server on 127.0.0.1.

Every run is tagged with an environment variable of its own and a temporary folder of its own (see
`executors.py`), so its processes (engine workers, decode workers, Ray actors) are found, and "none is
left afterwards" is checked, for that run alone. A local Ray cluster the run starts itself is in
test_e2e_ray.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import write_shard
from executors import (
    LOCAL,
    Executor,
    StartRun,
    TaggedRun,
    committed_keys,
    committed_parts,
    rows_by_key,
    summary_of,
    wait_until,
)
from PIL import Image
from ray_nodes import RayNodes
from ray_nodes import ray_nodes as cluster_of_nodes

ENGINE_ARGS = ("--engine", "transformers", "--max-tokens", "6", "--no-progress", "--num-engines", "2")
IMAGES = 24
# Small batches and decoding in the engine's own process keep what one engine holds at once small
# against 24 images, so both engines have work when one is slowed, killed or frozen.
SMALL_HOLDINGS = ("--batch-size", "2", "--workers", "0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engines-images")
    for number in range(IMAGES):
        Image.new("RGB", (40 + number, 36), (number * 9 % 256, 90, 160)).save(root / f"img{number:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[RayNodes]:
    """One Ray cluster for the module's Ray runs (its start would otherwise be paid by every run)."""
    pytest.importorskip("ray")
    with cluster_of_nodes() as cluster:
        cluster.start(num_cpus=2)  # two engine actors of half a CPU each, with room to restart one
        yield cluster


@pytest.fixture(params=["local", "ray"])
def executor(request: pytest.FixtureRequest) -> Executor:
    if request.param == "local":
        return LOCAL
    cluster = request.getfixturevalue("shared_cluster")
    return Executor("ray", ("--executor", "ray", "--ray-address", cluster.address), cluster.client_env(), cluster)


def assert_every_key_once(output: Path, ok: int = IMAGES) -> dict[str, list[dict]]:
    rows = rows_by_key(output)
    assert sorted(rows) == [f"img{number:02d}.jpg" for number in range(IMAGES)]
    assert all(len(found) == 1 for found in rows.values())
    assert sum(found[0]["status"] == "ok" for found in rows.values()) == ok
    return rows


def caption(
    start: StartRun, executor: Executor, inputs: list[str | Path], output: Path, model: Path, *args: str, **env: str
) -> TaggedRun:
    """Start `caprl caption INPUTS -o OUTPUT` with two engines under `executor`."""
    return start(
        "caption", *inputs, "-o", output, "--model", model, *ENGINE_ARGS, *executor.args, *args, **executor.env, **env
    )


def finished(run: TaggedRun, executor: Executor, expect: int = 0) -> str:
    """Wait for the run; check its exit code and that it left no process behind. Returns its stderr."""
    code, stderr = run.finish()
    assert code == expect, stderr
    assert executor.left_behind(run) == []
    return stderr


def test_two_engines_share_one_queue(
    folder: Path, tiny_model: Path, tagged_runs: StartRun, tmp_path: Path, executor: Executor
) -> None:
    output = tmp_path / "out.parquet"
    # Engine 0 is slowed down (a slow GPU): it must take fewer images than engine 1.
    run = caption(tagged_runs, executor, [folder], output, tiny_model, *SMALL_HOLDINGS, CAPRL_TEST_ENGINE_DELAY="0:2")
    stderr = finished(run, executor)
    # Engine hosts print no library warnings at the default level: every line is caprl's.
    assert all(line.startswith("caprl: ") for line in stderr.splitlines() if line.strip()), stderr
    assert_every_key_once(output)
    engines = summary_of(output)["run"]["engines"]
    assert [engine["engine"] for engine in engines] == [0, 1]
    assert sum(engine["images"] for engine in engines) == IMAGES
    assert engines[0]["images"] < engines[1]["images"]
    assert all(engine["restarts"] == 0 for engine in engines)


def test_a_killed_engine_is_replaced_and_its_images_redone(
    folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, executor: Executor
) -> None:
    output = tmp_path / "out.parquet"
    run = caption(
        tagged_runs, executor, [folder], output, tiny_model, "--flush-every", "1", *SMALL_HOLDINGS,
        CAPRL_TEST_ENGINE_DELAY="*:0.3",
    )
    hosts = wait_until(lambda: len(executor.engine_pids(run)) == 2 and executor.engine_pids(run), run.process)
    wait_until(lambda: committed_parts(output), run.process)  # captioning is under way
    os.kill(hosts[0], signal.SIGKILL)
    finished(run, executor)
    assert_every_key_once(output)
    engines = summary_of(output)["run"]["engines"]
    assert sum(engine["restarts"] for engine in engines) >= 1
    assert sum(engine["images"] for engine in engines) == IMAGES


def test_a_frozen_engine_is_replaced_after_the_stall_timeout(
    folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, executor: Executor
) -> None:
    output = tmp_path / "out.parquet"
    run = caption(
        tagged_runs, executor, [folder], output, tiny_model, "--flush-every", "1", "--stall-timeout", "5s",
        *SMALL_HOLDINGS, CAPRL_TEST_ENGINE_DELAY="*:0.3",
    )
    hosts = wait_until(lambda: len(executor.engine_pids(run)) == 2 and executor.engine_pids(run), run.process)
    wait_until(lambda: committed_parts(output), run.process)
    frozen = hosts[1]
    os.kill(frozen, signal.SIGSTOP)
    stderr = finished(run, executor)
    assert "no progress" in stderr
    assert_every_key_once(output)
    assert sum(engine["restarts"] for engine in summary_of(output)["run"]["engines"]) >= 1
    assert not Path(f"/proc/{frozen}").exists()  # killed and reaped, not left frozen


def test_an_image_that_kills_the_engine_becomes_an_engine_error_row(
    folder: Path, tiny_model: Path, tagged_runs: StartRun, tmp_path: Path, executor: Executor
) -> None:
    output = tmp_path / "out.parquet"
    finished(caption(tagged_runs, executor, [folder], output, tiny_model, CAPRL_TEST_ENGINE_CRASH="img05"), executor)
    rows = assert_every_key_once(output, ok=IMAGES - 1)
    crashed = rows["img05.jpg"][0]
    assert crashed["status"] == "error" and crashed["error"].startswith("engine: ")
    assert summary_of(output)["run"]["errors_by_kind"] == {"engine": 1}


def test_a_decoder_that_crashes_and_one_that_hangs_cost_one_row_each(
    folder: Path, tiny_model: Path, tagged_runs: StartRun, tmp_path: Path, executor: Executor
) -> None:
    """The engines' own decode workers (in the worker process or the Ray actor) die on one image and
    hang past --decode-timeout on another: those are a `decode` and a `timeout` row, every other image
    is captioned, and no engine is restarted for them."""
    output = tmp_path / "out.parquet"
    run = caption(
        tagged_runs, executor, [folder], output, tiny_model, "--workers", "2", "--decode-timeout", "5",
        CAPRL_TEST_DECODER_CRASH="img07", CAPRL_TEST_DECODER_HANG="img11",
    )
    finished(run, executor)
    rows = assert_every_key_once(output, ok=IMAGES - 2)
    assert rows["img07.jpg"][0]["error"].startswith("decode: ")
    assert rows["img11.jpg"][0]["error"].startswith("timeout: ")
    summary = summary_of(output)["run"]
    assert summary["errors_by_kind"] == {"decode": 1, "timeout": 1}
    assert all(engine["restarts"] == 0 for engine in summary["engines"])


class HeldImageServer:
    """An image on 127.0.0.1 whose every request is held until the test releases it: a slow URL whose
    read ends when the test says, not after some time."""

    def __init__(self, image: bytes) -> None:
        self.requested = threading.Event()
        self.released = threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._held_headers()
                self.wfile.write(image)

            def do_HEAD(self) -> None:  # noqa: N802
                self._held_headers()

            def _held_headers(self) -> None:
                held.requested.set()
                held.released.wait()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_image(tmp_path: Path) -> Iterator[HeldImageServer]:
    Image.new("RGB", (48, 40), "purple").save(tmp_path / "slow.png")
    server = HeldImageServer((tmp_path / "slow.png").read_bytes())
    yield server
    server.close()


def test_a_slow_image_holds_up_neither_the_other_images_nor_the_run(
    folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, run_caprl, held_image: HeldImageServer,
    executor: Executor,
) -> None:
    """The slow URL comes first, so the engine that takes it has the next images of its unit queued
    behind it: every other image is captioned and committed while the slow one is still being read;
    meanwhile the run holds its lock (a second run exits 75) and `status` reads the state; once the read
    ends, the run finishes with every key once."""
    output = tmp_path / "out.parquet"
    others = [f"img{number:02d}.jpg" for number in range(IMAGES)]
    run = caption(
        tagged_runs, executor, [held_image.url, folder], output, tiny_model, "--flush-every", "1",
        # Two decode workers per engine even on a 2-core machine: one waits on the slow read, the
        # other decodes the rest. One image per batch: a batch is not held open for the slow image.
        "--workers", "2", "--batch-size", "1", "--decode-timeout", "3600",
    )
    wait_until(held_image.requested.is_set, run.process)
    wait_until(lambda: sorted(committed_keys(output)) == others, run.process)
    assert not held_image.released.is_set() and run.process.poll() is None  # the slow read is still held

    second = run_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, *executor.args, env=executor.env
    )
    assert second.returncode == 75, second.stderr
    status = run_caprl("status", output, held_image.url, folder, "--json")
    assert status.returncode == 0, status.stderr
    assert (json.loads(status.stdout)["done"], json.loads(status.stdout)["remaining"]) == (IMAGES, 1)

    held_image.released.set()
    finished(run, executor)
    rows = rows_by_key(output)
    assert sorted(rows) == sorted([*others, held_image.url])
    assert all(len(found) == 1 and found[0]["status"] == "ok" for found in rows.values())


def test_a_url_that_trickles_is_a_timeout_row_that_holds_up_nothing(
    folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, held_image: HeldImageServer,
    executor: Executor,
) -> None:
    """A URL that never finishes within --decode-timeout: one `timeout` row, every other image
    captioned, and the run ends by itself."""
    output = tmp_path / "out.parquet"
    run = caption(
        tagged_runs, executor, [held_image.url, folder], output, tiny_model,
        "--workers", "2", "--batch-size", "1", "--decode-timeout", "4",
    )
    finished(run, executor)
    rows = rows_by_key(output)
    assert sorted(rows) == sorted([*(f"img{number:02d}.jpg" for number in range(IMAGES)), held_image.url])
    assert all(len(found) == 1 for found in rows.values())
    assert rows[held_image.url][0]["error"].startswith("timeout: ")
    assert sum(found[0]["status"] == "ok" for found in rows.values()) == IMAGES


def jpeg(number: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48 + number, 40), (number * 30 % 256, 60, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_webdataset_output_with_images(
    tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, executor: Executor
) -> None:
    """Shards in, WebDataset shards out holding each original image beside its caption, read back by
    `webdataset` itself: every key once, the image bytes those of the input."""
    import webdataset as wds

    images = {f"s{shard}-{number:02d}": jpeg(shard * 10 + number) for shard in range(2) for number in range(6)}
    for shard in range(2):
        write_shard(
            tmp_path / "in" / f"shard-{shard}.tar",
            [{"__key__": key, "jpg": data} for key, data in images.items() if key.startswith(f"s{shard}-")],
        )
    out = tmp_path / "out"
    finished(caption(
        tagged_runs, executor, [tmp_path / "in" / "shard-{0..1}.tar"], out / "caps-%06d.tar",
        tiny_model, "--format", "webdataset", "--images",
    ), executor)
    read = {}
    for sample in wds.WebDataset(sorted(str(path) for path in out.glob("caps-*.tar")), shardshuffle=False):
        assert sample["__key__"] not in read
        read[sample["__key__"]] = sample
    assert sorted(read) == sorted(images)
    assert all(read[key]["jpg"] == data for key, data in images.items())
    assert all(json.loads(read[key]["json"])["status"] == "ok" for key in images)


def test_sigterm_drains_then_a_resume_completes(
    folder: Path, tiny_model: Path, tmp_path: Path, tagged_runs: StartRun, run_caprl, executor: Executor
) -> None:
    """SIGTERM at the first committed row: exit 143 with the finished rows committed and published,
    then a plain rerun captions exactly the rest, and `status` counts every image done."""
    output = tmp_path / "out.parquet"
    run = caption(
        tagged_runs, executor, [folder], output, tiny_model, *SMALL_HOLDINGS, pause_at="rows.first",
        CAPRL_TEST_ENGINE_DELAY="*:0.5",
    )
    run.wait_paused()
    run.process.send_signal(signal.SIGTERM)
    run.release()
    finished(run, executor, expect=143)
    done = committed_keys(output)
    assert 1 <= len(done) == len(set(done)) < IMAGES
    assert summary_of(output)["run"]["stopped_by"] == "sigterm"
    finished(caption(tagged_runs, executor, [folder], output, tiny_model), executor)
    assert_every_key_once(output)
    assert summary_of(output)["run"]["images"] == IMAGES - len(done)
    status = run_caprl("status", output, folder, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == IMAGES


def test_max_runtime_with_several_engines_exits_3_then_a_rerun_completes(
    folder: Path, tiny_model: Path, tagged_runs: StartRun, run_caprl, tmp_path: Path, executor: Executor
) -> None:
    """At least 42 s of captioning (3.5 s per image, 24 images, two engines) cannot fit in 35 s,
    start-up included: the deadline always leaves work, whatever the machine's speed; and 35 s leave
    two engines time to load the model first, a Ray cluster's start included (a deadline that falls
    before captioning starts exits at once and writes no summary, see test_e2e_signals)."""
    output = tmp_path / "out.parquet"
    finished(
        caption(
            tagged_runs, executor, [folder], output, tiny_model, "--flush-every", "1", *SMALL_HOLDINGS,
            "--max-runtime", "35s", CAPRL_TEST_ENGINE_DELAY="*:3.5",
        ),
        executor,
        expect=3,
    )
    assert summary_of(output)["run"]["stopped_by"] == "deadline"
    done = committed_keys(output)
    assert len(done) == len(set(done)) < IMAGES
    status = run_caprl("status", output, folder, "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert (counts["done"], counts["remaining"]) == (len(done), IMAGES - len(done))

    finished(caption(tagged_runs, executor, [folder], output, tiny_model), executor)
    assert_every_key_once(output)
    assert summary_of(output)["run"]["images"] == IMAGES - len(done)
