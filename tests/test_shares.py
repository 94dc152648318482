"""Node shares (`--num-shards N --shard-index I`): the hash split itself, and planning with a share.

The split must be disjoint, complete, independent of input order and roughly balanced; planning must
drop the units of other shares before anything is opened; the share is part of the fingerprint.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from conftest import write_shard
from PIL import Image

from caprl_cli.errors import UsageError
from caprl_cli.inputs.resolve import InputOptions, ShardRef, resolve_inputs
from caprl_cli.settings import CaptionSettings, output_for_share, validate_share
from caprl_cli.state.fingerprint import fingerprint_changes, fingerprint_of
from caprl_cli.state.folder import RunState
from caprl_cli.state.plan import plan_run
from caprl_cli.state.shares import Share, share_of

KEYS = [f"folder/{i:06d}.jpg" for i in range(4000)]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shares_are_disjoint_and_complete(count: int) -> None:
    shares = [{key for key in KEYS if Share(index, count).holds(key)} for index in range(count)]
    assert sum(len(share) for share in shares) == len(KEYS)
    assert set().union(*shares) == set(KEYS)


def test_shares_are_roughly_balanced() -> None:
    counts = [sum(share_of(key, 4) == index for key in KEYS) for index in range(4)]
    assert all(abs(n - len(KEYS) / 4) < len(KEYS) * 0.05 for n in counts), counts


def test_share_depends_on_the_unit_not_its_position() -> None:
    shuffled = KEYS[:]
    random.Random(7).shuffle(shuffled)
    by_position = {key: share_of(key, 5) for key in KEYS}
    assert {key: share_of(key, 5) for key in shuffled} == by_position
    # the same digest in any process: a value fixed here would change if the hash were salted
    assert len({share_of(key, 1000) for key in KEYS[:50]}) > 10


def test_a_resigned_url_shard_stays_in_its_share() -> None:
    share = Share(0, 2)
    base = "https://host.example/data/shard-000123.tar"
    signed = [f"{base}?X-Amz-Signature={n}&X-Amz-Date=2024{n}" for n in range(20)]
    decisions = {share.holds_shard(ShardRef(url=url, source=url)) for url in signed}
    assert decisions == {share.holds_shard(ShardRef(url=base, source=base))}


@pytest.mark.parametrize(
    ("count", "index"), [(2, None), (None, 0), (0, 0), (2, 2), (2, -1)]
)
def test_share_options_are_checked(count: int | None, index: int | None) -> None:
    with pytest.raises(UsageError):
        validate_share(count, index)


def test_shard_index_placeholder_in_output() -> None:
    assert output_for_share("caps-{shard_index}.parquet", 4, 3) == "caps-3.parquet"
    assert output_for_share("caps.parquet", None, None) == "caps.parquet"
    with pytest.raises(UsageError):
        output_for_share("caps-{shard_index}.parquet", None, None)


def test_the_share_is_part_of_the_fingerprint() -> None:
    whole = CaptionSettings(inputs=("x",), output="o.parquet", output_format="parquet")
    first = CaptionSettings(inputs=("x",), output="o.parquet", output_format="parquet", num_shards=2, shard_index=0)
    second = CaptionSettings(inputs=("x",), output="o.parquet", output_format="parquet", num_shards=2, shard_index=1)
    assert fingerprint_changes(fingerprint_of(first), fingerprint_of(second)) == ["--num-shards/--shard-index"]
    assert fingerprint_changes(fingerprint_of(whole), fingerprint_of(first)) == ["--num-shards/--shard-index"]
    # a whole run records no share, so states written before shares existed still match
    assert "share" not in fingerprint_of(whole)


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """A folder of images, a folder of shards and a manifest, each named in two orders."""
    root = tmp_path_factory.mktemp("share-inputs")
    (root / "pics" / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "pics" / ("sub" if i % 3 else "") / f"img{i:03d}.jpg").write_bytes(_jpeg(i))
    shards = [
        write_shard(root / "shards" / f"part-{n:03d}.tar", [{"__key__": f"s{n}-{j}", "jpg": _jpeg(j)} for j in range(2)])
        for n in range(12)
    ]
    (root / "m").mkdir()
    lines = [json.dumps({"image": f"../pics/img{i:03d}.jpg", "n": i}) for i in range(30)]
    (root / "m" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "m" / "b.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    return {
        "folder": [str(root / "pics")],
        "shards": [str(path) for path in shards],
        "shards_reversed": [str(path) for path in reversed(shards)],
        "manifest": [str(root / "m" / "a.jsonl")],
        "manifest_reversed": [str(root / "m" / "b.jsonl")],
    }


def _planned_keys(names: list[str], share: Share | None, tmp_path: Path) -> tuple[list[str], list[str]]:
    """The keys a run with `share` would caption, and the shards it would open."""
    state = RunState(tmp_path / f"o-{share}.parquet")
    state.create()
    found = resolve_inputs(names, InputOptions())
    plan = plan_run(found, state.committed(), share=share)
    opened = [shard.source for shard in plan.shards]
    return sorted(sample.key for sample in plan.samples()), opened


@pytest.mark.parametrize(("kind", "reordered"), [("folder", None), ("shards", "shards_reversed"), ("manifest", "manifest_reversed")])
def test_planned_shares_are_disjoint_complete_and_order_free(
    inputs: dict[str, list[str]], kind: str, reordered: str | None, tmp_path: Path
) -> None:
    whole, _ = _planned_keys(inputs[kind], None, tmp_path)
    shares = [_planned_keys(inputs[kind], Share(i, 3), tmp_path)[0] for i in range(3)]
    assert sorted(key for share in shares for key in share) == whole
    assert all(shares), "each share gets some of the work"
    if reordered:
        again = [_planned_keys(inputs[reordered], Share(i, 3), tmp_path)[0] for i in range(3)]
        assert again == shares


def test_shards_of_other_shares_are_never_opened(inputs: dict[str, list[str]], tmp_path: Path) -> None:
    for i in range(2):
        _, opened = _planned_keys(inputs["shards"], Share(i, 2), tmp_path)
        assert opened and len(opened) < len(inputs["shards"])
        assert all(Share(i, 2).holds_shard(ShardRef(url=path, source=path)) for path in opened)
