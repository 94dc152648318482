"""Loop detection: the rule stops captions that repeat one block, never normal text, and the
incremental tracker agrees with the pure function token by token."""

from __future__ import annotations

import random

import pytest

from caprl_cli.engines.repetition import RepetitionRule, RepetitionTracker, repeating_period

RULE = RepetitionRule(min_repeats=4, max_period=8, min_tokens=12)


def test_a_block_repeated_enough_times_loops() -> None:
    prefix = [100, 101, 102, 103, 104]
    block = [7, 8, 9]
    assert repeating_period(prefix + block * 4, RULE) == 3
    assert repeating_period(prefix + block * 3, RULE) is None  # 9 tokens: under min_tokens
    assert repeating_period(prefix + block * 3 + [7, 8], RULE) is None
    # A block that ends the caption mid-way still loops once enough of it is there.
    assert repeating_period(prefix + block * 4 + [7], RULE) == 3


def test_periods_longer_than_the_bound_never_loop() -> None:
    block = list(range(9))  # 9 tokens > max_period 8
    assert repeating_period(block * 10, RULE) is None


def test_the_span_grows_with_the_period() -> None:
    block = list(range(6))  # needs 4 x 6 = 24 tokens, not just min_tokens 12
    assert repeating_period([99] + block * 3, RULE) is None
    assert repeating_period([99] + block * 4, RULE) == 6


def test_one_token_repeated_needs_min_tokens() -> None:
    assert repeating_period([5] * 11, RULE) is None
    assert repeating_period([5] * 12, RULE) == 1


def test_text_without_long_exact_repeats_never_loops() -> None:
    """Random text and text with repeated words or short repeated fragments (as in prose) do not loop."""
    rng = random.Random(0)
    prose_rule = RepetitionRule()
    for _ in range(200):
        tokens = [rng.randrange(50) for _ in range(300)]
        assert repeating_period(tokens, prose_rule) is None
    # A list where an item's shape repeats but its content differs.
    listing = [t for i in range(40) for t in (11, 500 + i, 12, 13)]
    assert repeating_period(listing, prose_rule) is None


@pytest.mark.parametrize("seed", range(30))
def test_tracker_agrees_with_the_pure_function(seed: int) -> None:
    """Token by token, the tracker fires exactly when the pure function first finds a loop."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < 200:  # random text with loops of random periods spliced in
        if rng.random() < 0.3:
            block = [rng.randrange(4) for _ in range(rng.randint(1, 10))]
            tokens += block * rng.randint(1, 6) + block[: rng.randint(0, len(block))]
        else:
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 8))]
    tracker = RepetitionTracker(RULE)
    fired_at = None
    for n, token in enumerate(tokens, 1):
        expected = repeating_period(tokens[:n], RULE)
        looping = tracker.push(token)
        if fired_at is None:
            assert looping == (expected is not None), (n, tokens[:n])
            if looping:
                fired_at = n
                assert tracker.period == expected
        else:
            assert looping  # stays stopped
    assert tracker.extend([]) == (fired_at is not None)


def test_unusable_rules_are_refused() -> None:
    for bad in ({"min_repeats": 1}, {"max_period": 0}, {"min_tokens": 0}):
        with pytest.raises(ValueError):
            RepetitionRule(**bad)


def test_vllm_streams_tokens_only_when_a_caption_could_loop() -> None:
    """Every step's tokens are streamed (a cost per running request per step) only when `max_tokens`
    leaves room for the shortest loop the rule counts; shorter captions are taken whole."""
    from caprl_cli.engines.base import EngineSpec, Sampling
    from caprl_cli.engines.vllm_engine import watched_rule

    def spec(max_tokens: int, rule: RepetitionRule | None) -> EngineSpec:
        return EngineSpec("model", "prompt", Sampling(max_tokens, 1.0, 1.0, 0), 3136, 200704, repetition=rule)

    assert watched_rule(spec(RULE.min_tokens, RULE)) == RULE
    assert watched_rule(spec(2048, RULE)) == RULE
    assert watched_rule(spec(RULE.min_tokens - 1, RULE)) is None
    default = RepetitionRule()  # caprl's --max-repeats rule: loops of 64 tokens or more
    assert watched_rule(spec(16, default)) is None
    assert watched_rule(spec(2048, default)) == default
    assert watched_rule(spec(2048, None)) is None
