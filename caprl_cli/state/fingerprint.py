"""The settings fingerprint: which settings decide what an output holds, and what changed between runs.

An output made with one model, prompt or pixel limit must never silently gain rows made with another,
so every setting that changes a row is stored with the state and compared on every run.
"""

from __future__ import annotations

from typing import Any

from caprl_cli.settings import CaptionSettings

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
)
def fingerprint_of(settings: CaptionSettings) -> dict[str, Any]:
    """The caption-deciding settings of a run, as stored in fingerprint.json."""
    return {name: getattr(settings, name) for name in FINGERPRINT_FIELDS}


def fingerprint_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the settings that differ, as `--option` names."""
    names = sorted(set(stored) | set(current))
    return ["--" + name.replace("_", "-") for name in names if stored.get(name) != current.get(name)]
