"""`caprl status`: counts, remaining and ETA read from the state folder alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from caprl_cli.errors import ErrorKind, UsageError
from caprl_cli.state.parts import PartWriter, new_run_id
from caprl_cli.outputs.rows import caption_row, error_row
from caprl_cli.state.fingerprint import fingerprint_of
from caprl_cli.state.folder import RunState
from caprl_cli.settings import CaptionSettings
from caprl_cli.status import format_status, output_status

RUN_RECORD = {"images_per_s": 2.0, "images": 4, "finished_at": "2024-05-01T12:00:00Z", "stopped_by": None}


def _ok(key: str) -> dict:
    return caption_row(key=key, source=f"/data/{key}", model="tiny", caption="c", finish_reason="stop",
                       prompt_tokens=1, output_tokens=1, width=4, height=4)


def _err(key: str, kind: ErrorKind) -> dict:
    return error_row(key=key, source=f"/data/{key}", model="tiny", kind=kind, message="nope")


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


def _make_state(
    output: Path, parts: list[list[dict]], record: dict | None = RUN_RECORD, images: Path | None = None
) -> RunState:
    """A state holding `parts`; with `images`, each row's source is its file there, as a run records it."""
    if images is not None:
        parts = [[{**row, "source": str(images.resolve() / row["key"])} for row in rows] for rows in parts]
    state = RunState(output)
    state.create()
    settings = CaptionSettings(inputs=("x",), output=output, output_format="parquet")
    state.write_fingerprint(fingerprint_of(settings))
    run_id = new_run_id()
    writer = PartWriter(state.parts_dir, run_id, flush_rows=10**6, flush_seconds=3600)
    for rows in parts:
        for row in rows:
            writer.add(row)
        writer.flush()
    writer.close()
    if record is not None:
        state.record_run(run_id, record)
    return state


def test_counts_without_inputs(tmp_path: Path) -> None:
    """done/ok/errors come from the latest row per key; without inputs remaining and ETA are unknown."""
    output = tmp_path / "out.parquet"
    _make_state(output, [
        [_ok("a.png"), _err("b.png", ErrorKind.DECODE), _err("c.png", ErrorKind.DECODE)],
        [_ok("b.png"), _err("d.png", ErrorKind.TOO_LARGE), _ok("e.png")],
    ])
    status = output_status(output, [])
    assert status["done"] == 5
    assert status["ok"] == 3
    assert status["errors"] == 2
    assert status["errors_by_kind"] == {"decode": 1, "too_large": 1}
    assert status["remaining"] is None
    assert status["eta_s"] is None
    assert status["parts"] == 2
    assert status["output_current"] is False
    assert status["last_run"] == RUN_RECORD
    assert status["images_per_s"] == 2.0


def test_remaining_and_eta_with_inputs(tmp_path: Path) -> None:
    """With the inputs folder, remaining counts images not yet committed and ETA is remaining / images_per_s."""
    images = tmp_path / "images"
    committed = ["a.png", "sub/b.png", "c.png"]
    new = ["d.png", "sub/e.png", "sub/deeper/f.png", "g.png", "h.png"]
    for key in committed + new:
        _png(images / key)
    output = tmp_path / "out.parquet"
    _make_state(output, [[_ok("a.png"), _ok("sub/b.png")], [_err("c.png", ErrorKind.DECODE)]], images=images)

    status = output_status(output, [str(images)])
    assert status["done"] == 3 and status["ok"] == 2 and status["errors"] == 1
    assert status["remaining"] == len(new)
    assert status["eta_s"] == pytest.approx(len(new) / 2.0)


def test_committed_keys_gone_from_inputs_do_not_change_remaining(tmp_path: Path) -> None:
    """Committed rows for files no longer in the folder count as done but not against remaining."""
    images = tmp_path / "images"
    _png(images / "x.png")
    output = tmp_path / "out.parquet"
    _make_state(output, [[_ok("deleted.png")]])
    status = output_status(output, [str(images)])
    assert status["done"] == 1
    assert status["remaining"] == 1


def test_all_done_gives_zero_remaining(tmp_path: Path) -> None:
    """A finished folder has remaining 0 and ETA 0."""
    images = tmp_path / "images"
    _png(images / "a.png")
    output = tmp_path / "out.parquet"
    _make_state(output, [[_ok("a.png")]], images=images)
    status = output_status(output, [str(images)])
    assert status["remaining"] == 0
    assert status["eta_s"] == 0


def test_no_run_record_means_no_rate_or_eta(tmp_path: Path) -> None:
    """Before any run finished there is no images/s, so no ETA, but remaining is still counted."""
    images = tmp_path / "images"
    _png(images / "a.png")
    _png(images / "b.png")
    output = tmp_path / "out.parquet"
    _make_state(output, [[_ok("a.png")]], record=None, images=images)
    status = output_status(output, [str(images)])
    assert status["last_run"] is None
    assert status["images_per_s"] is None
    assert status["remaining"] == 1
    assert status["eta_s"] is None
    assert "1" in format_status(status)


def test_state_with_no_parts(tmp_path: Path) -> None:
    """A run that committed nothing yet reports zero done."""
    output = tmp_path / "out.parquet"
    _make_state(output, [], record=None)
    status = output_status(output, [])
    assert (status["done"], status["ok"], status["errors"], status["parts"]) == (0, 0, 0, 0)
    assert status["errors_by_kind"] == {}


def test_output_current_after_merge(tmp_path: Path) -> None:
    """`output_current` is true once the output was merged from the present parts."""
    from caprl_cli.outputs.table import merge_output

    output = tmp_path / "out.parquet"
    state = _make_state(output, [[_ok("a.png")]])
    merge_output(state, state.committed(), "parquet", {})
    assert output_status(output, [])["output_current"] is True


def test_format_status_contains_the_numbers(tmp_path: Path) -> None:
    """The text report shows done, ok, errors, each error kind and count, remaining and the last run's rate."""
    images = tmp_path / "images"
    for name in ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png", "h.png", "i.png", "j.png", "k.png", "l.png"]:
        _png(images / name)
    output = tmp_path / "out.parquet"
    _make_state(output, [[_ok("a.png"), _ok("b.png"), _ok("c.png"), _err("d.png", ErrorKind.ENGINE)]], images=images)
    status = output_status(output, [str(images)])
    assert (status["done"], status["ok"], status["errors"], status["remaining"]) == (4, 3, 1, 8)
    text = format_status(status)
    assert str(output) in text
    assert "4" in text and "3" in text and "1" in text and "8" in text
    assert "engine" in text
    assert "2.0" in text
    assert RUN_RECORD["finished_at"] in text
    assert status["eta_s"] == 4.0
    assert "4s" in text  # ETA: 8 remaining / 2.0 images/s


def test_missing_state_is_a_usage_error(tmp_path: Path) -> None:
    """Asking about an output no run has written is a UsageError (exit 2), not a crash."""
    with pytest.raises(UsageError):
        output_status(tmp_path / "never.parquet", [])


def test_state_folder_without_fingerprint_is_a_usage_error(tmp_path: Path) -> None:
    """A state folder a run only locked (no fingerprint written) does not count as a run."""
    output = tmp_path / "out.parquet"
    RunState(output).create()
    with pytest.raises(UsageError):
        output_status(output, [])
