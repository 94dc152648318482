"""Planning a run: what is skipped, what is retried, what --limit leaves for later, in input order.

Listed samples are planned up front (one vectorised lookup); shards and manifests are planned while
they are read: committed keys inside them are passed over, shards finished by an earlier run are never
opened, `--limit` stops reading as soon as enough samples were handed out, and a shard only counts as
completed once every sample handed out of it has its row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_shard

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.state.plan import Plan, peek, plan_run
from caprl_cli.outputs.rows import PART_SCHEMA, SIGNATURE, Row, caption_row, error_row
from caprl_cli.state.folder import RunState
from caprl_cli.inputs.resolve import InputOptions, InputSet, ShardRef, resolve_inputs
from caprl_cli.outputs.row_writers import rows_to_table


def _sample(key: str) -> Sample:
    return Sample(key=key, source=f"/data/{key}", path=f"/data/{key}")


def _ok(key: str, source: str | None = None, signature: str | None = None) -> Row:
    """A committed caption row as a part holds it; its source is where `_sample` finds the key unless given."""
    row = caption_row(key=key, source=source or f"/data/{key}", model="tiny", caption="c", finish_reason="stop",
                      prompt_tokens=1, output_tokens=1, width=8, height=8)
    return {**row, SIGNATURE: signature}


def _err(key: str, source: str | None = None, signature: str | None = None) -> Row:
    row = error_row(key=key, source=source or f"/data/{key}", model="tiny", kind=ErrorKind.DECODE, message="bad")
    return {**row, SIGNATURE: signature}


@pytest.fixture
def state(tmp_path: Path) -> RunState:
    state = RunState(tmp_path / "out.parquet")
    state.create()
    return state


def _commit(state: RunState, name: str, rows: list[Row]) -> None:
    pq.write_table(rows_to_table(rows, PART_SCHEMA), state.parts_dir / f"part-{name}-000000.parquet")


def _keys(samples: list[Sample]) -> list[str]:
    return [s.key for s in samples]


def _listed(samples: list[Sample]) -> InputSet:
    return InputSet(listed=list(samples))


def _counts(plan: Plan) -> tuple[int, int, int]:
    return plan.inputs, plan.already_done, plan.retrying


def _drain(plan: Plan, report: bool = True) -> list[Sample]:
    """Everything `samples()` hands out; with `report`, each gets a row as a run would give it."""
    handed: list[Sample] = []
    for sample in plan.samples():
        handed.append(sample)
        if report:
            plan.row_done(_row_for(sample))
    return handed


def _row_for(sample: Sample) -> Row:
    if sample.error_kind is not None:
        return error_row(key=sample.key, source=sample.source, model="tiny", kind=sample.error_kind,
                         message=sample.error_message or "")
    return caption_row(key=sample.key, source=sample.source, model="tiny", caption="c", finish_reason="stop",
                       prompt_tokens=1, output_tokens=1, width=8, height=8)


def _shard(path: Path, keys: list[str]) -> ShardRef:
    """A shard of one tiny (undecoded) jpg per key, referenced by its absolute path."""
    write_shard(path, [{"__key__": key, "jpg": f"image {key}".encode()} for key in keys])
    return ShardRef(url=str(path), source=str(path))


SAMPLES = [_sample(k) for k in ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]]


# --- listed samples ------------------------------------------------------------------------------


def test_empty_index_plans_everything(state: RunState) -> None:
    """With nothing committed every input is to do, in the order given."""
    plan = plan_run(_listed(SAMPLES), state.committed())
    assert plan.listed.todo == SAMPLES
    assert _counts(plan) == (6, 0, 0)
    assert _drain(plan) == SAMPLES
    assert plan.handed_out == 6
    assert plan.listed_remaining == 0
    assert not plan.work_remains


def test_no_inputs(state: RunState) -> None:
    """No samples: nothing to do, all counts zero, with or without committed parts."""
    _commit(state, "1", [_ok("a.png")])
    plan = plan_run(InputSet(), state.committed(), retry_errors=True, limit=3)
    assert plan.listed.todo == []
    assert _drain(plan) == []
    assert _counts(plan) == (0, 0, 0)
    assert (plan.handed_out, plan.listed_remaining, plan.unfinished_streams) == (0, 0, 0)
    assert not plan.work_remains
    assert plan.completed_shards() == {}


def test_skips_committed_keys_ok_and_error(state: RunState) -> None:
    """Without --retry-errors every committed key, ok or error, is skipped and counted as done."""
    _commit(state, "1", [_ok("b.png"), _err("d.png")])
    _commit(state, "2", [_ok("f.png")])
    plan = plan_run(_listed(SAMPLES), state.committed())
    assert _keys(plan.listed.todo) == ["a.png", "c.png", "e.png"]
    assert _counts(plan) == (6, 3, 0)
    assert _keys(_drain(plan)) == ["a.png", "c.png", "e.png"]


def test_committed_keys_not_among_inputs_are_ignored(state: RunState) -> None:
    """Keys committed earlier but no longer in the inputs do not count as done."""
    _commit(state, "1", [_ok("gone.png"), _ok("a.png"), _err("also-gone.png")])
    plan = plan_run(_listed(SAMPLES), state.committed(), retry_errors=True)
    assert _keys(plan.listed.todo) == ["b.png", "c.png", "d.png", "e.png", "f.png"]
    assert (plan.already_done, plan.retrying) == (1, 0)


def test_retry_errors_replans_error_keys(state: RunState) -> None:
    """With --retry-errors keys whose latest row is an error are to do again and counted as retrying."""
    _commit(state, "1", [_ok("a.png"), _err("b.png"), _err("c.png")])
    _commit(state, "2", [_ok("c.png"), _err("e.png")])  # c was retried ok already
    plan = plan_run(_listed(SAMPLES), state.committed(), retry_errors=True)
    assert _keys(plan.listed.todo) == ["b.png", "d.png", "e.png", "f.png"]
    assert _counts(plan) == (6, 2, 2)


def test_key_ok_then_error_counts_as_error(state: RunState) -> None:
    """A key whose newest row is an error is retried even if an older part has it ok."""
    _commit(state, "1", [_ok("a.png")])
    _commit(state, "2", [_err("a.png")])
    index = state.committed()
    assert _keys(plan_run(_listed(SAMPLES[:1]), index, retry_errors=True).listed.todo) == ["a.png"]
    assert plan_run(_listed(SAMPLES[:1]), index, retry_errors=False).listed.todo == []


def test_limit_cuts_work_and_counts_the_rest(state: RunState) -> None:
    """--limit hands out the first N pending samples; listed_remaining counts the pending ones left."""
    _commit(state, "1", [_ok("a.png"), _err("c.png")])
    plan = plan_run(_listed(SAMPLES), state.committed(), retry_errors=True, limit=2)
    assert _keys(_drain(plan)) == ["b.png", "c.png"]
    assert _counts(plan) == (6, 1, 1)
    assert plan.listed_remaining == 3
    assert plan.work_remains


@pytest.mark.parametrize(("limit", "todo", "rest"), [(0, 0, 4), (1, 1, 3), (4, 4, 0), (10, 4, 0)])
def test_limit_bounds(state: RunState, limit: int, todo: int, rest: int) -> None:
    """--limit 0 hands out nothing; a limit at or above the pending count hands out all of it."""
    _commit(state, "1", [_ok("a.png"), _ok("b.png")])
    plan = plan_run(_listed(SAMPLES), state.committed(), limit=limit)
    handed = _drain(plan)
    assert len(handed) == plan.handed_out == todo
    assert plan.listed_remaining == rest
    assert plan.work_remains == (rest > 0)
    assert len(handed) + plan.listed_remaining + plan.already_done == plan.inputs


def test_work_follows_sample_order(state: RunState) -> None:
    """Work keeps the samples' order (not key order, not committed order) and the very objects."""
    samples = [_sample(k) for k in ["z.png", "m.png", "a.png", "q/b.png", "c.png"]]
    _commit(state, "1", [_ok("c.png"), _ok("m.png")])
    plan = plan_run(_listed(samples), state.committed())
    assert _keys(plan.listed.todo) == ["z.png", "a.png", "q/b.png"]
    handed = _drain(plan)
    assert _keys(handed) == ["z.png", "a.png", "q/b.png"]
    assert handed[0] is samples[0]


def test_planning_many_inputs(state: RunState) -> None:
    """200k inputs against 100k committed keys plan correctly (speed is measured in bench/, not here)."""
    samples = [_sample(f"img_{i:06d}.png") for i in range(200_000)]
    _commit(state, "1", [_ok(f"img_{i:06d}.png") for i in range(0, 200_000, 2)])
    index = state.committed()
    plan = plan_run(_listed(samples), index)
    assert _counts(plan) == (200_000, 100_000, 0)
    assert len(plan.listed.todo) == 100_000
    assert plan.listed.todo[0].key == "img_000001.png"


def test_listed_remaining_while_rows_come_back(state: RunState) -> None:
    """listed_remaining counts samples handed out without a row plus those not handed out yet."""
    plan = plan_run(_listed(SAMPLES[:4]), state.committed(), limit=3)
    assert plan.listed_remaining == 4
    handed = list(plan.samples())
    assert len(handed) == 3
    assert plan.listed_remaining == 4  # three in flight, one beyond the limit
    plan.row_done(_row_for(handed[0]))
    assert plan.listed_remaining == 3
    plan.row_done(_row_for(handed[1]))
    plan.row_done(_row_for(handed[1]))  # a second row for one key changes nothing
    plan.row_done(_ok("never-handed-out.png"))
    assert plan.listed_remaining == 2
    plan.row_done(_row_for(handed[2]))
    assert plan.listed_remaining == 1
    assert plan.work_remains


def test_peek_keeps_the_first_sample(state: RunState) -> None:
    """peek tells whether there is work without losing the sample it looked at."""
    plan = plan_run(_listed(SAMPLES[:2]), state.committed())
    first, rest = peek(plan.samples())
    assert first is SAMPLES[0]
    assert list(rest) == SAMPLES[:2]
    nothing, empty = peek(iter(()))
    assert nothing is None and list(empty) == []


# --- shards --------------------------------------------------------------------------------------


def test_shards_hand_out_every_sample_when_nothing_is_committed(state: RunState, tmp_path: Path) -> None:
    """Listed samples first, then each shard's samples in shard order; counters grow while reading."""
    a = _shard(tmp_path / "a.tar", ["a0", "a1", "a2"])
    b = _shard(tmp_path / "b.tar", ["b0", "b1"])
    plan = plan_run(InputSet(listed=[_sample("x.png")], shards=[a, b]), state.committed())
    assert _counts(plan) == (1, 0, 0)  # shards are not opened while planning
    handed = _drain(plan)
    assert _keys(handed) == ["x.png", "a0", "a1", "a2", "b0", "b1"]
    assert [s.source for s in handed[1:]] == [a.source] * 3 + [b.source] * 2
    assert handed[1].data == b"image a0" and handed[1].ext == "jpg"
    assert _counts(plan) == (6, 0, 0)
    assert plan.handed_out == 6
    assert plan.unfinished_streams == 0
    assert not plan.work_remains
    assert plan.completed_shards() == {a.source: {"samples": 3, "errors": 0}, b.source: {"samples": 2, "errors": 0}}


def test_committed_keys_are_skipped_inside_a_shard_read_again(state: RunState, tmp_path: Path) -> None:
    """A shard read again after a crash hands out only what the parts do not hold yet."""
    shard = _shard(tmp_path / "s.tar", ["s0", "s1", "s2", "s3"])
    _commit(state, "1", [_ok("s1", shard.source), _err("s2", shard.source)])
    plan = plan_run(InputSet(shards=[shard]), state.committed())
    assert _keys(_drain(plan)) == ["s0", "s3"]
    assert _counts(plan) == (4, 2, 0)
    # the skipped error counts toward the shard's errors
    assert plan.completed_shards() == {shard.source: {"samples": 4, "errors": 1}}


def test_retry_errors_inside_a_shard(state: RunState, tmp_path: Path) -> None:
    """With --retry-errors a committed error key inside a shard is handed out again."""
    shard = _shard(tmp_path / "s.tar", ["s0", "s1", "s2"])
    _commit(state, "1", [_ok("s0", shard.source), _err("s1", shard.source)])
    plan = plan_run(InputSet(shards=[shard]), state.committed(), retry_errors=True)
    assert _keys(_drain(plan)) == ["s1", "s2"]
    assert _counts(plan) == (3, 1, 1)


def test_finished_shard_is_not_opened(state: RunState, tmp_path: Path) -> None:
    """A shard an earlier run finished is skipped unopened, its sample count taken from the record."""
    done = ShardRef(url=str(tmp_path / "missing.tar"), source="/corpus/done.tar")  # opening it would fail
    other = _shard(tmp_path / "other.tar", ["o0", "o1"])
    plan = plan_run(
        InputSet(shards=[done, other]),
        state.committed(),
        finished_shards={done.source: {"samples": 5, "errors": 1}},
    )
    assert _counts(plan) == (5, 5, 0)
    handed = _drain(plan)
    assert _keys(handed) == ["o0", "o1"]
    assert all(s.error_kind is None for s in handed)
    assert _counts(plan) == (7, 5, 0)
    assert done.source not in plan.completed_shards()
    assert plan.unfinished_streams == 0
    assert not plan.work_remains


def test_retry_errors_reads_finished_shards_again(state: RunState, tmp_path: Path) -> None:
    """With --retry-errors a finished shard is opened again and only its error keys are handed out."""
    shard = _shard(tmp_path / "s.tar", ["s0", "s1", "s2", "s3"])
    source = shard.source
    _commit(state, "1", [_ok("s0", source), _err("s1", source), _ok("s2", source), _err("s3", source)])
    finished = {shard.source: {"samples": 4, "errors": 2}}
    plan = plan_run(InputSet(shards=[shard]), state.committed(), retry_errors=True, finished_shards=finished)
    assert _counts(plan) == (0, 0, 0)  # the record is not counted: the shard is read instead
    assert _keys(_drain(plan)) == ["s1", "s3"]
    assert _counts(plan) == (4, 2, 2)
    assert plan.completed_shards() == {shard.source: {"samples": 4, "errors": 0}}


def test_limit_stops_reading_early(state: RunState, tmp_path: Path) -> None:
    """--limit stops inside the first shard: the rest of it is not read and the next is not opened."""
    first = _shard(tmp_path / "first.tar", ["f0", "f1", "f2"])
    later = _shard(tmp_path / "later.tar", ["l0", "l1"])
    plan = plan_run(InputSet(shards=[first, later]), state.committed(), limit=2)
    assert _keys(_drain(plan)) == ["f0", "f1"]
    assert plan.inputs == 2  # f2 and the later shard were never read
    assert plan.tallies[later.source].samples == 0
    assert plan.unfinished_streams == 2
    assert plan.work_remains
    assert plan.completed_shards() == {}


def test_limit_does_not_open_a_later_missing_shard(state: RunState, tmp_path: Path) -> None:
    """A shard past the limit is never opened: a missing one yields no error sample."""
    first = _shard(tmp_path / "first.tar", ["f0", "f1", "f2"])
    missing = ShardRef(url=str(tmp_path / "missing.tar"), source=str(tmp_path / "missing.tar"))
    plan = plan_run(InputSet(shards=[first, missing]), state.committed(), limit=3)
    handed = _drain(plan)
    assert _keys(handed) == ["f0", "f1", "f2"]  # no `missing.tar@0` error sample
    assert plan.inputs == 3
    assert plan.tallies[missing.source].samples == 0
    assert plan.unfinished_streams > 0
    assert plan.work_remains


def test_limit_counts_skipped_samples_but_hands_out_only_pending(state: RunState, tmp_path: Path) -> None:
    """Committed samples passed over do not use up --limit; a shard fully passed over is finished."""
    first = _shard(tmp_path / "first.tar", ["f0", "f1"])
    second = _shard(tmp_path / "second.tar", ["g0", "g1", "g2"])
    _commit(state, "1", [_ok("f0", first.source), _ok("f1", first.source), _ok("g0", second.source)])
    plan = plan_run(InputSet(shards=[first, second]), state.committed(), limit=1)
    assert _keys(_drain(plan)) == ["g1"]
    assert _counts(plan) == (4, 3, 0)
    assert plan.completed_shards() == {first.source: {"samples": 2, "errors": 0}}
    assert plan.unfinished_streams == 1


def test_completed_shards_waits_for_every_row(state: RunState, tmp_path: Path) -> None:
    """A shard is completed only once every sample handed out of it has its row."""
    a = _shard(tmp_path / "a.tar", ["a0", "a1"])
    b = _shard(tmp_path / "b.tar", ["b0"])
    plan = plan_run(InputSet(shards=[a, b]), state.committed())
    handed = _drain(plan, report=False)
    assert _keys(handed) == ["a0", "a1", "b0"]
    assert plan.completed_shards() == {}
    assert plan.unfinished_streams == 2
    plan.row_done(_row_for(handed[0]))
    assert plan.completed_shards() == {}
    plan.row_done(_row_for(handed[1]))
    assert plan.completed_shards() == {a.source: {"samples": 2, "errors": 0}}
    assert plan.unfinished_streams == 1 and plan.work_remains
    plan.row_done(error_row(key="b0", source=b.source, model="tiny", kind=ErrorKind.DECODE, message="bad"))
    assert plan.completed_shards() == {a.source: {"samples": 2, "errors": 0}, b.source: {"samples": 1, "errors": 1}}
    assert plan.unfinished_streams == 0
    assert not plan.work_remains


def test_missing_shard_is_one_error_sample(state: RunState, tmp_path: Path) -> None:
    """A shard that cannot be opened yields exactly one SHARD error sample keyed `<source>@0`."""
    missing = ShardRef(url=str(tmp_path / "gone.tar"), source=str(tmp_path / "gone.tar"))
    plan = plan_run(InputSet(shards=[missing]), state.committed())
    handed = _drain(plan)
    assert len(handed) == 1
    (sample,) = handed
    assert sample.error_kind == ErrorKind.SHARD
    assert sample.error_kind.value == "shard"
    assert sample.key.endswith("@0")
    assert sample.key == f"{missing.source}@0"
    assert sample.source == missing.source
    assert sample.data is None and sample.path is None
    assert _counts(plan) == (1, 0, 0)


def test_shards_from_resolve_inputs(state: RunState, tmp_path: Path) -> None:
    """A folder of images and shards plans its images first, then its shards' samples."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "img.png").write_bytes(b"png")
    write_shard(folder / "sub" / "s.tar", [{"__key__": "k0", "jpg": b"0"}, {"__key__": "k1", "jpg": b"1"}])
    inputs = resolve_inputs([str(folder)])
    _commit(state, "1", [_ok("k0", inputs.shards[0].source)])
    plan = plan_run(inputs, state.committed())
    assert _keys(_drain(plan)) == ["img.png", "k1"]
    assert _counts(plan) == (3, 1, 0)
    assert list(plan.completed_shards()) == [str((folder / "sub" / "s.tar").resolve())]


# --- manifests -----------------------------------------------------------------------------------


def _manifest(path: Path, images: list[str]) -> str:
    path.write_text("".join(json.dumps({"image": image, "n": i}) + "\n" for i, image in enumerate(images)))
    return str(path)


def test_manifest_is_streamed_and_duplicates_handed_out_once(state: RunState, tmp_path: Path) -> None:
    """A manifest's records are handed out in order, an image named twice only once."""
    manifest = _manifest(tmp_path / "m.jsonl", ["a.jpg", "b.jpg", "a.jpg", "c.jpg"])
    plan = plan_run(InputSet(manifests=[manifest]), state.committed())
    assert _counts(plan) == (0, 0, 0)
    handed = _drain(plan)
    assert _keys(handed) == ["a.jpg", "b.jpg", "c.jpg"]
    assert handed[0].path == str(tmp_path / "a.jpg")
    assert plan.handed_out == 3
    assert plan.inputs == 3
    assert plan.unfinished_streams == 0
    assert not plan.work_remains
    assert plan.completed_shards() == {}  # manifests are never recorded as finished shards


def test_manifest_skips_committed_keys_and_follows_options(state: RunState, tmp_path: Path) -> None:
    """Committed manifest keys are skipped; image root and meta come from the input options."""
    manifest = _manifest(tmp_path / "m.jsonl", ["a.jpg", "b.jpg", "c.jpg"])
    _commit(state, "1", [_ok("b.jpg", "/images/b.jpg")])
    options = InputOptions(image_root="/images", keep_meta=False)
    plan = plan_run(InputSet(manifests=[manifest]), state.committed(), options=options)
    handed = _drain(plan)
    assert _keys(handed) == ["a.jpg", "c.jpg"]
    assert handed[0].path == "/images/a.jpg"
    assert all(s.meta is None for s in handed)
    assert _counts(plan) == (3, 1, 0)


def test_order_listed_then_shards_then_manifests(state: RunState, tmp_path: Path) -> None:
    """Listed samples come first, then shards, then manifests; the limit counts across all of them."""
    shard = _shard(tmp_path / "s.tar", ["s0", "s1"])
    manifest = _manifest(tmp_path / "m.jsonl", ["m0.jpg", "m1.jpg"])
    inputs = InputSet(listed=[_sample("x.png")], shards=[shard], manifests=[manifest])
    assert _keys(_drain(plan_run(inputs, state.committed()))) == ["x.png", "s0", "s1", "m0.jpg", "m1.jpg"]
    limited = plan_run(inputs, state.committed(), limit=4)
    assert _keys(_drain(limited)) == ["x.png", "s0", "s1", "m0.jpg"]
    assert limited.unfinished_streams == 1  # the manifest was not read to the end
    assert limited.completed_shards() == {shard.source: {"samples": 2, "errors": 0}}


# --- the same stream named twice ----------------------------------------------------------------


def test_shard_named_twice_is_read_once(state: RunState, tmp_path: Path) -> None:
    """Naming one shard twice captions its samples once, as naming one image twice does."""
    folder = tmp_path / "data"
    shard = write_shard(folder / "s.tar", [{"__key__": "k0", "jpg": b"0"}, {"__key__": "k1", "jpg": b"1"}])
    plan = plan_run(resolve_inputs([str(folder), str(shard)]), state.committed())
    assert _keys(_drain(plan)) == ["k0", "k1"]
    assert plan.completed_shards() == {str(shard.resolve()): {"samples": 2, "errors": 0}}
    assert not plan.work_remains


def test_manifest_named_twice_is_read_once(state: RunState, tmp_path: Path) -> None:
    """Naming one manifest twice captions its images once."""
    manifest = _manifest(tmp_path / "m.jsonl", ["a.jpg", "b.jpg"])
    plan = plan_run(resolve_inputs([manifest, manifest]), state.committed())
    assert _keys(_drain(plan)) == ["a.jpg", "b.jpg"]
    assert not plan.work_remains


def test_a_key_in_two_shards_is_captioned_once(state: RunState, tmp_path: Path) -> None:
    """The same key in another shard becomes an error row of its own instead of replacing the first
    row; both shards still complete."""
    first = _shard(tmp_path / "a.tar", ["k0", "k1"])
    second = _shard(tmp_path / "b.tar", ["k1", "k2"])
    plan = plan_run(InputSet(shards=[first, second]), state.committed())
    handed = list(plan.samples())
    assert [sample.key for sample in handed] == ["k0", "k1", f"k1@{second.source}", "k2"]
    clash = handed[2]
    assert clash.error_kind == ErrorKind.SHARD and clash.source == second.source
    for sample in handed:
        plan.row_done(_err(sample.key) if sample.error_kind else _ok(sample.key))
    assert set(plan.completed_shards()) == {first.source, second.source}


# --- identity: the same image, a changed one, a different one ------------------------------------


def _signed(key: str, source: str, signature: str | None) -> Sample:
    return Sample(key=key, source=source, path=source, signature=signature)


def test_moved_folder_is_not_captioned_again(state: RunState) -> None:
    """The same files reached through a renamed folder (other sources, equal signatures) are done."""
    _commit(state, "1", [_ok("a.png", "/old/a.png", "10:1"), _err("b.png", "/old/b.png", "20:2")])
    plan = plan_run(_listed([_signed("a.png", "/new/a.png", "10:1"), _signed("b.png", "/new/b.png", "20:2")]),
                    state.committed())
    assert _drain(plan) == []
    assert (_counts(plan), plan.changed, plan.conflicts) == ((2, 2, 0), 0, 0)


def test_a_file_changed_in_place_is_captioned_again(state: RunState) -> None:
    """Same source, other signature: the file was written again; it is captioned again (its new row
    replaces the old) and counted as changed."""
    _commit(state, "1", [_ok("a.png", "/in/a.png", "10:1"), _ok("b.png", "/in/b.png", "20:2")])
    changed = _signed("a.png", "/in/a.png", "11:9")
    plan = plan_run(_listed([changed, _signed("b.png", "/in/b.png", "20:2")]), state.committed())
    assert _drain(plan) == [changed]
    assert (_counts(plan), plan.changed, plan.conflicts) == ((2, 1, 0), 1, 0)


def test_a_different_image_under_a_committed_key_is_a_conflict_row_once(state: RunState) -> None:
    """Another source with another image under a committed key is never skipped silently: it becomes a
    conflict error sample of its own key naming both sources; once committed, later runs (with
    --retry-errors too) find it done instead of writing it again."""
    _commit(state, "1", [_ok("IMG_0001.jpg", "/incoming/day1/IMG_0001.jpg", "100:1")])
    day2 = _signed("IMG_0001.jpg", "/incoming/day2/IMG_0001.jpg", "120:2")
    plan = plan_run(_listed([day2]), state.committed())
    (conflict,) = _drain(plan)
    assert conflict.error_kind is ErrorKind.CONFLICT
    assert conflict.key.startswith("IMG_0001.jpg@") and conflict.source == day2.source
    assert "/incoming/day1/IMG_0001.jpg" in (conflict.error_message or "")
    assert "/incoming/day2/IMG_0001.jpg" in (conflict.error_message or "")
    assert (_counts(plan), plan.conflicts) == ((1, 0, 0), 1)
    _commit(state, "2", [{**_row_for(conflict), SIGNATURE: conflict.signature}])
    for retry in (False, True):
        again = plan_run(_listed([day2]), state.committed(), retry_errors=retry)
        assert _drain(again) == []
        assert (_counts(again), again.conflicts) == ((1, 1, 0), 0)


def test_unknown_signatures_same_source_is_done_other_source_conflicts(state: RunState) -> None:
    """A URL signed again (same redacted source, no signature) is done; the same key from another
    source with nothing to compare is a conflict, not a guess."""
    url = "https://h/img.jpg?id=1&X-Amz-Signature=REDACTED"
    _commit(state, "1", [_ok("https://h/img.jpg?id=1", url), _ok("x.png", "/a/x.png")])
    plan = plan_run(_listed([_signed("https://h/img.jpg?id=1", url, None), _signed("x.png", "/b/x.png", None)]),
                    state.committed())
    handed = _drain(plan)
    assert [sample.error_kind for sample in handed] == [ErrorKind.CONFLICT]
    assert handed[0].key.startswith("x.png@")
    assert (_counts(plan), plan.conflicts) == ((2, 1, 0), 1)


def test_parts_without_signatures_are_read(state: RunState) -> None:
    """Parts written before signatures existed (no such column) still plan: same source is done."""
    pq.write_table(rows_to_table([_ok("a.png")]), state.parts_dir / "part-0-000000.parquet")
    assert "signature" not in pq.read_schema(state.parts_dir / "part-0-000000.parquet").names
    plan = plan_run(_listed([_signed("a.png", "/data/a.png", "10:1")]), state.committed())
    assert _drain(plan) == [] and _counts(plan) == (1, 1, 0)


def test_streamed_identity_moved_shard_and_conflicting_shard(state: RunState, tmp_path: Path) -> None:
    """Inside shards the same rules hold: a moved shard's samples (same bytes, other source) are done,
    a committed key carried by another shard with other bytes becomes a conflict row, written once."""
    from caprl_cli.inputs.sample import content_signature

    moved = _shard(tmp_path / "moved" / "a.tar", ["k0", "k1"])
    other = ShardRef(url=str(tmp_path / "b.tar"), source=str(tmp_path / "b.tar"))
    write_shard(tmp_path / "b.tar", [{"__key__": "k1", "jpg": b"another image"}, {"__key__": "k2", "jpg": b"2"}])
    _commit(state, "1", [_ok(k, "/old/a.tar", content_signature(f"image {k}".encode())) for k in ["k0", "k1"]])
    plan = plan_run(InputSet(shards=[moved]), state.committed())
    assert _drain(plan) == []
    assert (plan.inputs, plan.already_done, plan.conflicts) == (2, 2, 0)
    plan = plan_run(InputSet(shards=[other]), state.committed())
    handed = _drain(plan)
    assert [s.key.split("@")[0] for s in handed] == ["k1", "k2"]
    assert handed[0].error_kind is ErrorKind.CONFLICT and handed[0].key != "k1"
    assert (plan.inputs, plan.already_done, plan.conflicts) == (2, 0, 1)
    _commit(state, "2", [{**_row_for(s), SIGNATURE: s.signature} for s in handed])
    again = plan_run(InputSet(shards=[other]), state.committed(), retry_errors=True)
    assert _drain(again) == []
    assert (again.inputs, again.already_done, again.conflicts) == (2, 2, 0)
