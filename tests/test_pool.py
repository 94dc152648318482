"""The preprocessing pool: one outcome per sample as each finishes, failures as values, a bounded window;
workers that die or hang cost at most their image; reads are capped."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from caprl_cli.errors import ErrorKind, SampleError
from caprl_cli.prepare.grid import Grid
from caprl_cli.prepare.images import DEFAULT_MAX_IMAGE_PIXELS
from caprl_cli.inputs.sample import Sample
from caprl_cli.prepare.pool import CRASHED, DecodeSettings, Failed, Prepared, Preprocessor, prepare_sample, read_sample_bytes
from caprl_cli.prepare.reading import read_capped
from caprl_cli.prepare.workers import CRASH_ENV, HANG_ENV
from caprl_cli.inputs.resolve import list_samples

GRID = Grid(28)


def make_pool(
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, workers: int = 1, window: int | None = None, **decode: Any
) -> Preprocessor:
    """A pool over GRID with the given decode settings."""
    return Preprocessor(DecodeSettings(GRID, max_pixels, **decode), workers, window)



def _png(size=(64, 48), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _run(samples: list[Sample], workers: int, window: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    preprocessor = make_pool(max_pixels, workers=workers, window=window)
    try:
        return list(preprocessor.prepare(samples))
    finally:
        preprocessor.close()


def _by_key(outcomes) -> dict:
    """Outcomes by key, checking that no key came twice."""
    outcomes = list(outcomes)
    found = {outcome.sample.key: outcome for outcome in outcomes}
    assert len(found) == len(outcomes)
    return found


def _check_corpus_outcomes(outcomes, samples, expected) -> None:
    assert len(outcomes) == len(samples)
    assert sorted(outcome.sample.key for outcome in outcomes) == sorted(sample.key for sample in samples)
    for outcome in outcomes:
        kind = expected[outcome.sample.key]
        if kind is None:
            assert isinstance(outcome, Prepared), (outcome.sample.key, outcome)
            assert outcome.image.mode == "RGB"
            assert outcome.image.size == GRID.target_size(outcome.width, outcome.height)
        else:
            assert isinstance(outcome, Failed), outcome.sample.key
            assert outcome.kind is ErrorKind(kind), outcome.sample.key


@pytest.mark.parametrize("workers", [0, 2])
def test_corpus_outcomes_with_right_kinds(corpus, workers: int) -> None:
    """Every corpus sample gives exactly one outcome: Failed with the expected kind for broken files,
    Prepared (RGB on the grid) for the rest."""
    root, expected = corpus
    samples = list_samples([str(root)])
    _check_corpus_outcomes(_run(samples, workers), samples, expected)


def test_window_smaller_than_sample_count(corpus) -> None:
    """A window of 3 with 2 workers still yields every sample once."""
    root, expected = corpus
    samples = list_samples([str(root)])
    assert len(samples) > 3
    _check_corpus_outcomes(_run(samples, workers=2, window=3), samples, expected)


def test_window_of_one(corpus) -> None:
    """The smallest window degrades to one at a time, but loses nothing."""
    root, expected = corpus
    samples = list_samples([str(root)])[:6]
    _check_corpus_outcomes(_run(samples, workers=1, window=1), samples, expected)


def test_default_window_scales_with_workers() -> None:
    """Without an explicit window, at least 16 and 8 per worker are in flight."""
    assert make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=0).window == 16
    pool = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=3)
    try:
        assert pool.window == 24
    finally:
        pool.close()


def test_window_bounds_samples_pulled_ahead() -> None:
    """With a pool, no more than `window` samples are taken from the input before the first result."""
    pulled = []

    def samples():
        for i in range(20):
            pulled.append(i)
            yield Sample(key=f"{i:02d}.png", source="memory", data=_png())

    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=1, window=4)
    try:
        outcomes = preprocessor.prepare(samples())
        first = next(outcomes)
        assert first.sample.key == "00.png"
        assert len(pulled) == 4
        rest = list(outcomes)
    finally:
        preprocessor.close()
    assert [outcome.sample.key for outcome in [first, *rest]] == [f"{i:02d}.png" for i in range(20)]


@pytest.mark.parametrize("workers", [0, 2])
def test_vanished_path_is_read_error(corpus, tmp_path: Path, workers: int) -> None:
    """A file listed but gone when read becomes Failed(READ) and does not disturb its neighbours."""
    root, _ = corpus
    doomed = tmp_path / "doomed.jpg"
    doomed.write_bytes((root / "photo_640x480.jpg").read_bytes())
    samples = list_samples([str(root / "photo_200x200.bmp"), str(doomed), str(root / "chart_bar.png")])
    doomed.unlink()
    outcomes = _by_key(_run(samples, workers))
    assert sorted(outcomes) == ["chart_bar.png", "doomed.jpg", "photo_200x200.bmp"]
    assert isinstance(outcomes["chart_bar.png"], Prepared) and isinstance(outcomes["photo_200x200.bmp"], Prepared)
    assert isinstance(outcomes["doomed.jpg"], Failed) and outcomes["doomed.jpg"].kind is ErrorKind.READ


def test_directory_path_is_read_error(tmp_path: Path) -> None:
    """A path that cannot be read as a file (a folder) is a READ failure, not a crash."""
    outcome = prepare_sample(Sample(key="x.jpg", source=str(tmp_path), path=str(tmp_path)), DecodeSettings(GRID, 10**8))
    assert isinstance(outcome, Failed)
    assert outcome.kind is ErrorKind.READ


def test_sample_without_bytes_or_path_is_read_error() -> None:
    """A sample with nothing to read is a READ failure."""
    outcome = prepare_sample(Sample(key="x.jpg", source="nowhere"), DecodeSettings(GRID, 10**8))
    assert isinstance(outcome, Failed)
    assert outcome.kind is ErrorKind.READ


@pytest.mark.parametrize("workers", [0, 2])
def test_in_memory_samples(workers: int) -> None:
    """Samples that carry their bytes (tar shards) are prepared without any path."""
    samples = [
        Sample(key="a.png", source="shard.tar", data=_png((64, 48), "red")),
        Sample(key="b.png", source="shard.tar", data=b"not an image"),
        Sample(key="c.png", source="shard.tar", data=_png((300, 800), "blue"), meta='{"m": 1}'),
    ]
    outcomes = _by_key(_run(samples, workers))
    assert [type(outcomes[key]) for key in ("a.png", "b.png", "c.png")] == [Prepared, Failed, Prepared]
    assert outcomes["b.png"].kind is ErrorKind.DECODE
    assert (outcomes["c.png"].width, outcomes["c.png"].height) == (300, 800)
    assert outcomes["c.png"].image.size == GRID.target_size(300, 800)
    assert outcomes["c.png"].sample.meta == '{"m": 1}'
    assert read_sample_bytes(samples[0]) == samples[0].data


@pytest.mark.parametrize("workers", [0, 2])
def test_max_image_pixels_reaches_the_workers(corpus, workers: int) -> None:
    """The pixel cap given to the Preprocessor applies in its workers too."""
    root, _ = corpus
    samples = list_samples([str(root / "photo_640x480.jpg"), str(root / "photo_120x90.gif")])
    outcomes = _by_key(_run(samples, workers, max_pixels=150 * 150))
    assert sorted(outcomes) == ["photo_120x90.gif", "photo_640x480.jpg"]
    assert isinstance(outcomes["photo_120x90.gif"], Prepared)
    assert isinstance(outcomes["photo_640x480.jpg"], Failed)
    assert outcomes["photo_640x480.jpg"].kind is ErrorKind.TOO_LARGE


def test_empty_input() -> None:
    """No samples, no outcomes, with or without a pool."""
    assert _run([], workers=0) == []
    assert _run([], workers=1) == []


# --- slow images, dying and hanging workers ------------------------------------------------------------
#
# A slow image is a URL on a server on 127.0.0.1 that holds its first answer until the test releases it;
# dying and hanging workers are real: a SIGKILL from the test, or the workers' test hooks
# (CAPRL_TEST_DECODER_CRASH / CAPRL_TEST_DECODER_HANG, see prepare.workers).

HANG_GUARD_S = 60  # a held answer is released after this anyway, so a broken pool fails instead of hanging


class _GatedServer:
    """Serves `/<name>` PNGs; the first request for `held` waits until `release` is set."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.requested = threading.Event()
        self.release = threading.Event()
        self.requests: Counter[str] = Counter()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                gate.requests[name] += 1
                if name == gate.held and gate.requests[name] == 1:
                    gate.requested.set()
                    gate.release.wait(HANG_GUARD_S)
                body = _png()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(_png())))
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated() -> Iterator[Callable[[str], _GatedServer]]:
    servers: list[_GatedServer] = []

    def start(held: str) -> _GatedServer:
        servers.append(_GatedServer(held))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _memory_samples(count: int) -> list[Sample]:
    return [Sample(key=f"{i:02d}.png", source="memory", data=_png()) for i in range(count)]


def test_slow_image_does_not_hold_back_the_others(gated) -> None:
    """Outcomes come as images finish: while one URL is held by its server, every other image (more of
    them than the window) comes out; the slow one comes last, once released."""
    server = gated("slow.png")
    slow = Sample(key="slow.png", source=server.url("slow.png"), path=server.url("slow.png"))
    others = _memory_samples(12)
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=2, window=4)
    try:
        outcomes = preprocessor.prepare([slow, *others])
        first = [next(outcomes) for _ in others]
        assert not server.release.is_set()
        server.release.set()
        last = list(outcomes)
    finally:
        preprocessor.close()
    assert sorted(outcome.sample.key for outcome in first) == [sample.key for sample in others]
    assert [outcome.sample.key for outcome in last] == ["slow.png"]
    assert all(isinstance(outcome, Prepared) for outcome in [*first, *last])


def test_worker_killed_mid_image_costs_nothing(gated) -> None:
    """A worker killed with SIGKILL while it holds an image: the image is tried again in a fresh worker
    and comes out prepared; every other image comes out once; the pool keeps its size."""
    server = gated("victim.png")
    victim = Sample(key="victim.png", source=server.url("victim.png"), path=server.url("victim.png"))
    samples = [*_memory_samples(6), victim, *_memory_samples(12)[6:]]
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=2, window=5)

    def kill_the_holder() -> None:
        if not server.requested.wait(HANG_GUARD_S):
            return
        holders = [w for w in list(preprocessor._pool) if w.sample is not None and w.sample.key == "victim.png"]
        for worker in holders:
            os.kill(worker.process.pid, signal.SIGKILL)
        server.release.set()

    killer = threading.Thread(target=kill_the_holder, daemon=True)
    killer.start()
    try:
        outcomes = _by_key(preprocessor.prepare(samples))
        workers_after = len(preprocessor._pool)
    finally:
        preprocessor.close()
    killer.join()
    assert sorted(outcomes) == sorted(sample.key for sample in samples)
    assert all(isinstance(outcome, Prepared) for outcome in outcomes.values()), outcomes
    assert server.requests["victim.png"] == 2  # read again after the kill
    assert workers_after == 2


def test_image_that_kills_its_worker_every_time_is_a_decode_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image whose decoder kills the worker each time becomes one `decode` row after its second
    crash; every other image is prepared, and the pool still works afterwards."""
    monkeypatch.setenv(CRASH_ENV, "boom")
    samples = [*_memory_samples(8), Sample(key="boom.png", source="memory", data=_png())]
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=2, window=4)
    try:
        outcomes = _by_key(preprocessor.prepare(samples))
        again = _by_key(preprocessor.prepare(_memory_samples(3)))
    finally:
        preprocessor.close()
    assert sorted(outcomes) == sorted(sample.key for sample in samples)
    boom = outcomes.pop("boom.png")
    assert isinstance(boom, Failed) and boom.kind is ErrorKind.DECODE and boom.message == CRASHED
    assert all(isinstance(outcome, Prepared) for outcome in outcomes.values())
    assert all(isinstance(outcome, Prepared) for outcome in again.values()) and len(again) == 3


def test_hung_decode_is_a_timeout_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image whose decode never returns becomes a `timeout` row after --decode-timeout; its worker
    is replaced and every other image is prepared."""
    monkeypatch.setenv(HANG_ENV, "stuck")
    samples = [Sample(key="stuck.png", source="memory", data=_png()), *_memory_samples(6)]
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=2, window=4, decode_timeout=1)
    try:
        outcomes = _by_key(preprocessor.prepare(samples))
        again = _by_key(preprocessor.prepare(_memory_samples(3)))
    finally:
        preprocessor.close()
    stuck = outcomes.pop("stuck.png")
    assert isinstance(stuck, Failed) and stuck.kind is ErrorKind.TIMEOUT
    assert sorted(outcomes) == [sample.key for sample in samples[1:]]
    assert all(isinstance(outcome, Prepared) for outcome in [*outcomes.values(), *again.values()])


def test_a_stop_ends_a_wait_on_a_hung_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """`should_stop` ends `prepare` while it waits on an image that would take until the timeout."""
    monkeypatch.setenv(HANG_ENV, "stuck")
    stop = threading.Event()
    samples = [Sample(key="stuck.png", source="memory", data=_png()), *_memory_samples(2)]
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=2, decode_timeout=HANG_GUARD_S)
    try:
        outcomes = preprocessor.prepare(samples, stop.is_set)
        first = [next(outcomes), next(outcomes)]
        stop.set()
        rest = list(outcomes)
    finally:
        preprocessor.close()
    assert sorted(outcome.sample.key for outcome in first) == ["00.png", "01.png"]
    assert rest == []


def test_a_long_wait_says_what_it_waits_for(gated) -> None:
    """A wait on the pool logs (at debug, shown with -v) the images it waits for; the held answer is
    released when that line appears."""
    server = gated("slow.png")
    slow = Sample(key="slow.png", source=server.url("slow.png"), path=server.url("slow.png"))
    logger = logging.getLogger("caprl")
    lines: list[str] = []

    class Release(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if "slow.png" in lines[-1]:
                server.release.set()

    handler = Release(logging.DEBUG)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=1)
    preprocessor.wait_report_after_s = 0.2
    try:
        outcomes = list(preprocessor.prepare([slow]))
    finally:
        preprocessor.close()
        logger.removeHandler(handler)
        logger.setLevel(saved)
    assert [type(outcome) for outcome in outcomes] == [Prepared]
    assert any(line.startswith("waiting") and "slow.png" in line for line in lines), lines


# --- bounded reads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_sparse_giant_file_is_too_large_unread(tmp_path: Path, workers: int) -> None:
    """A 3 GB (sparse) file is refused by its size, never read: `too_large`."""
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(3 << 30)
    outcomes = _run([Sample(key="huge.jpg", source=str(huge), path=str(huge))], workers)
    assert isinstance(outcomes[0], Failed) and outcomes[0].kind is ErrorKind.TOO_LARGE
    assert str(3 << 30) in outcomes[0].message


def test_max_image_bytes_applies_to_files_and_bytes(tmp_path: Path) -> None:
    """The byte cap given to the Preprocessor refuses larger files and in-memory images alike."""
    data = _png((300, 300), "green")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    samples = [
        Sample(key="a.png", source=str(path), path=str(path)),
        Sample(key="b.png", source="memory", data=data),
    ]
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=1, max_image_bytes=len(data) - 1)
    try:
        outcomes = list(preprocessor.prepare(samples))
    finally:
        preprocessor.close()
    assert [(type(outcome), outcome.kind) for outcome in outcomes] == [(Failed, ErrorKind.TOO_LARGE)] * 2


def test_read_stops_past_the_cap_whatever_the_size_said() -> None:
    """A stream that gives more than it claimed (a growing file, a lying server) is cut at cap + 1."""
    assert read_capped(io.BytesIO(b"x" * 1000), 1000) == b"x" * 1000

    class Endless(io.RawIOBase):
        given = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            buffer[:] = b"x" * len(buffer)
            self.given += len(buffer)
            return len(buffer)

    endless = Endless()
    with pytest.raises(SampleError) as raised:
        read_capped(endless, 1000)
    assert raised.value.kind is ErrorKind.TOO_LARGE
    assert endless.given == 1001


def test_url_over_the_cap_is_too_large(serve_folder, tmp_path: Path) -> None:
    """A URL larger than the cap is `too_large`; one under it is prepared."""
    (tmp_path / "big.png").write_bytes(_png((400, 400), "blue") + b"\0" * 5000)
    (tmp_path / "small.png").write_bytes(_png())
    base = serve_folder(tmp_path)
    samples = [Sample(key=name, source=f"{base}/{name}", path=f"{base}/{name}") for name in ("big.png", "small.png")]
    preprocessor = make_pool(DEFAULT_MAX_IMAGE_PIXELS, workers=1, max_image_bytes=4000)
    try:
        outcomes = _by_key(preprocessor.prepare(samples))
    finally:
        preprocessor.close()
    assert isinstance(outcomes["big.png"], Failed) and outcomes["big.png"].kind is ErrorKind.TOO_LARGE
    assert isinstance(outcomes["small.png"], Prepared)


def test_fifo_is_a_read_error_not_a_hang(tmp_path: Path) -> None:
    """A FIFO named as an image is refused before it is opened (opening one waits for a writer)."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = prepare_sample(Sample(key="pipe.jpg", source=str(fifo), path=str(fifo)), DecodeSettings(GRID, 10**8))
    assert isinstance(outcome, Failed) and outcome.kind is ErrorKind.READ
    assert "FIFO" in outcome.message
