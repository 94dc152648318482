"""The settings fingerprint: which settings decide what an output holds, and what changed between runs.

An output made with one model, prompt or pixel limit must never silently gain rows made with another,
so every setting that changes a row is stored with the state and compared on every run.
"""

from __future__ import annotations

from typing import Any

from caprl_cli.settings import CaptionSettings
from caprl_cli.state.shares import Share

# The node share (`--num-shards/--shard-index`), recorded only when a run takes one: a share's output
# holds only its share, so another share (or the whole work) must not continue it. A whole run records
# nothing, so fingerprints of states written before shares existed stay equal.
SHARE = "share"

# Settings that change what a caption says (or whether an image is refused).
FINGERPRINT_FIELDS = (
    "model",
    "revision",
    "engine",
    "prompt",
    "system_prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "min_pixels",
    "max_pixels",
    "max_image_pixels",
    # Settings that change what the output holds: its format, and whether shards carry the images.
    "output_format",
    "images",
    # When a looping caption is stopped (`--max-repeats`).
    "max_repeats",
)
# Settings older state folders did not record: their absence is no change (the value they were made
# with is the one a run on such a state would have had anyway: shards of one kind, in the one format
# the output's name allowed); a run records them.
ADDED_LATER = frozenset({"output_format", "images", "max_repeats"})
# Captions per image, recorded only when more than one (as the share): one caption per image is what
# every state written before the option existed holds, so their fingerprints stay equal.
NUM_CAPTIONS = "num_captions"
# Settings whose option is not `--` + the field name.
_OPTION_OF = {"output_format": "--format", "images": "--images/--no-images", SHARE: "--num-shards/--shard-index"}


def fingerprint_of(settings: CaptionSettings) -> dict[str, Any]:
    """The output-deciding settings of a run, as stored in fingerprint.json."""
    found: dict[str, Any] = {name: getattr(settings, name) for name in FINGERPRINT_FIELDS}
    share = Share.of(settings)
    if share is not None:
        found[SHARE] = share.record()
    if settings.num_captions != 1:
        found[NUM_CAPTIONS] = settings.num_captions
    return found


def fingerprint_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the settings that differ, as `--option` names.

    A setting only one side holds counts as changed, except one of `ADDED_LATER` that the stored
    fingerprint does not hold: that state was written by a caprl that did not record it yet, so it is
    no change, and the run records it (`unrecorded`)."""
    names = sorted(name for name in set(stored) | set(current) if name in stored or name not in ADDED_LATER)
    return [_OPTION_OF.get(name, "--" + name.replace("_", "-")) for name in names if stored.get(name) != current.get(name)]


def unrecorded(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether `current` holds settings of `ADDED_LATER` that `stored` never recorded (to be written in)."""
    return bool((set(current) - set(stored)) & ADDED_LATER)
