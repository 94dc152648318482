"""The state folder beside an output: what is committed, who holds the lock, and what a crash leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caprl_cli.errors import ErrorKind, OutputLocked, StateError
from caprl_cli.outputs.rows import caption_row, error_row
from caprl_cli.state.fingerprint import FINGERPRINT_FIELDS, fingerprint_changes, fingerprint_of
from caprl_cli.state.folder import PartsChanged, RunState, state_dir_for
from caprl_cli.settings import CaptionSettings
from caprl_cli.outputs.atomic import temp_path_for
from caprl_cli.outputs.row_writers import rows_to_table

ROOT = Path(__file__).resolve().parents[1]


def _ok(key: str, caption: str = "a caption") -> dict:
    return caption_row(
        key=key, source=f"/data/{key}", model="tiny", caption=caption, finish_reason="stop",
        prompt_tokens=10, output_tokens=5, width=32, height=32,
    )


def _err(key: str, kind: ErrorKind = ErrorKind.DECODE) -> dict:
    return error_row(key=key, source=f"/data/{key}", model="tiny", kind=kind, message="broken: really")


def _write_part(state: RunState, name: str, rows: list[dict]) -> Path:
    path = state.parts_dir / f"part-{name}-000000.parquet"
    pq.write_table(rows_to_table(rows), path)
    return path


@pytest.fixture
def state(tmp_path: Path) -> RunState:
    state = RunState(tmp_path / "out.parquet")
    state.create()
    return state


def _settings(tmp_path: Path, **changes) -> CaptionSettings:
    return CaptionSettings(inputs=("x",), output=tmp_path / "out.parquet", output_format="parquet", **changes)


def _python(snippet: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(snippet)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


_TRY_ACQUIRE = """
import sys
from pathlib import Path
from caprl_cli.errors import OutputLocked
from caprl_cli.state.folder import RunState
try:
    RunState(Path(sys.argv[1])).acquire(wait=False)
except OutputLocked:
    sys.exit(75)
sys.exit(0)
"""


def _acquire_in_other_process(output: Path) -> int:
    """Exit status of another process trying to take the lock: 0 got it, 75 OutputLocked."""
    done = subprocess.run(
        [sys.executable, "-c", _TRY_ACQUIRE, str(output)], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode in (0, 75), done.stderr
    return done.returncode


# -- names and fingerprints -----------------------------------------------------------------------


def test_state_dir_for_is_a_sibling_named_after_the_output(tmp_path: Path) -> None:
    """`out.parquet` keeps its state in `out.parquet.caprl` in the same folder."""
    output = tmp_path / "sub" / "out.parquet"
    assert state_dir_for(output) == tmp_path / "sub" / "out.parquet.caprl"
    assert state_dir_for(Path("captions.jsonl")) == Path("captions.jsonl.caprl")
    assert RunState(output).dir == state_dir_for(output)


def test_fingerprint_holds_exactly_the_caption_deciding_settings(tmp_path: Path) -> None:
    """The fingerprint has every caption-deciding field with its value, and nothing like workers or output."""
    settings = _settings(tmp_path, prompt="Describe.", max_tokens=64, seed=3)
    fingerprint = fingerprint_of(settings)
    assert set(fingerprint) == set(FINGERPRINT_FIELDS)
    assert fingerprint["prompt"] == "Describe." and fingerprint["max_tokens"] == 64 and fingerprint["seed"] == 3
    for name in ("workers", "output", "inputs", "limit", "flush_every", "max_runtime", "batch_size"):
        assert name not in fingerprint
    assert fingerprint_of(_settings(tmp_path, workers=1, limit=5)) == fingerprint_of(_settings(tmp_path, workers=7))


def test_fingerprint_roundtrips_through_the_state_folder(state: RunState, tmp_path: Path) -> None:
    """A stored fingerprint read back equals the current one: a resume with the same settings is not refused."""
    settings = _settings(tmp_path, temperature=0.7, system_prompt="Be brief.")
    assert state.stored_fingerprint() is None
    assert not state.exists()
    state.write_fingerprint(fingerprint_of(settings))
    assert state.exists()
    assert fingerprint_changes(state.stored_fingerprint(), fingerprint_of(settings)) == []


def test_fingerprint_changes_name_the_changed_options(tmp_path: Path) -> None:
    """Each differing setting is reported as its `--option` name; unchanged ones are not."""
    before = fingerprint_of(_settings(tmp_path))
    after = fingerprint_of(_settings(tmp_path, prompt="Other.", max_tokens=7, system_prompt="Sys", top_p=0.5))
    assert sorted(fingerprint_changes(before, after)) == ["--max-tokens", "--prompt", "--system-prompt", "--top-p"]
    assert fingerprint_changes(before, dict(before)) == []


def test_fingerprint_changes_count_a_setting_missing_on_one_side(tmp_path: Path) -> None:
    """A setting only one fingerprint has (an older state folder) counts as changed."""
    current = fingerprint_of(_settings(tmp_path))
    stored = {k: v for k, v in current.items() if k != "max_image_pixels"}
    assert fingerprint_changes(stored, current) == ["--max-image-pixels"]


# -- the lock -------------------------------------------------------------------------------------


def test_lock_is_exclusive_across_processes(state: RunState) -> None:
    """While one run holds the lock another process gets OutputLocked; after release it gets the lock."""
    state.acquire(wait=False)
    try:
        assert _acquire_in_other_process(state.output) == 75
    finally:
        state.release()
    assert _acquire_in_other_process(state.output) == 0


def test_lock_is_exclusive_within_a_process(state: RunState) -> None:
    """A second RunState on the same output, even in this process, is refused until the first releases."""
    state.acquire(wait=False)
    other = RunState(state.output)
    try:
        with pytest.raises(OutputLocked):
            other.acquire(wait=False)
    finally:
        state.release()
    other.acquire(wait=False)
    other.release()


def test_lock_taken_by_another_process_refuses_us(state: RunState) -> None:
    """A lock held by a live process in another interpreter makes our acquire raise OutputLocked."""
    child = _python(
        f"""
        import sys, time
        from pathlib import Path
        from caprl_cli.state.folder import RunState
        held = RunState(Path({str(state.output)!r}))
        held.acquire(wait=False)
        print("held", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked):
            state.acquire(wait=False)
    finally:
        child.kill()
        child.wait(timeout=30)
    state.acquire(wait=False)
    state.release()


@pytest.mark.parametrize("ending", ["os._exit", "SIGKILL"])
def test_lock_dropped_when_holder_dies(state: RunState, ending: str) -> None:
    """A run that dies without cleanup (os._exit, or kill -9) does not leave the output locked."""
    child = _python(
        f"""
        import os, sys
        from pathlib import Path
        from caprl_cli.state.folder import RunState
        held = RunState(Path({str(state.output)!r}))
        held.acquire(wait=False)
        print("held", flush=True)
        sys.stdin.readline()
        os._exit(9)
        """,
        stdin=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked):
            state.acquire(wait=False)
        if ending == "SIGKILL":
            os.kill(child.pid, signal.SIGKILL)
        else:
            child.stdin.write("exit\n")
            child.stdin.flush()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    state.acquire(wait=False)
    state.release()

def test_acquire_creates_the_state_folder(tmp_path: Path) -> None:
    """Acquiring on a fresh output makes its state folder (and lock file); it is not yet a started run."""
    state = RunState(tmp_path / "fresh.jsonl")
    state.acquire(wait=False)
    try:
        assert state.dir.is_dir()
        assert (state.dir / "lock").is_file()
        assert not state.exists()
    finally:
        state.release()


# -- committed parts ------------------------------------------------------------------------------


def test_part_paths_sorted_and_only_committed_parts(state: RunState) -> None:
    """Only `part-*.parquet` files count, oldest (lowest name) first; temporaries and others are ignored."""
    b = _write_part(state, "20240102T000000000000Z-1", [_ok("b.png")])
    a = _write_part(state, "20240101T000000000000Z-1", [_ok("a.png")])
    (state.parts_dir / ".part-20240103T000000000000Z-1-000000.parquet.tmp").write_bytes(b"half")
    (state.parts_dir / "notes.txt").write_text("x")
    (state.parts_dir / "part-x.parquet.unreadable").write_bytes(b"junk")
    assert state.part_paths() == [a, b]


def test_part_paths_without_parts_folder(tmp_path: Path) -> None:
    """An output never run has no parts and an empty committed index."""
    state = RunState(tmp_path / "never.parquet")
    assert state.part_paths() == []
    index = state.committed()
    assert index.parts == [] and index.size == 0
    assert index.keys().to_pylist() == []
    assert index.error_counts() == {}
    assert index.rows_by_part() == []


def test_committed_keeps_latest_row_per_key(state: RunState) -> None:
    """Over several parts each key appears once with its newest status; an old error retried ok is ok."""
    p1 = _write_part(state, "20240101T000000000000Z-1", [_ok("a.png"), _err("b.png"), _err("c.png")])
    p2 = _write_part(state, "20240102T000000000000Z-1", [_ok("d.png"), _ok("b.png")])
    p3 = _write_part(state, "20240103T000000000000Z-1", [_err("a.png", ErrorKind.ENGINE)])
    index = state.committed()
    assert index.parts == [p1, p2, p3]
    assert index.size == 4
    latest = {row["key"]: row for row in index.latest.to_pylist()}
    assert set(latest) == {"a.png", "b.png", "c.png", "d.png"}
    assert latest["b.png"]["status"] == "ok" and latest["b.png"]["part"] == 1 and latest["b.png"]["row"] == 1
    assert latest["a.png"]["status"] == "error" and latest["a.png"]["part"] == 2 and latest["a.png"]["row"] == 0
    assert latest["c.png"]["status"] == "error" and latest["c.png"]["part"] == 0
    assert sorted(index.keys().to_pylist()) == ["a.png", "b.png", "c.png", "d.png"]
    assert sorted(index.keys(ok_only=True).to_pylist()) == ["b.png", "d.png"]


def test_committed_error_counts_by_kind(state: RunState) -> None:
    """Errors are counted by the `<kind>` of their latest row only; superseded errors do not count."""
    _write_part(state, "1", [_err("a", ErrorKind.DECODE), _err("b", ErrorKind.DECODE), _err("c", ErrorKind.TOO_LARGE)])
    _write_part(state, "2", [_ok("a"), _err("d", ErrorKind.ENGINE), _err("c", ErrorKind.READ)])
    assert state.committed().error_counts() == {"decode": 1, "engine": 1, "read": 1}


def test_rows_by_part_point_at_the_latest_rows(state: RunState) -> None:
    """For each part, the sorted row numbers whose key is not superseded later (empty if all are)."""
    _write_part(state, "1", [_ok("a"), _ok("b"), _ok("c"), _ok("d")])
    _write_part(state, "2", [_ok("x"), _ok("a")])
    _write_part(state, "3", [_ok("x"), _ok("c")])
    _write_part(state, "4", [_ok("x")])
    rows = [list(r) for r in state.committed().rows_by_part()]
    assert rows == [[1, 3], [1], [1], [0]]


def test_rows_by_part_row_numbers_read_back_the_right_keys(state: RunState) -> None:
    """Taking the listed rows from each part yields every key exactly once, each with its newest caption."""
    _write_part(state, "1", [_ok("a", "old a"), _ok("b", "b1"), _ok("c", "c1")])
    _write_part(state, "2", [_ok("c", "new c"), _ok("a", "new a")])
    index = state.committed()
    picked = []
    for part, rows in zip(index.parts, index.rows_by_part()):
        picked += pq.read_table(part).take(rows).to_pylist()
    assert {row["key"]: row["caption"] for row in picked} == {"a": "new a", "b": "b1", "c": "new c"}
    assert len(picked) == 3


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_unreadable_part_stops_before_anything_changes(state: RunState) -> None:
    """Garbage under a part name raises StateError naming the file and `caprl repair`; nothing is
    renamed or set aside, so the state is exactly as it was."""
    _write_part(state, "1", [_ok("a"), _ok("b")])
    bad = state.parts_dir / "part-2-000000.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    before = _listing(state.dir)
    with pytest.raises(StateError) as raised:
        state.committed()
    message = str(raised.value)
    assert str(bad) in message and "caprl repair" in message and "\n" not in message
    assert raised.value.exit_code == 1
    assert _listing(state.dir) == before


def test_empty_part_stops_too(state: RunState) -> None:
    """A zero-byte part (a disk that lost the data) is just as unreadable."""
    _write_part(state, "1", [_ok("a")])
    empty = state.parts_dir / "part-3-000000.parquet"
    empty.write_bytes(b"")
    with pytest.raises(StateError, match="part-3-000000.parquet"):
        state.committed()
    assert empty.exists() and state.part_paths()[-1] == empty


def test_truncated_part_stops_the_run(state: RunState) -> None:
    """A real part cut short (torn write) is not trusted and not set aside: the read stops."""
    _write_part(state, "1", [_ok("a")])
    torn = _write_part(state, "2", [_ok(f"k{i}") for i in range(50)])
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match=torn.name):
        state.committed()
    assert torn.read_bytes() == data[: len(data) // 2]


def test_reporting_reader_gets_readable_parts_and_the_damaged_list(state: RunState) -> None:
    """With `damaged`, the index covers the readable parts and the unreadable ones are listed, untouched."""
    good = _write_part(state, "1", [_ok("a"), _ok("b")])
    bad = state.parts_dir / "part-2-000000.parquet"
    bad.write_bytes(b"junk" * 20)
    before = _listing(state.dir)
    damaged: list[Path] = []
    index = state.committed(damaged=damaged)
    assert index.parts == [good] and damaged == [bad]
    assert sorted(index.keys().to_pylist()) == ["a", "b"]
    assert _listing(state.dir) == before


def test_part_removed_between_listing_and_reading_is_parts_changed(state: RunState, monkeypatch) -> None:
    """A part a merging run deletes after it was listed raises PartsChanged (list again), not a damage report."""
    gone = _write_part(state, "1", [_ok("a")])
    listed = state.part_paths()
    gone.unlink()
    monkeypatch.setattr(state, "part_paths", lambda: listed)
    with pytest.raises(PartsChanged):
        state.committed(damaged=[])


# -- stale temporaries, merge bookkeeping, run records --------------------------------------------


def test_remove_stale_temporaries(state: RunState) -> None:
    """Temp files a killed run left (part temps, the output's temp, state json temps) go; parts and others stay."""
    part = _write_part(state, "1", [_ok("a")])
    stale_part = state.parts_dir / ".part-2-000000.parquet.tmp"
    stale_part.write_bytes(b"half a part")
    stale_output = state.output.parent / f".{state.output.name}.4242.tmp"
    stale_output.write_bytes(b"half an output")
    own_temp = temp_path_for(state.output)
    own_temp.write_bytes(b"half an output")
    stale_json = state.dir / ".merged.json.4242.tmp"
    stale_json.write_text("{")
    other_output_temp = state.output.parent / ".other.parquet.4242.tmp"
    other_output_temp.write_bytes(b"someone else's")
    state.output.write_bytes(b"committed output")

    assert state.remove_stale_temporaries() == 4
    assert not stale_part.exists() and not stale_output.exists() and not own_temp.exists()
    assert not stale_json.exists()
    assert part.exists() and state.part_paths() == [part]
    assert other_output_temp.exists()
    assert state.output.read_bytes() == b"committed output"
    assert state.remove_stale_temporaries() == 0


def test_remove_stale_temporaries_without_state(tmp_path: Path) -> None:
    """Cleaning an output that was never run is a no-op, not an error."""
    assert RunState(tmp_path / "never.parquet").remove_stale_temporaries() == 0


def test_remove_stale_temporaries_with_glob_characters_in_output_name(tmp_path: Path) -> None:
    """An output named `out[12].parquet` has its own stale temp removed, and never another output's temp."""
    state = RunState(tmp_path / "out[12].parquet")
    state.create()
    own = tmp_path / ".out[12].parquet.4242.tmp"
    own.write_bytes(b"stale")
    neighbour = tmp_path / ".out1.parquet.4242.tmp"  # a run writing out1.parquet right now
    neighbour.write_bytes(b"in progress")
    state.remove_stale_temporaries()
    assert neighbour.exists()
    assert not own.exists()


def test_remove_stale_temporaries_spares_outputs_sharing_a_name_prefix(tmp_path: Path) -> None:
    """Cleaning `a.jsonl` must not delete the in-progress temp of a run writing `a.jsonl.v2` (--format jsonl)."""
    state = RunState(tmp_path / "a.jsonl")
    state.create()
    neighbour = tmp_path / ".a.jsonl.v2.4242.tmp"  # temp_path_for(tmp_path / "a.jsonl.v2")
    neighbour.write_bytes(b"in progress")
    state.remove_stale_temporaries()
    assert neighbour.exists()


def test_output_is_current_after_record_merge(state: RunState) -> None:
    """The output counts as current only if it exists and was merged from exactly the present parts."""
    p1 = _write_part(state, "1", [_ok("a")])
    assert not state.output_is_current([p1])
    state.output.write_bytes(b"merged")
    assert not state.output_is_current([p1])  # never recorded
    state.record_merge([p1])
    assert json.loads(state.merged_path.read_text(encoding="utf-8")) == {"parts": [p1.name]}
    assert state.output_is_current([p1])
    p2 = _write_part(state, "2", [_ok("b")])
    assert not state.output_is_current([p1, p2])
    state.record_merge([p1, p2])
    assert state.output_is_current(state.part_paths())
    state.output.unlink()
    assert not state.output_is_current([p1, p2])


def test_output_with_no_parts_is_current_once_merged(state: RunState) -> None:
    """An empty run's (empty) output is current after its merge is recorded."""
    state.output.write_bytes(b"")
    state.record_merge([])
    assert state.output_is_current([])


def test_last_run_is_the_last_recorded_whatever_the_clock(state: RunState) -> None:
    """Run records are ordered by a sequence kept in the state, not by their run ids (clock readings):
    the last one recorded is the last run even when its clock read earlier; records named by older
    versions sort before them."""
    assert state.last_run() is None
    (state.runs_dir).mkdir(parents=True, exist_ok=True)
    (state.runs_dir / "20240109T000000000000Z-7.json").write_text('{"images": 0}')  # an older version's
    state.record_run("20240102T000000000000Z-7", {"images": 2})
    state.record_run("20240103T000000000000Z-7", {"images": 3})
    state.record_run("20240101T000000000000Z-7", {"images": 1})
    assert state.last_run() == {"images": 1}


def test_a_later_shard_record_wins_whatever_the_clock(state: RunState) -> None:
    """A shard recorded again (after --retry-errors fixed its errors) keeps its latest record even when
    that run's clock read earlier."""
    state.record_finished_shards("20240105T000000000000Z-7", {"/s.tar": {"samples": 3, "errors": 1}})
    state.record_finished_shards("20240101T000000000000Z-7", {"/s.tar": {"samples": 3, "errors": 0}})
    assert state.finished_shards() == {"/s.tar": {"samples": 3, "errors": 0}}


def test_last_run_skips_a_damaged_record(state: RunState) -> None:
    """A newest record that is not valid JSON is skipped in favour of the previous one."""
    state.record_run("20240101T000000000000Z-7", {"images": 1})
    state.record_run("20240109T000000000000Z-7", {"images": 9})
    newest = max(state.runs_dir.iterdir())
    newest.write_text("{not json")
    assert state.last_run() == {"images": 1}


def test_last_run_without_runs_folder(tmp_path: Path) -> None:
    """No runs folder: no last run."""
    assert RunState(tmp_path / "never.parquet").last_run() is None


def test_start_over_forgets_the_state_but_keeps_the_output(state: RunState, tmp_path: Path) -> None:
    """`start_over` swaps in an empty state folder; the published output stays for the next publish to
    replace, and no trash or half-made folder is left beside it."""
    state.acquire(wait=False)
    try:
        _write_part(state, "1", [_ok("a")])
        state.write_fingerprint(fingerprint_of(_settings(tmp_path)))
        state.record_run("r1", {"images": 1})
        state.output.write_bytes(b"merged")
        state.record_merge(state.part_paths())
        state.start_over({"model": "m"})
        assert state.output.read_bytes() == b"merged"
        assert state.stored_fingerprint() == {"model": "m"}
        assert not state.merged_path.exists()
        assert state.part_paths() == []
        assert state.last_run() is None
        assert state.committed().size == 0
        assert state.parts_dir.is_dir() and state.runs_dir.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.output.name, state.dir.name])
    finally:
        state.release()


def test_start_over_keeps_the_lock(state: RunState) -> None:
    """--overwrite starts over under the lock: the new folder's lock is ours before it gets the real name."""
    state.acquire(wait=False)
    try:
        state.start_over({"model": "m"})
        with pytest.raises(OutputLocked):
            RunState(state.output).acquire(wait=False)
    finally:
        state.release()


def test_leftovers_of_a_killed_start_over_are_removed(state: RunState) -> None:
    """A kill between the two renames of `start_over` leaves hidden `new`/`trash` folders: the next run
    removes them (and nothing else beside the output)."""
    parent = state.dir.parent
    (parent / f".{state.dir.name}.trash-4242" / "parts").mkdir(parents=True)
    (parent / f".{state.dir.name}.new-4243").mkdir()
    (parent / f".{state.dir.name}.trash-note").mkdir()  # not a name start_over gives: kept
    state.acquire(wait=False)
    try:
        state.remove_stale_temporaries()
    finally:
        state.release()
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) == [f".{state.dir.name}.trash-note"]


def test_a_folder_holding_other_files_is_foreign(state: RunState) -> None:
    """Only caprl's own entries (and its temporaries) may be in a state folder."""
    state.acquire(wait=False)
    state.release()
    _write_part(state, "1", [_ok("a")])
    (state.dir / ".fingerprint.json.12.tmp").write_text("{")
    assert state.foreign_entries() == []
    (state.dir / "thesis.tex").write_text("mine")
    assert state.foreign_entries() == ["thesis.tex"]


def test_committed_indexes_many_rows_over_many_parts(state: RunState) -> None:
    """200k committed rows over 20 parts are all indexed (speed is measured in bench/, not here)."""
    for p in range(20):
        rows = [_ok(f"k{p * 10_000 + i:07d}") for i in range(10_000)]
        _write_part(state, f"{p:03d}", rows)
    index = state.committed()
    assert index.size == 200_000
    assert sum(len(r) for r in index.rows_by_part()) == 200_000
