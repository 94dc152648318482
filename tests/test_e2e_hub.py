"""The first run on a fresh box downloads the model: `model/source.py` and `model/download.py` against a
model hub served on 127.0.0.1 (tests/hub_server.py, reached through HF_ENDPOINT) that holds the tiny
model's files. Each test has its own hub cache (HF_HOME), so nothing is shared with the machine's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from contract import read_rows
from hub_server import Hub, files_of
from PIL import Image

from caprl_cli.model.download import format_size

REPO = "caprl-tests/tiny-captioner"
ENGINE = ("--engine", "transformers", "--max-tokens", "4", "--no-progress", "--workers", "1")
# Bigger than huggingface_hub's 10 MB download chunk, so a download cut part-way leaves bytes to resume.
PADDING = 24 * 1024 * 1024


@pytest.fixture
def hub(tiny_model: Path) -> Iterator[tuple[Hub, dict[str, str]]]:
    """A hub holding REPO at two commits (main is the newer); yields it and its commits by name."""
    hub = Hub()
    files = files_of(tiny_model)
    repo = hub.repo(REPO)
    old = repo.add_commit({**files, "revision.txt": b"old"}, branch=None)
    new = repo.add_commit({**files, "revision.txt": b"new", "padding.bin": bytes(PADDING)})
    hub.start()
    yield hub, {"old": old, "new": new}
    hub.stop()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 48), (30, 140, 200)).save(folder / "a.png")
    return folder


def online(hub: Hub, home: Path) -> dict[str, str]:
    """The environment of a run that reaches `hub` with its own cache (HF_HUB_OFFLINE unset)."""
    return {"HF_ENDPOINT": hub_endpoint(hub), "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DOWNLOAD_TIMEOUT": "10", "HF_HUB_ETAG_TIMEOUT": "10"}


def hub_endpoint(hub: Hub) -> str:
    server = hub._server
    assert server is not None, "the hub is not running"
    return f"http://127.0.0.1:{server.server_address[1]}"


def summary_of(output: Path) -> dict:
    return json.loads(Path(f"{output}.summary.json").read_text())


def test_first_run_downloads_and_captions_then_the_cache_serves_without_the_hub(
    run_caprl, hub, images: Path, tmp_path: Path
) -> None:
    """Run 1 says up front what it fetches, from where and how much, logs its progress off a terminal,
    and captions; run 2, with the hub gone, captions from the cache and fetches nothing."""
    server, commits = hub
    env = online(server, tmp_path / "hf")
    endpoint = hub_endpoint(server)
    first = run_caprl("caption", images, "-o", tmp_path / "one.jsonl", "--model", REPO, *ENGINE, env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.strip().splitlines()
    fetching = [line for line in lines if line.startswith(f"caprl: fetching {REPO} from {endpoint}")]
    size = sum(len(data) for data in server.repo(REPO).commits[commits["new"]].values())
    assert len(fetching) == 1 and f": 9 files, about {format_size(size)}, into {tmp_path / 'hf'}" in fetching[0], first.stderr
    assert "Fetching" not in first.stderr  # no bar drawn off a terminal
    assert f"caprl: fetched 9 of 9 files of {REPO}" in lines
    assert [row["status"] for row in read_rows(tmp_path / "one.jsonl")] == ["ok"]
    assert summary_of(tmp_path / "one.jsonl")["model_revision"] == commits["new"]

    server.stop()
    second = run_caprl("caption", images, "-o", tmp_path / "two.jsonl", "--model", REPO, *ENGINE, env=env)
    assert second.returncode == 0, second.stderr
    assert "fetch" not in second.stderr
    assert [row["status"] for row in read_rows(tmp_path / "two.jsonl")] == ["ok"]
    assert summary_of(tmp_path / "two.jsonl")["model_revision"] == commits["new"]


def test_revision_pins_a_commit_and_quiet_shows_nothing(run_caprl, hub, images: Path, tmp_path: Path) -> None:
    server, commits = hub
    output = tmp_path / "old.jsonl"
    env = online(server, tmp_path / "hf")
    result = run_caprl("caption", images, "-o", output, "--model", REPO, "--revision", commits["old"], "-q", *ENGINE, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert summary_of(output)["model_revision"] == commits["old"]
    snapshot = next((tmp_path / "hf" / "hub").glob(f"models--*/snapshots/{commits['old']}"))
    assert (snapshot / "revision.txt").read_text() == "old" and not (snapshot / "padding.bin").exists()


def test_a_hub_that_dies_mid_download_is_exit_1_and_the_next_run_fetches_only_the_rest(
    run_caprl, hub, images: Path, tmp_path: Path
) -> None:
    """The hub dies half-way through the largest file: one clear line and exit 1, nothing written. The
    next run fetches only what the first did not finish (the files it got stay in the cache) and
    captions."""
    server, _ = hub
    env = online(server, tmp_path / "hf")
    server.die_after["padding.bin"] = PADDING // 2
    output = tmp_path / "out.jsonl"
    cut = run_caprl("caption", images, "-o", output, "--model", REPO, *ENGINE, env=env)
    assert cut.returncode == 1, cut.stderr
    last = cut.stderr.strip().splitlines()[-1]
    assert last.startswith(f"caprl: error: cannot get model {REPO} from ") and "run again" in last
    assert "Traceback" not in cut.stderr and not output.exists()
    finished = set(server.served)
    assert finished and "padding.bin" not in finished

    del server.die_after["padding.bin"]
    server.served.clear()
    server.start()
    resumed = run_caprl("caption", images, "-o", output, "--model", REPO, *ENGINE, env=online(server, tmp_path / "hf"))
    assert resumed.returncode == 0, resumed.stderr
    fetched = set(server.served)
    assert "padding.bin" in fetched and not fetched & finished
    assert [row["status"] for row in read_rows(output)] == ["ok"]


def test_an_unknown_model_is_exit_2_naming_it(run_caprl, hub, images: Path, tmp_path: Path) -> None:
    server, _ = hub
    output = tmp_path / "out.jsonl"
    result = run_caprl("caption", images, "-o", output, "--model", "caprl-tests/no-such-model", *ENGINE,
                       env=online(server, tmp_path / "hf"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("caprl: error: no model caprl-tests/no-such-model on http://127.0.0.1:")
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_a_terminal_shows_the_hubs_progress_bar(hub, images: Path, tmp_path: Path) -> None:
    """With stderr on a terminal (a pseudo-terminal here) the download draws huggingface_hub's own bars."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from conftest import ROOT

    server, _ = hub
    output = tmp_path / "out.jsonl"
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a width
    process = subprocess.Popen(
        [sys.executable, "-m", "caprl_cli", "caption", str(images), "-o", str(output), "--model", REPO, *ENGINE],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal,
        env={**os.environ, **online(server, tmp_path / "hf")}, cwd=ROOT,
    )
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            break
        if not data:
            break
        shown += data
    os.close(main)
    assert process.wait(timeout=600) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "caprl: fetching" in text and "Fetching 9 files" in text and "100%" in text
    assert "fetched 9 of 9 files" not in text  # the log lines are for when no bar can be drawn
