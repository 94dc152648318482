"""Per-image sampling seeds, so a caption depends on the image's key, its index and the run seed alone.

Sampling at temperature 1.0 is random; seeding each request from (seed, key) rather than from a
global generator makes the caption independent of batch composition, worker and run, which resumed and
parallel runs rely on. With `--num-captions N`, caption `i` of an image has a seed of its own from
(seed, key, i); caption 0 keeps the seed a single caption always had, so N=1 output is unchanged.
"""

from __future__ import annotations

import hashlib

SEED_SPACE = 2**31


def request_seed(run_seed: int, key: str, index: int = 0) -> int:
    """A stable seed in [0, 2**31) for caption `index` of one image."""
    text = f"{run_seed}\x00{key}" if index == 0 else f"{run_seed}\x00{key}\x00{index}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_SPACE
