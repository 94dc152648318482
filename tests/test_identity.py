"""Telling the image under a committed key apart: the same one reached again, one changed in place, or a
different one (a conflict), judged from sources and signatures, one at a time and for whole columns."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pytest

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.state.identity import Verdict, conflict_key, conflict_sample, judge, judge_all

CASES = [
    # source, signature, committed source, committed signature, verdict
    ("/new/a.jpg", "10:1", "/old/a.jpg", "10:1", Verdict.SAME),  # a moved or renamed folder
    ("/in/a.jpg", "10:1", "/in/a.jpg", "10:1", Verdict.SAME),
    ("/in/a.jpg", "11:2", "/in/a.jpg", "10:1", Verdict.CHANGED),  # written again in place
    ("https://h/a.jpg?sig=REDACTED", None, "https://h/a.jpg?sig=REDACTED", None, Verdict.SAME),  # signed again
    ("/in/a.jpg", "10:1", "/in/a.jpg", None, Verdict.SAME),  # a row from before signatures
    ("/day2/a.jpg", "11:2", "/day1/a.jpg", "10:1", Verdict.CONFLICT),
    ("/day2/a.jpg", None, "/day1/a.jpg", "10:1", Verdict.CONFLICT),
    ("/day2/a.jpg", "10:1", "/day1/a.jpg", None, Verdict.CONFLICT),
    ("/day2/a.jpg", None, "/day1/a.jpg", None, Verdict.CONFLICT),
]


@pytest.mark.parametrize(("source", "signature", "committed_source", "committed_signature", "verdict"), CASES)
def test_judge(source: str, signature: str | None, committed_source: str, committed_signature: str | None,
               verdict: Verdict) -> None:
    assert judge(source, signature, committed_source, committed_signature) is verdict


def test_judge_all_agrees_with_judge() -> None:
    """The vectorised verdicts (listed inputs) are exactly the one-at-a-time ones (streams)."""
    columns = [pa.array([case[i] for case in CASES], pa.string()) for i in range(4)]
    assert judge_all(*columns).tolist() == [int(case[4]) for case in CASES]


def test_conflict_key_is_stable_and_tells_images_apart() -> None:
    """The same image from the same place always gets the same conflict key; another image (other
    signature or source) another one."""
    keys = {conflict_key("a.jpg", source, signature)
            for source, signature in itertools.product(["/day2/a.jpg", "/day3/a.jpg"], ["1:1", "2:2", None])}
    assert len(keys) == 6
    assert conflict_key("a.jpg", "/day2/a.jpg", "1:1") == conflict_key("a.jpg", "/day2/a.jpg", "1:1")
    assert all(key.startswith("a.jpg@") for key in keys)


def test_conflict_sample_names_both_sources_without_secrets() -> None:
    """A conflict sample is an error sample of kind `conflict` naming both sources, credentials hidden."""
    sample = Sample(key="a.jpg", source="https://h/a.jpg?v=2&token=REDACTED", path="https://h/a.jpg?v=2&token=t0p",
                    signature=None)
    conflict = conflict_sample(sample, "https://u:pw@h/a.jpg?v=1&sig=S3CRET")
    assert conflict.error_kind is ErrorKind.CONFLICT and conflict.path is None and conflict.data is None
    assert conflict.key == conflict_key("a.jpg", sample.source, None)
    message = conflict.error_message or ""
    assert "https://h/a.jpg?v=1&sig=REDACTED" in message and sample.source in message
    assert "S3CRET" not in message and "pw" not in message and "t0p" not in message
