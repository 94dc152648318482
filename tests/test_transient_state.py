"""Transient failures in the state and the plan, without an engine: `unavailable` rows are not done,
placeholder rows are withdrawn once their stream reads cleanly, a shard cut short by a broken
transfer is not recorded finished, `--retry-errors` reopens only shards with error rows, and a
manifest that fails part-way ends in an error row instead of a usage error."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from flaky_http import flaky_server  # noqa: F401 - a fixture

from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.inputs.manifests import check_manifest, manifest_samples
from caprl_cli.inputs.resolve import InputOptions, InputSet, resolve_inputs
from caprl_cli.inputs.sample import Sample
from caprl_cli.outputs.rows import PART_SCHEMA, Row, caption_row, error_row, withdrawal_row
from caprl_cli.outputs.table import merge_output
from caprl_cli.settings import CaptionSettings, validate_settings
from caprl_cli.state.folder import RunState
from caprl_cli.state.parts import PartWriter
from caprl_cli.state.plan import plan_run


@pytest.fixture
def state(tmp_path: Path) -> RunState:
    state = RunState(tmp_path / "out.parquet")
    state.create()
    return state


def commit(state: RunState, run_id: str, rows: list[Row]) -> None:
    parts = PartWriter(state.parts_dir, run_id, schema=PART_SCHEMA)
    for row in rows:
        parts.add(row)
    parts.close()


def ok(key: str, source: str) -> Row:
    return caption_row(key=key, source=source, model="m", caption="c", finish_reason="stop", prompt_tokens=1,
                       output_tokens=1, width=8, height=8)


def failed(key: str, source: str, kind: ErrorKind) -> Row:
    return error_row(key=key, source=source, model="m", kind=kind, message="failed")


def drain(plan) -> list[Sample]:
    handed = []
    for sample in plan.samples():
        handed.append(sample)
        kind = sample.error_kind
        plan.row_done(failed(sample.key, sample.source, kind) if kind else ok(sample.key, sample.source))
    return handed


def image_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8not-decoded-here")
    return path


def test_unavailable_listed_images_are_planned_again(state: RunState, tmp_path: Path) -> None:
    paths = {name: image_file(tmp_path / "in", name) for name in ("a.jpg", "b.jpg", "c.jpg")}
    found = resolve_inputs([str(tmp_path / "in")], InputOptions())
    by_key = {sample.key: sample for sample in found.listed}
    commit(state, "r1", [
        failed("a.jpg", by_key["a.jpg"].source, ErrorKind.UNAVAILABLE),
        failed("b.jpg", by_key["b.jpg"].source, ErrorKind.DECODE),
        ok("c.jpg", by_key["c.jpg"].source),
    ])
    assert set(paths) == set(by_key)
    plan = plan_run(found, state.committed())
    assert [sample.key for sample in plan.samples()] == ["a.jpg"]  # decode is final, unavailable is not


def test_unavailable_streamed_images_are_read_again(state: RunState, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"url": f"http://127.0.0.1:9/{n}.jpg"}) + "\n" for n in "abc"))
    samples = {s.key: s for s in manifest_samples(str(manifest))}
    commit(state, "r1", [
        failed("http://127.0.0.1:9/a.jpg", samples["http://127.0.0.1:9/a.jpg"].source, ErrorKind.UNAVAILABLE),
        failed("http://127.0.0.1:9/b.jpg", samples["http://127.0.0.1:9/b.jpg"].source, ErrorKind.READ),
        ok("http://127.0.0.1:9/c.jpg", samples["http://127.0.0.1:9/c.jpg"].source),
    ])
    plan = plan_run(InputSet(manifests=[str(manifest)]), state.committed())
    assert [sample.key for sample in plan.samples()] == ["http://127.0.0.1:9/a.jpg"]


def test_withdrawn_key_is_absent_from_index_counts_and_merge(state: RunState, tmp_path: Path) -> None:
    commit(state, "r1", [failed("s.tar@0", "s.tar", ErrorKind.UNAVAILABLE), ok("k", "s.tar")])
    assert state.committed().error_counts() == {"unavailable": 1}
    commit(state, "r2", [withdrawal_row(key="s.tar@0", source="s.tar", model="m")])
    index = state.committed()
    assert index.size == 1 and index.error_counts() == {} and index.placeholders() == {}
    merge_output(state, index, "parquet", {})
    table = pq.read_table(state.output)
    assert table["key"].to_pylist() == ["k"] and "withdrawn" not in table["status"].to_pylist()


def test_clean_read_withdraws_placeholders_and_finishes_the_shard(state: RunState, tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "k0", "jpg": b"x"}, {"__key__": "k1", "jpg": b"y"}])
    found = resolve_inputs([str(shard)], InputOptions())
    source = found.shards[0].source
    commit(state, "r1", [
        failed(f"{source}@0", source, ErrorKind.UNAVAILABLE),
        failed(f"{source}@512", source, ErrorKind.UNAVAILABLE),
        failed("other.tar@0", "other.tar", ErrorKind.UNAVAILABLE),
    ])
    plan = plan_run(found, state.committed())
    assert [sample.key for sample in drain(plan)] == ["k0", "k1"]
    assert sorted(plan.withdrawn) == [(f"{source}@0", source), (f"{source}@512", source)]
    assert source in plan.completed_shards() and not plan.work_remains


def test_plan_stopped_early_withdraws_nothing(state: RunState, tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "k0", "jpg": b"x"}, {"__key__": "k1", "jpg": b"y"}])
    found = resolve_inputs([str(shard)], InputOptions())
    source = found.shards[0].source
    commit(state, "r1", [failed(f"{source}@0", source, ErrorKind.UNAVAILABLE)])
    plan = plan_run(found, state.committed(), limit=1)
    drain(plan)
    assert plan.withdrawn == [] and source not in plan.completed_shards()


def test_shard_cut_short_by_a_broken_transfer_is_unavailable_and_not_finished(
    flaky_server, state: RunState
) -> None:
    flaky, folder, base = flaky_server
    random_bytes = random.Random(0).randbytes
    write_shard(folder / "s.tar", [{"__key__": f"k{i}", "jpg": random_bytes(4000)} for i in range(6)])
    flaky.cut["/s.tar"] = 14_000  # a few samples in
    found = resolve_inputs([f"{base}/s.tar"], InputOptions())
    plan = plan_run(found, state.committed(), retries=0)
    handed = drain(plan)
    kinds = [(sample.key.startswith(f"{base}/s.tar@"), sample.error_kind) for sample in handed]
    # the body broke off (aiohttp's ClientPayloadError): a placeholder where reading stopped, never a crash
    assert kinds[-1] == (True, ErrorKind.UNAVAILABLE) and len(handed) < 7
    assert all(kind is None for _, kind in kinds[:-1])
    assert plan.completed_shards() == {} and plan.work_remains


def test_open_that_keeps_failing_is_unavailable_and_not_finished(flaky_server, state: RunState) -> None:
    flaky, folder, base = flaky_server
    write_shard(folder / "s.tar", [{"__key__": "k0", "jpg": b"x"}])
    flaky.failing.add("/s.tar")
    found = resolve_inputs([f"{base}/s.tar"], InputOptions())
    plan = plan_run(found, state.committed(), retries=0)
    (sample,) = drain(plan)
    assert sample.key == f"{base}/s.tar@0" and sample.error_kind is ErrorKind.UNAVAILABLE
    assert plan.completed_shards() == {}


def test_retry_errors_reopens_only_shards_with_error_rows(state: RunState, tmp_path: Path) -> None:
    clean = write_shard(tmp_path / "clean.tar", [{"__key__": "c0", "jpg": b"x"}])
    broken = write_shard(tmp_path / "broken.tar", [{"__key__": "b0", "txt": "no image"}])
    found = resolve_inputs([str(clean), str(broken)], InputOptions())
    finished = {shard.source: {"samples": 1, "errors": int(shard.source == str(broken))} for shard in found.shards}
    plan = plan_run(found, state.committed(), retry_errors=True, finished_shards=finished)
    assert [sample.key for sample in drain(plan)] == ["b0"]
    assert plan.inputs == 2 and plan.already_done == 1


def test_manifest_failing_midway_keeps_its_records_and_ends_in_an_error_sample(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"image": f"img/{i:06d}.jpg", "pad": f"{random.Random(i).random()}"}) + "\n"
                    for i in range(60_000))
    packed = gzip.compress(lines.encode())
    manifest = tmp_path / "m.jsonl.gz"
    manifest.write_bytes(packed[: len(packed) * 2 // 3] + b"\x00" * 64)  # corrupt from two thirds on
    samples = list(manifest_samples(str(manifest)))
    good, last = samples[:-1], samples[-1]
    assert len(good) > 1000 and all(sample.error_kind is None for sample in good)
    assert last.key == f"m.jsonl.gz@{len(good) + 1}" and last.error_kind is ErrorKind.MANIFEST


def test_manifest_over_http_cut_short_or_unavailable(flaky_server) -> None:
    flaky, folder, base = flaky_server
    lines = "".join(json.dumps({"image": f"img/{i:06d}.jpg"}) + "\n" for i in range(3000))
    (folder / "m.jsonl").write_text(lines)
    flaky.cut["/m.jsonl"] = len(lines) // 2
    samples = list(manifest_samples(f"{base}/m.jsonl", retries=0))
    assert samples[-1].error_kind is ErrorKind.UNAVAILABLE and samples[-1].key.startswith("m.jsonl@")
    assert len(samples) - 1 < 3000 and all(sample.error_kind is None for sample in samples[:-1])
    assert samples[-1].key == f"m.jsonl@{len(samples) if len(samples) > 1 else 0}"
    del flaky.cut["/m.jsonl"]
    flaky.failing.add("/m.jsonl")
    (only,) = manifest_samples(f"{base}/m.jsonl", retries=1)
    assert only.key == "m.jsonl@0" and only.error_kind is ErrorKind.UNAVAILABLE
    flaky.failing.clear()
    with pytest.raises(UsageError, match="gone.jsonl"):  # a 404 is a manifest that does not exist
        check_manifest(f"{base}/gone.jsonl", retries=1)


def test_manifest_placeholder_is_withdrawn_after_a_clean_read(state: RunState, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.jpg"}) + "\n")
    commit(state, "r1", [failed("m.jsonl@0", str(manifest), ErrorKind.UNAVAILABLE)])
    plan = plan_run(InputSet(manifests=[str(manifest)]), state.committed())
    assert [sample.key for sample in drain(plan)] == ["a.jpg"]
    assert plan.withdrawn == [("m.jsonl@0", str(manifest))]


def test_negative_retries_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    settings = CaptionSettings(inputs=("x",), output=tmp_path / "o.parquet", output_format="parquet",
                               model=str(tiny_model), retries=-1)
    with pytest.raises(UsageError, match="--retries"):
        validate_settings(settings)
