"""Per-image seeds: a caption may depend on (run seed, key) only, so resumed and parallel runs agree."""

from __future__ import annotations

import subprocess
import sys

from caprl_cli.engines.seeding import request_seed

KEYS = ["a.jpg", "b.jpg", "a/same.jpg", "b/same.jpg", "café_ß_日本.png", "", "x" * 1000, "0", "00"]


def test_stable_across_calls() -> None:
    """The same (run seed, key) always gives the same seed."""
    for key in KEYS:
        assert request_seed(0, key) == request_seed(0, key)
        assert request_seed(1234, key) == request_seed(1234, key)


def test_stable_across_processes() -> None:
    """Not salted per process (unlike hash()): a fresh interpreter computes the same seeds."""
    code = "from caprl_cli.engines.seeding import request_seed; print([request_seed(7, k) for k in ['a.jpg', 'b/same.jpg']])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([request_seed(7, "a.jpg"), request_seed(7, "b/same.jpg")])


def test_in_range() -> None:
    """Every seed is an int in [0, 2**31)."""
    for run_seed in (0, 1, -1, 42, 2**40, -(2**40)):
        for key in KEYS + [f"img_{i:06d}.jpg" for i in range(500)]:
            seed = request_seed(run_seed, key)
            assert isinstance(seed, int)
            assert 0 <= seed < 2**31


def test_differs_by_key() -> None:
    """Different images get different seeds (no collisions among a few thousand keys)."""
    keys = [f"shard_{i // 100:03d}/img_{i:06d}.jpg" for i in range(5000)] + KEYS
    seeds = {request_seed(0, key) for key in keys}
    assert len(seeds) == len(keys)


def test_differs_by_run_seed() -> None:
    """Changing the run seed changes every image's seed."""
    for key in KEYS:
        seeds = {request_seed(run_seed, key) for run_seed in range(50)}
        assert len(seeds) == 50, key


def test_key_and_run_seed_do_not_alias() -> None:
    """(seed 1, key "2") and (seed 12, key "") are different inputs and give different seeds."""
    assert request_seed(1, "2") != request_seed(12, "")
    assert request_seed(1, "23") != request_seed(12, "3")


def test_caption_index_zero_keeps_the_single_caption_seed() -> None:
    """`--num-captions 1` output is unchanged: caption 0 has the seed an image always had."""
    import hashlib

    for key in KEYS:
        digest = hashlib.blake2b(f"5\x00{key}".encode(), digest_size=8).digest()
        assert request_seed(5, key, 0) == request_seed(5, key) == int.from_bytes(digest, "big") % 2**31


def test_each_caption_of_an_image_has_its_own_seed() -> None:
    for key in KEYS:
        seeds = [request_seed(3, key, index) for index in range(8)]
        assert len(set(seeds)) == 8
        assert seeds == [request_seed(3, key, index) for index in range(8)]
