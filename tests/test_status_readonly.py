"""`caprl status` only reads: beside a run that merges and compacts, and over a damaged state."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from caprl_cli.outputs.rows import caption_row
from caprl_cli.settings import CaptionSettings
from caprl_cli.state.fingerprint import fingerprint_of
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import PartWriter
from caprl_cli.status import format_status, output_status

ROOT = Path(__file__).resolve().parents[1]
STATUS_CALLS = 300
CLI_CALLS = 6


def _ok(key: str) -> dict:
    return caption_row(key=key, source=f"/data/{key}", model="tiny", caption="c", finish_reason="stop",
                       prompt_tokens=1, output_tokens=1, width=4, height=4)


def _new_state(output: Path) -> RunState:
    state = RunState(output)
    state.create()
    state.write_fingerprint(fingerprint_of(CaptionSettings(inputs=("x",), output=output, output_format="parquet")))
    return state


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under `folder`: (mode, mtime in ns, content for files)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(folder))] = (info.st_mode, info.st_mtime_ns, path.read_bytes() if path.is_file() else b"")
    return found


def _status_cli(output: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caprl_cli", "status", str(output)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_status_over_a_damaged_part_reports_it_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    """The readable parts are counted, the damaged part is named with `caprl repair`, exit code 1, and
    not one file or folder is created, renamed or touched (no lock file either)."""
    output = tmp_path / "out.parquet"
    state = _new_state(output)
    writer = PartWriter(state.parts_dir, "run", flush_rows=2, flush_seconds=3600)
    for key in ("a", "b", "c", "d"):
        writer.add(_ok(key))
    writer.close()
    damaged = writer.written[-1]
    damaged.write_bytes(b"garbage" * 30)
    before = _snapshot(tmp_path)

    status = output_status(str(output), [])
    assert status["done"] == 2 and status["damaged_parts"] == [str(damaged)]
    assert status["output_current"] is False
    text = format_status(status)
    (line,) = [line for line in text.splitlines() if damaged.name in line]
    assert "caprl repair" in line
    assert "not yet merged" not in text

    result = _status_cli(output)
    assert result.returncode == 1, result.stderr
    assert damaged.name in result.stdout and "caprl repair" in result.stdout
    assert _snapshot(tmp_path) == before
    assert not (state.dir / "lock").exists()


def test_status_of_a_healthy_state_exits_0_and_writes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    state = _new_state(output)
    writer = PartWriter(state.parts_dir, "run", flush_rows=1, flush_seconds=3600)
    writer.add(_ok("a"))
    writer.close()
    before = _snapshot(tmp_path)
    result = _status_cli(output)
    assert result.returncode == 0, result.stderr
    assert output_status(str(output), [])["damaged_parts"] == []
    assert _snapshot(tmp_path) == before


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from caprl_cli.outputs import table
    from caprl_cli.outputs.rows import caption_row
    from caprl_cli.state.folder import RunState
    from caprl_cli.state.parts import PartWriter, new_run_id

    table.COMPACT_ABOVE_PARTS = 2  # every merge compacts and deletes the parts it replaces
    state = RunState(Path(sys.argv[1]))
    stop = Path(sys.argv[2])
    state.acquire(wait=False)
    cycles = 0
    while not stop.exists():
        writer = PartWriter(state.parts_dir, new_run_id(), flush_rows=1, flush_seconds=3600)
        for i in range(3):
            key = f"k{(cycles * 3 + i) % 40}"
            writer.add(caption_row(key=key, source=key, model="m", caption="c", finish_reason="stop",
                                   prompt_tokens=1, output_tokens=1, width=1, height=1))
        writer.close()
        table.merge_output(state, state.committed(), "parquet", {})
        cycles += 1
        if cycles == 1:
            print("ready", flush=True)
    print(cycles, flush=True)
    """
)

# What the writer itself creates: its lock, records, parts, the output and their temporaries.
WRITER_NAMES = re.compile(
    r"out\.parquet|\.out\.parquet\.\d+\.tmp|out\.parquet\.caprl"
    r"|out\.parquet\.caprl/(lock|fingerprint\.json|merged\.json|\.merged\.json\.\d+\.tmp|parts|runs)"
    r"|out\.parquet\.caprl/parts/(part-\d{12}-[^/]+\.parquet|\.part-[^/]+\.tmp)"
)


def test_status_never_fails_or_writes_while_a_run_merges(tmp_path: Path) -> None:
    """A real writer process commits parts and merges with compaction (deleting the parts it replaces)
    as fast as it can; hundreds of status calls at the same time all succeed, and nothing but the
    writer's own files ever appears."""
    output = tmp_path / "out.parquet"
    _new_state(output)
    stop = tmp_path / "stop-writer"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(output), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        failures: list[str] = []
        foreign: set[str] = set()
        for call in range(STATUS_CALLS):
            try:
                status = output_status(str(output), [])
                if not (0 < status["done"] <= 40 and status["damaged_parts"] == []):
                    failures.append(f"call {call}: {status}")
            except Exception as exc:  # what a user would see as a failed `caprl status`
                failures.append(f"call {call}: {type(exc).__name__}: {exc}")
            names = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")} - {stop.name}
            foreign |= {name for name in names if not WRITER_NAMES.fullmatch(name)}
        for _ in range(CLI_CALLS):
            result = _status_cli(output)
            if result.returncode != 0:
                failures.append(f"cli: exit {result.returncode}: {result.stderr.strip()}")
        stop.touch()
        out, err = writer.communicate(timeout=120)
    finally:
        stop.touch()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    assert int(out.split()[-1]) > 1  # the writer kept merging while status ran
    assert failures == []
    assert foreign == set()


def test_status_retries_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state whose parts keep vanishing on every listing ends in a StateError, not an endless loop."""
    from caprl_cli import status as status_module
    from caprl_cli.errors import StateError
    from caprl_cli.state.folder import PartsChanged

    output = tmp_path / "out.parquet"
    _new_state(output)
    attempts = []

    def always_changing(self: RunState, damaged: list | None = None) -> None:
        attempts.append(1)
        raise PartsChanged("gone")

    monkeypatch.setattr(RunState, "committed", always_changing)
    monkeypatch.setattr(status_module.time, "sleep", lambda seconds: None)
    with pytest.raises(StateError):
        output_status(str(output), [])
    assert len(attempts) == status_module.READ_ATTEMPTS
