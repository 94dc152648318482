"""Loop detection: a caption whose last tokens are one short block repeated over and over is stopped.

Qwen-VL models sometimes repeat a phrase until `max_tokens` (at CapRL's 2048 that is up to 2048 wasted
tokens per image). The rule is measured in tokens and made strict enough that normal text never meets
it: the last `max(min_repeats * p, min_tokens)` tokens must be exact repeats of one block of `p` tokens,
for some period `p <= max_period`. A sentence said four times in a row, or one token 64 times, meets it;
lists, tables of a few columns and repeated words inside prose do not.

`repeating_period` is the rule as a pure function over a whole token list (what an engine that only
sees finished text, such as an HTTP client, can apply after the fact); `RepetitionTracker` is the same
rule applied one token at a time in O(max_period) per token, for engines that watch tokens as they are
generated. Both give the same answer for the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The finish_reason of a caption stopped because it repeated itself.
FINISH_REPETITION = "repetition"
DEFAULT_MIN_REPEATS = 4
DEFAULT_MAX_PERIOD = 64
DEFAULT_MIN_TOKENS = 64


@dataclass(frozen=True)
class RepetitionRule:
    """When a caption counts as looping: the tail is `min_repeats` or more copies of one block of at
    most `max_period` tokens, covering at least `min_tokens` tokens."""

    min_repeats: int = DEFAULT_MIN_REPEATS
    max_period: int = DEFAULT_MAX_PERIOD
    min_tokens: int = DEFAULT_MIN_TOKENS

    def __post_init__(self) -> None:
        if self.min_repeats < 2 or self.max_period < 1 or self.min_tokens < 1:
            raise ValueError(f"unusable repetition rule {self}")

    def span(self, period: int) -> int:
        """How many tail tokens a block of `period` tokens must cover to count as a loop."""
        return max(self.min_repeats * period, self.min_tokens)


def repeating_period(tokens: Sequence[int], rule: RepetitionRule) -> int | None:
    """The smallest period `p` such that the tail of `tokens` is a loop of a `p`-token block under
    `rule`, or None when the tail does not loop."""
    n = len(tokens)
    for period in range(1, rule.max_period + 1):
        span = rule.span(period)
        if span > n:
            continue
        start = n - span
        if all(tokens[i] == tokens[i + period] for i in range(start, n - period)):
            return period
    return None


class RepetitionTracker:
    """`repeating_period` kept up to date one token at a time.

    For each period `p` it keeps how many of the most recent tokens equal the token `p` before them
    (`runs[p]`); the last `runs[p] + p` tokens then repeat with period `p`.
    """

    def __init__(self, rule: RepetitionRule) -> None:
        self.rule = rule
        self.tokens: list[int] = []
        self._runs = [0] * (rule.max_period + 1)
        self.period: int | None = None  # set once the caption loops

    def push(self, token: int) -> bool:
        """Add the next generated token; True once the caption loops (and from then on)."""
        tokens, runs, rule = self.tokens, self._runs, self.rule
        tokens.append(token)
        n = len(tokens)
        for period in range(1, min(rule.max_period, n - 1) + 1):
            runs[period] = runs[period] + 1 if tokens[n - 1 - period] == token else 0
        if self.period is None:
            for period in range(1, rule.max_period + 1):
                if runs[period] + period >= rule.span(period) and n >= rule.span(period):
                    self.period = period
                    break
        return self.period is not None

    def extend(self, tokens: Sequence[int]) -> bool:
        """Add several tokens; True once the caption loops."""
        looping = self.period is not None
        for token in tokens:
            looping = self.push(token)
        return looping
