"""Per-image sampling seeds, so a caption depends on the image's key and the run seed alone.

Sampling at temperature 1.0 is random; seeding each request from (seed, key) rather than from a
global generator makes the caption independent of batch composition, worker and run, which resumed and
parallel runs rely on.
"""

from __future__ import annotations

import hashlib

SEED_SPACE = 2**31


def request_seed(run_seed: int, key: str) -> int:
    """A stable seed in [0, 2**31) for one image."""
    digest = hashlib.blake2b(f"{run_seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_SPACE
