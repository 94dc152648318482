"""Progress reporting: short durations, honest counts, no terminal bar when stderr is a log file."""

from __future__ import annotations

import io
import logging
import re

import pytest

from caprl_cli.execute.progress import Progress, format_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (1, "1s"),
        (12, "12s"),
        (59.99, "59s"),
        (60, "1m00s"),
        (245, "4m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3725, "1h02m"),
        (3 * 86400 + 61, "72h01m"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Durations read as `1h02m`, `4m05s` or `12s`; negatives clamp to 0s."""
    assert format_duration(seconds) == text


class _Terminal(io.StringIO):
    """An in-memory stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+(?:\.\d+)?", text)


def test_no_bar_on_non_tty_stream() -> None:
    """Writing to a log file (not a tty) never creates a bar and writes nothing to the stream."""
    stream = io.StringIO()
    progress = Progress(10, enabled=True, stream=stream)
    for _ in range(5):
        progress.update(tokens=3)
    progress.close()
    assert progress._bar is None
    assert stream.getvalue() == ""


def test_disabled_never_creates_a_bar() -> None:
    """`enabled=False` (--quiet) shows no bar even on a terminal."""
    progress = Progress(10, enabled=False, stream=_Terminal())
    progress.update()
    assert progress._bar is None
    progress.close()


def test_bar_on_terminal() -> None:
    """On a terminal a bar is drawn, and closing it removes it."""
    stream = _Terminal()
    progress = Progress(4, enabled=True, stream=stream)
    assert progress._bar is not None
    for _ in range(4):
        progress.update(tokens=10)
    progress.close()
    assert progress._bar is None
    assert "4/4" in stream.getvalue()
    assert progress.done == 4 and progress.tokens == 40


def test_counts_done_errors_tokens() -> None:
    """Each update is one image; errors and tokens add up."""
    progress = Progress(10, stream=io.StringIO())
    progress.update(tokens=100)
    progress.update(tokens=50)
    progress.update(error=True)
    assert (progress.done, progress.errors, progress.tokens) == (3, 1, 150)
    progress.update(tokens=7, error=True)
    assert (progress.done, progress.errors, progress.tokens) == (4, 2, 157)


def test_line_mentions_counts() -> None:
    """The line shows done/total and the error count."""
    progress = Progress(10, stream=io.StringIO())
    progress.update(tokens=100)
    progress.update(tokens=100)
    progress.update(error=True)
    line = progress.line()
    assert "3/10" in line
    assert "1" in _numbers(line.split("3/10", 1)[1])


def test_line_rates_and_eta_from_elapsed_time() -> None:
    """With a known clock, rates and ETA follow: 4 images and 400 tokens in 2 s of 10 images."""
    progress = Progress(10, stream=io.StringIO())
    for _ in range(4):
        progress.update(tokens=100)
    line = progress.line(now=progress.started + 2.0)
    assert "4/10" in line
    numbers = _numbers(line)
    assert "2.0" in numbers  # img/s
    assert "200" in numbers  # tok/s
    assert "3s" in line  # 6 images left at 2 img/s


def test_line_before_any_image_has_no_eta() -> None:
    """Nothing done yet: 0/total, and no made-up ETA (no number after it)."""
    progress = Progress(7, stream=io.StringIO())
    line = progress.line(now=progress.started + 1.0)
    assert "0/7" in line
    assert not re.search(r"ETA \d", line)


def test_line_when_finished() -> None:
    """All done: total/total and nothing left to wait for."""
    progress = Progress(3, stream=io.StringIO())
    for _ in range(3):
        progress.update()
    line = progress.line(now=progress.started + 3.0)
    assert "3/3" in line
    assert "0s" in line


def test_logs_a_line_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal, a progress line is logged once the interval has passed."""
    progress = Progress(5, stream=io.StringIO(), interval=0.0)
    with caplog.at_level(logging.INFO, logger="caprl"):
        progress.update()
        progress.update(error=True)
    messages = [record.getMessage() for record in caplog.records if record.name == "caprl"]
    assert len(messages) == 2
    assert "1/5" in messages[0]
    assert "2/5" in messages[1]


def test_no_log_before_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Updates inside the interval stay quiet, so cron logs are not flooded."""
    progress = Progress(5, stream=io.StringIO(), interval=3600.0)
    with caplog.at_level(logging.INFO, logger="caprl"):
        for _ in range(5):
            progress.update()
    assert [record for record in caplog.records if record.name == "caprl"] == []
