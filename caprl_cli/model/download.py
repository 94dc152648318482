"""Fetch a hub snapshot the way a user should see it: one line up front, the hub's own progress bar on a
terminal, log lines off one, nothing with `-q`, and failures as one line with the right exit code.

On a fresh GPU box the first `caprl caption` downloads CapRL-3B (about 7.5 GB): the user is told what
is fetched, from where and roughly how much before it starts. huggingface_hub retries a dropped
transfer within the run (a Range request from where it stopped) and keeps every file it finished, so
after a hub that went away "run again" is the whole recovery: the next run fetches only the rest.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from caprl_cli.errors import ModelUnavailable, UsageError

log = logging.getLogger("caprl")

LOG_INTERVAL_S = 5.0  # as often as captioning's progress lines


def download_snapshot(repo_id: str, revision: str | None, ignore_patterns: list[str] | None) -> str:
    """The local snapshot folder of `repo_id` at `revision`, downloading what the cache lacks."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    quiet_hub_logs()
    endpoint = constants.ENDPOINT
    announce(repo_id, revision, ignore_patterns, endpoint)
    try:
        return snapshot_download(
            repo_id, revision=revision, ignore_patterns=ignore_patterns, tqdm_class=progress_class(repo_id)
        )
    except GatedRepoError:
        raise ModelUnavailable(
            f"model {repo_id} on {endpoint} is gated: accept its terms on the hub and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"no model {repo_id} on {endpoint} (404): check --model (a hub id owner/name, a local folder, "
            "or a name from `caprl models`)"
        ) from None
    except RevisionNotFoundError:
        raise UsageError(f"model {repo_id} on {endpoint} has no revision {revision!r}: check --revision") from None
    except Exception as exc:
        if constants.is_offline_mode():
            raise ModelUnavailable(  # exit 1, as a hub that cannot be reached: it works once online
                f"cannot get model {repo_id}{_at(revision)}: it is not in the hub cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, or pass --model a local folder"
            ) from None
        reason = " ".join(str(exc).split())[:300]
        raise ModelUnavailable(
            f"cannot get model {repo_id}{_at(revision)} from {endpoint}: {reason} (run again: the files already fetched are kept)"
        ) from None


def quiet_hub_logs() -> None:
    """huggingface_hub sets its own logger's level when first imported, which happens after caprl set
    the libraries' levels: set it again, so its retry warnings follow -q/-v like every library's."""
    from caprl_cli.verbosity import VERBOSITY_ENV, quiet_libraries

    try:
        verbosity = int(os.environ.get(VERBOSITY_ENV, "0"))
    except ValueError:
        verbosity = 0
    quiet_libraries(verbosity)


def announce(repo_id: str, revision: str | None, ignore_patterns: list[str] | None, endpoint: str) -> None:
    """One line before a download: what, from where, how much. Nothing when the cache has it all, and
    nothing when the hub cannot be asked (the download itself then says why, or uses the cache)."""
    from huggingface_hub import constants, snapshot_download

    if constants.is_offline_mode():
        return
    try:
        planned: Any = snapshot_download(
            repo_id, revision=revision, ignore_patterns=ignore_patterns, dry_run=True, tqdm_class=silent_progress()
        )
    except Exception:  # no such repo, hub unreachable, a huggingface_hub without dry runs
        return
    missing = [info for info in planned if getattr(info, "will_download", False)]
    if not missing:
        return
    size = sum(info.file_size or 0 for info in missing)
    log.info(
        "fetching %s%s from %s: %d files, about %s, into %s",
        repo_id, _at(revision), endpoint, len(missing), format_size(size), constants.HF_HUB_CACHE,
    )


def format_size(size: int) -> str:
    """`7.5 GB`, `24.1 MB`, `512 kB`: roughly, as a person reads it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{max(1, round(size / 1e3))} kB"


def _at(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def silent_progress() -> type:
    """A tqdm class that never draws (the dry run that sizes a download is no download)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Silent(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def progress_class(repo_id: str) -> type:
    """The tqdm class snapshot_download draws with: the hub's own bars on a terminal; off a terminal no
    bar but a log line per LOG_INTERVAL_S (and the last) of files fetched; with -q nothing at all."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    quiet = not log.isEnabledFor(logging.INFO)
    terminal = sys.stderr.isatty()

    class DownloadProgress(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._counts_files = str(kwargs.get("desc", "")).startswith("Fetching")
            self._files_total = kwargs.get("total")
            self._files_done = 0
            self._last_line = time.monotonic()
            if quiet or not terminal:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts_files and not quiet and not terminal:
                self._files_done += int(n or 0)
                now = time.monotonic()
                if self._files_done == self._files_total or now - self._last_line >= LOG_INTERVAL_S:
                    log.info("fetched %d of %s files of %s", self._files_done, self._files_total or "?", repo_id)
                    self._last_line = now
            return super().update(n)

    return DownloadProgress
