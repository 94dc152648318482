"""Several engines on one queue, end to end: the real CLI with two transformers engines on the CPU
(`--num-engines 2`), real worker processes killed and frozen with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
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


def rows_by_key(output: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in pq.read_table(output).to_pylist():
        rows.setdefault(row["key"], []).append(row)
    return rows


def summary_of(output: Path) -> dict:
    return json.loads(Path(f"{output}.summary.json").read_text())


@pytest.fixture
def start_caprl() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start the real CLI in the background; a run still going when the test ends is killed."""
    started: list[subprocess.Popen] = []

    def start(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = _popen(*args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _popen(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "caprl_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def engine_workers(parent: int) -> dict[str, int]:
    """`caprl engine <n>` -> pid, among the children of `parent` (found through /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and comm.startswith("caprl engine"):
            found[comm] = int(entry.name)
    return found


def wait_until(condition: Callable[[], object], process: subprocess.Popen, timeout: float = 300) -> object:
    """Poll `condition` until it holds; fails if the run ends first (the event never came)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the run ended before the event: {process.communicate()[1]}"
        time.sleep(0.05)
    raise AssertionError("the event did not come")


def committed_parts(output: Path) -> list[Path]:
    state = output.parent / f"{output.name}.caprl"
    return [path for path in state.rglob("*.parquet") if not path.name.startswith(".")]


def assert_every_key_once(output: Path, ok: int = IMAGES) -> dict[str, list[dict]]:
    rows = rows_by_key(output)
    assert sorted(rows) == [f"img{number:02d}.jpg" for number in range(IMAGES)]
    assert all(len(found) == 1 for found in rows.values())
    assert sum(found[0]["status"] == "ok" for found in rows.values()) == ok
    return rows


def test_two_engines_share_one_queue(folder: Path, tiny_model: Path, run_caprl, tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    # Engine 0 is slowed down (a slow GPU): it must take fewer images than engine 1.
    result = run_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, *SMALL_HOLDINGS,
        env={"CAPRL_TEST_ENGINE_DELAY": "0:2"},
    )
    assert result.returncode == 0, result.stderr
    # Engine worker processes print no library warnings at the default level: every line is caprl's.
    assert all(line.startswith("caprl: ") for line in result.stderr.splitlines() if line.strip()), result.stderr
    assert_every_key_once(output)
    engines = summary_of(output)["run"]["engines"]
    assert [engine["engine"] for engine in engines] == [0, 1]
    assert sum(engine["images"] for engine in engines) == IMAGES
    assert engines[0]["images"] < engines[1]["images"]
    assert all(engine["restarts"] == 0 for engine in engines)


def test_resume_and_status_with_several_engines(folder: Path, tiny_model: Path, run_caprl, tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    first = run_caprl("caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--limit", "10")
    assert first.returncode == 0, first.stderr
    assert len(rows_by_key(output)) == 10
    second = run_caprl("caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS)
    assert second.returncode == 0, second.stderr
    assert_every_key_once(output)
    assert summary_of(output)["run"]["images"] == IMAGES - 10
    status = run_caprl("status", output, folder, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == IMAGES


def test_a_killed_engine_is_replaced_and_its_images_redone(
    folder: Path, tiny_model: Path, tmp_path: Path, start_caprl
) -> None:
    output = tmp_path / "out.parquet"
    process = start_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--flush-every", "1",
        *SMALL_HOLDINGS, env={"CAPRL_TEST_ENGINE_DELAY": "*:0.3"},
    )
    workers = wait_until(lambda: len(engine_workers(process.pid)) == 2 and engine_workers(process.pid), process)
    wait_until(lambda: committed_parts(output), process)  # captioning is under way
    os.kill(workers["caprl engine 0"], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert_every_key_once(output)
    engines = summary_of(output)["run"]["engines"]
    assert engines[0]["restarts"] >= 1
    assert sum(engine["images"] for engine in engines) == IMAGES


def test_a_frozen_engine_is_replaced_after_the_stall_timeout(
    folder: Path, tiny_model: Path, tmp_path: Path, start_caprl
) -> None:
    output = tmp_path / "out.parquet"
    process = start_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--flush-every", "1",
        "--stall-timeout", "5s", *SMALL_HOLDINGS, env={"CAPRL_TEST_ENGINE_DELAY": "*:0.3"},
    )
    workers = wait_until(lambda: len(engine_workers(process.pid)) == 2 and engine_workers(process.pid), process)
    wait_until(lambda: committed_parts(output), process)
    frozen = workers["caprl engine 1"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        _, stderr = process.communicate(timeout=600)
    finally:
        if Path(f"/proc/{frozen}").exists():
            os.kill(frozen, signal.SIGKILL)
    assert process.returncode == 0, stderr
    assert "no progress" in stderr
    assert_every_key_once(output)
    assert summary_of(output)["run"]["engines"][1]["restarts"] >= 1
    assert not Path(f"/proc/{frozen}").exists()  # killed and reaped, not left frozen


def test_an_image_that_kills_the_engine_becomes_an_engine_error_row(
    folder: Path, tiny_model: Path, run_caprl, tmp_path: Path
) -> None:
    output = tmp_path / "out.parquet"
    result = run_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS,
        env={"CAPRL_TEST_ENGINE_CRASH": "img05"},
    )
    assert result.returncode == 0, result.stderr
    rows = assert_every_key_once(output, ok=IMAGES - 1)
    crashed = rows["img05.jpg"][0]
    assert crashed["status"] == "error" and crashed["error"].startswith("engine: ")
    assert summary_of(output)["run"]["errors_by_kind"] == {"engine": 1}


class HeldImageServer:
    """An image on 127.0.0.1 whose every request is held until the test releases it: a slow URL whose
    read ends when the test says, not after some time."""

    def __init__(self, image: bytes) -> None:
        self.requested = threading.Event()
        self.released = threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                held.requested.set()
                held.released.wait()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def do_HEAD(self) -> None:  # noqa: N802
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


def committed_keys(output: Path) -> list[str]:
    return [key for part in committed_parts(output) for key in pq.read_table(part, columns=["key"])["key"].to_pylist()]


def test_a_slow_image_holds_up_neither_the_other_images_nor_the_run(
    folder: Path, tiny_model: Path, tmp_path: Path, start_caprl, run_caprl, held_image: HeldImageServer
) -> None:
    """The slow URL comes first, so the engine that takes it has the next images of its unit queued
    behind it: every other image is captioned and committed while the slow one is still being read;
    meanwhile the run holds its lock (a second run exits 75) and `status` reads the state; once the read
    ends, the run finishes with every key once."""
    output = tmp_path / "out.parquet"
    others = [f"img{number:02d}.jpg" for number in range(IMAGES)]
    process = start_caprl(
        "caption", held_image.url, folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--flush-every", "1",
        # Two decode workers per engine even on a 2-core machine: one waits on the slow read, the
        # other decodes the rest. One image per batch: a batch is not held open for the slow image.
        "--workers", "2", "--batch-size", "1", "--decode-timeout", "3600",
    )
    wait_until(held_image.requested.is_set, process)
    wait_until(lambda: sorted(committed_keys(output)) == others, process)
    assert not held_image.released.is_set() and process.poll() is None  # the slow read is still held

    second = run_caprl("caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS)
    assert second.returncode == 75, second.stderr
    status = run_caprl("status", output, held_image.url, folder, "--json")
    assert status.returncode == 0, status.stderr
    assert (json.loads(status.stdout)["done"], json.loads(status.stdout)["remaining"]) == (IMAGES, 1)

    held_image.released.set()
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    rows = rows_by_key(output)
    assert sorted(rows) == sorted([*others, held_image.url])
    assert all(len(found) == 1 and found[0]["status"] == "ok" for found in rows.values())


def test_max_runtime_with_several_engines_exits_3_then_a_rerun_completes(
    folder: Path, tiny_model: Path, run_caprl, tmp_path: Path
) -> None:
    """At least 48 s of captioning (4 s per image, 24 images, two engines) cannot fit in 40 s, model
    loading included: the deadline always leaves work, whatever the machine's speed; and 40 s leave
    two engine workers time to load the model first even on a busy machine (a deadline that falls
    before captioning starts exits at once and writes no summary, see test_e2e_signals)."""
    output = tmp_path / "out.parquet"
    partial = run_caprl(
        "caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS, "--flush-every", "1",
        *SMALL_HOLDINGS, "--max-runtime", "40s", env={"CAPRL_TEST_ENGINE_DELAY": "*:4"},
    )
    assert partial.returncode == 3, partial.stderr
    assert summary_of(output)["run"]["stopped_by"] == "deadline"
    done = committed_keys(output)
    assert len(done) == len(set(done)) < IMAGES
    status = run_caprl("status", output, folder, "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert (counts["done"], counts["remaining"]) == (len(done), IMAGES - len(done))

    rest = run_caprl("caption", folder, "-o", output, "--model", tiny_model, *ENGINE_ARGS)
    assert rest.returncode == 0, rest.stderr
    assert_every_key_once(output)
    assert summary_of(output)["run"]["images"] == IMAGES - len(done)
