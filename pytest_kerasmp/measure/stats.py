"""The statistics behind a comparison's interval and the gate: pure functions, no pytest.

A comparison times its two sides in alternating rounds, so round *i* gives a pair
(baseline_i, candidate_i) measured under the same machine load. Its ratio is estimated as the
median of the per-round ratios baseline_i / candidate_i, and its interval is the
distribution-free confidence interval for that median from order statistics (the sign-test
interval): with n ratios sorted, ``[r(k), r(n-k+1)]`` covers the true median with probability
at least ``1 - 2 * P(Binomial(n, 1/2) < k)`` whatever the noise's distribution, heavy tails
included. No resampling, so the same rounds always give the same interval. Fewer than 6 rounds
cannot reach 95%: the interval is then reported at the level those rounds reach.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

#: The confidence level of every interval the plugin reports and gates on.
LEVEL = 0.95

Outcome = Literal["met", "missed", "inconclusive"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A ratio's point estimate and confidence interval; ``level`` is the coverage reached."""

    estimate: float
    low: float
    high: float
    level: float
    rounds: int

    @property
    def complete(self) -> bool:
        """Whether the interval reaches :data:`LEVEL` (enough rounds)."""
        return self.level >= LEVEL - 1e-12

    def text(self, fmt: str = "{:.2f}x") -> str:
        inner = f"[{fmt.format(self.low)}, {fmt.format(self.high)}]"
        level = "" if self.complete else f" ({self.level:.0%} only: {self.rounds} rounds)"
        return f"{fmt.format(self.estimate)} {inner}{level}"


def _binom_cdf_half(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return float(sum(math.comb(n, i) for i in range(k + 1))) / float(2**n)


def median_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage) for the median of ``values``: the narrowest order-statistic interval
    whose coverage is at least ``level``, or ``[min, max]`` and its lower coverage when too few."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    best_k, coverage = 1, 1 - 2 * _binom_cdf_half(0, n)
    for k in range(2, n // 2 + 1):
        cov = 1 - 2 * _binom_cdf_half(k - 1, n)
        if cov < level:
            break
        best_k, coverage = k, cov
    return xs[best_k - 1], xs[n - best_k], coverage


def ratio_interval(baseline_s: Sequence[float], candidate_s: Sequence[float], level: float = LEVEL) -> Interval:
    """The interval of baseline/candidate from paired rounds (one pair per round)."""
    if len(baseline_s) != len(candidate_s) or not baseline_s:
        raise ValueError(f"need paired rounds, got {len(baseline_s)} and {len(candidate_s)}")
    ratios = [b / max(c, 1e-12) for b, c in zip(baseline_s, candidate_s, strict=True)]
    low, high, coverage = median_interval(ratios, level)
    xs = sorted(ratios)
    n = len(xs)
    estimate = xs[n // 2] if n % 2 else math.sqrt(xs[n // 2 - 1] * xs[n // 2])
    return Interval(estimate, low, high, coverage, n)


def decide(interval: Interval, floor: float) -> Outcome:
    """met: the whole interval at or above ``floor``; missed: the whole interval below it;
    inconclusive: it straddles the floor, or it does not yet reach :data:`LEVEL`."""
    if not interval.complete:
        return "inconclusive"
    if interval.low >= floor:
        return "met"
    if interval.high < floor:
        return "missed"
    return "inconclusive"


def next_look(rounds: int) -> int:
    """Rounds at the next look when adaptive rounds continue: at least 6 (the fewest that reach
    95%), then half as many again each time, so the interval is looked at a few times, not after
    every round (each look is a chance to stop on a lucky interval)."""
    return max(6, rounds + max(2, rounds // 2))


def significantly_lower(new: Interval, old: Interval) -> bool:
    """Whether ``new`` is a significant regression from ``old``: both complete and the new
    interval lies wholly below the old one."""
    return new.complete and old.complete and new.high < old.low
