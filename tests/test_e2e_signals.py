"""Signals and --max-runtime at every moment of a run, on the real CLI in a subprocess.

Each signal lands at a known moment, found by an event rather than a sleep: the run is held at a
named pause point (`CAPRL_PAUSE_AT`, see caprl_cli.faults.pause_point) until the test has sent the
signal, or the test waits for the line a run logs before it waits. Before captioning starts there is
nothing to save: the run ends at once with the signal's exit code and leaves no trace (a new output)
or leaves everything byte-identical (an output being continued). After captioning started, the first
signal drains. Uses the transformers engine on the tiny model; the vLLM case is marked `vllm`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from contract import read_rows
from PIL import Image

FAST = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "2", "--no-progress")
# One image at a time: a drain after the first row leaves the others for the next run.
ONE_BY_ONE = ("--engine", "transformers", "--max-tokens", "8", "--batch-size", "1", "--no-progress")
BOUND_S = 300.0  # generous bound on any wait for an event; never an assertion on speed


def make_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{index}.png" for index in range(count)]
    for index, name in enumerate(names):
        Image.new("RGB", (96 + 8 * index, 64), (index * 40 % 256, 90, 160)).save(folder / name)
    return names


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (names and bytes), to prove a run changed nothing."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def output_entries(folder: Path) -> list[str]:
    """What a run left beside its inputs (the images folder and pause files excluded)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in ("images", "ready"))


class Run:
    """A `caprl caption` process the test signals; its output lines (stderr and stdout, where vLLM logs)
    are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caprl_cli", "caption", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,  # engines log to stdout
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, text: str) -> None:
        """Wait until a stderr line holding `text` arrives; fail if the run ends first."""
        while True:
            line = self.lines.get(timeout=BOUND_S)
            if line is None:
                raise AssertionError(f"the run ended before logging {text!r}: {''.join(self.seen)}")
            self.seen.append(line)
            if text in line:
                return

    def finish(self) -> tuple[int, str]:
        returncode = self.process.wait(timeout=BOUND_S)
        self._reader.join(timeout=60)
        while (line := self.lines.get_nowait() if not self.lines.empty() else None) is not None:
            self.seen.append(line)
        return returncode, "".join(self.seen)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def wait_until_paused(run: Run, ready: Path) -> None:
    """Wait until the run sits at its pause point (it wrote the ready file), or fail if it ended."""
    deadline = time.monotonic() + BOUND_S
    while not ready.exists():
        code = run.process.poll()
        assert code is None, f"the run ended (exit {code}) before reaching its pause point: {run.finish()[1]}"
        assert time.monotonic() < deadline, "the run never reached its pause point"
        time.sleep(0.02)


def paused_run(tmp_path: Path, point: str, args: list[str], **env: str) -> tuple[Run, Path]:
    ready = tmp_path / "ready"
    run = Run(args, env={"CAPRL_PAUSE_AT": point, "CAPRL_PAUSE_FILE": str(ready), **env})
    return run, ready


def caption_args(images: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [str(images), "-o", str(output), "--model", str(model), *extra]


@pytest.mark.parametrize(
    ("point", "signum", "code"),
    [
        ("model.before_load", signal.SIGTERM, 143),
        ("model.loading", signal.SIGTERM, 143),
        ("model.loading", signal.SIGINT, 130),
        ("model.loaded", signal.SIGTERM, 143),
    ],
)
def test_signal_during_startup_exits_at_once_leaving_no_state(
    tiny_model: Path, tmp_path: Path, point: str, signum: int, code: int
) -> None:
    """Before the model loads, while it loads, and right after: the signal ends the run at once (the
    pause is never released), with its exit code, and a new output leaves nothing behind."""
    images = tmp_path / "images"
    make_images(images, 3)
    output = tmp_path / "out.parquet"
    run, ready = paused_run(tmp_path, point, caption_args(images, output, tiny_model, *FAST))
    try:
        wait_until_paused(run, ready)
        assert (tmp_path / "out.parquet.caprl").is_dir(), "the state exists while the run starts"
        run.process.send_signal(signum)
        returncode, stderr = run.finish()
    finally:
        run.kill()
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    assert output_entries(tmp_path) == []


def test_signal_while_loading_leaves_a_continued_output_untouched(tiny_model: Path, tmp_path: Path) -> None:
    """A run continuing an existing output, stopped while its model loads, changes no byte of it."""
    images = tmp_path / "images"
    make_images(images, 3)
    output = tmp_path / "out" / "out.parquet"
    output.parent.mkdir()
    first = Run(caption_args(images, output, tiny_model, *FAST, "--limit", "2"))
    assert first.finish()[0] == 0
    before = tree_digest(output.parent)
    run, ready = paused_run(tmp_path, "model.loading", caption_args(images, output, tiny_model, *FAST))
    try:
        wait_until_paused(run, ready)
        run.process.send_signal(signal.SIGTERM)
        returncode, stderr = run.finish()
    finally:
        run.kill()
    assert returncode == 143, stderr
    assert tree_digest(output.parent) == before
    assert len(read_rows(output)) == 2


def test_signal_after_the_first_row_drains(tiny_model: Path, tmp_path: Path) -> None:
    """Once captioning has started the first signal drains: finished rows are committed, the output is
    merged and the summary written, exit 143; the same command then finishes the rest."""
    images = tmp_path / "images"
    names = make_images(images, 4)
    output = tmp_path / "out.parquet"
    run, ready = paused_run(tmp_path, "rows.first", caption_args(images, output, tiny_model, *ONE_BY_ONE))
    try:
        wait_until_paused(run, ready)
        run.process.send_signal(signal.SIGTERM)
        ready.unlink()  # let the run go on: it drains
        returncode, stderr = run.finish()
    finally:
        run.kill()
    assert returncode == 143, stderr
    done = [row["key"] for row in read_rows(output)]
    assert 1 <= len(done) < len(names)
    assert set(done) <= set(names)
    assert (tmp_path / "out.parquet.summary.json").exists()
    rest = Run(caption_args(images, output, tiny_model, *ONE_BY_ONE))
    assert rest.finish()[0] == 0
    assert sorted(row["key"] for row in read_rows(output)) == names


def test_max_runtime_passing_while_loading_exits_3_leaving_no_state(tiny_model: Path, tmp_path: Path) -> None:
    """--max-runtime counts from the start and is a timer: a run held while its model loads (the pause
    is never released) stops with exit 3 and leaves no state."""
    images = tmp_path / "images"
    make_images(images, 3)
    output = tmp_path / "out.parquet"
    run, _ = paused_run(tmp_path, "model.loading", caption_args(images, output, tiny_model, *FAST,
                                                                 "--max-runtime", "6s"))
    try:
        returncode, stderr = run.finish()
    finally:
        run.kill()
    assert returncode == 3, stderr
    assert "Traceback" not in stderr
    assert output_entries(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks")
def test_signal_while_waiting_for_the_lock(tiny_model: Path, tmp_path: Path) -> None:
    """--wait says what it waits for, and a signal ends the wait at once, changing nothing."""
    images = tmp_path / "images"
    make_images(images, 1)
    output = tmp_path / "out.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from caprl_cli.state.folder import RunState\n"
         "held = RunState(Path(sys.argv[1])); held.acquire(wait=False); print('held', flush=True); sys.stdin.read()",
         str(output)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = tree_digest(tmp_path / "out.parquet.caprl")
        run = Run(caption_args(images, output, tiny_model, *FAST, "--wait"))
        try:
            run.wait_for_line("waiting for another caprl run")
            run.process.send_signal(signal.SIGTERM)
            returncode, stderr = run.finish()
        finally:
            run.kill()
        assert returncode == 143, stderr
        assert tree_digest(tmp_path / "out.parquet.caprl") == before
    finally:
        holder.kill()
        holder.communicate(timeout=60)


def test_closed_pipe_does_not_change_the_exit_code(tiny_model: Path, tmp_path: Path) -> None:
    """`caprl caption ... 2>&1 | head -1`: once the reader has gone, later log lines and the closing
    line are dropped and the completed run still exits 0 with every row written."""
    images = tmp_path / "images"
    names = make_images(images, 3)
    output = tmp_path / "out.parquet"
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-m", "caprl_cli", "caption", *caption_args(images, output, tiny_model, *FAST), "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "CAPRL_PAUSE_AT": "model.loading", "CAPRL_PAUSE_FILE": str(ready)},
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # `head -1`
        assert first, "the run wrote nothing"
        deadline = time.monotonic() + BOUND_S
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "never reached the pause point"
            time.sleep(0.02)
        process.stdout.close()  # the reader goes away while the model loads
        ready.unlink()  # every line from here on meets a closed pipe
        returncode = process.wait(timeout=BOUND_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    assert returncode == 0
    assert sorted(row["key"] for row in read_rows(output)) == names


def test_limit_zero_says_so(tiny_model: Path, tmp_path: Path) -> None:
    """--limit 0 does nothing and says why, not that the images are already in the output."""
    images = tmp_path / "images"
    make_images(images, 3)
    output = tmp_path / "out.parquet"
    run = Run(caption_args(images, output, tiny_model, *FAST, "--limit", "0"))
    returncode, stderr = run.finish()
    assert returncode == 0, stderr
    closing = stderr.strip().splitlines()[-1]
    assert closing.startswith("caprl: nothing to do: --limit 0;"), closing
    assert "already in" not in closing and "run the same command again" not in closing


@pytest.mark.vllm
def test_sigterm_while_vllm_loads(tiny_model: Path, tmp_path: Path) -> None:
    """The long load: SIGTERM once vLLM has begun building its engine (its first log line, -vv) ends the
    run while it loads, with 143, no state and no captioning line."""
    images = tmp_path / "images"
    make_images(images, 2)
    output = tmp_path / "out.parquet"
    args = caption_args(images, output, tiny_model, "--engine", "vllm", "--dtype", "float32", "--max-tokens", "8",
                        "--no-progress", "-vv")
    run, ready = paused_run(tmp_path, "model.loading", args, VLLM_LOGGING_LEVEL="INFO")
    try:
        wait_until_paused(run, ready)
        ready.unlink()  # go on into vLLM ...
        run.wait_for_line(" INFO ")  # ... until vLLM logs that it is building the engine
        run.process.send_signal(signal.SIGTERM)
        returncode, stderr = run.finish()
    finally:
        run.kill()
    assert returncode == 143, stderr
    assert "caprl: captioning" not in stderr
    assert "Traceback" not in stderr
    assert output_entries(tmp_path) == []
