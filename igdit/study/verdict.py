"""How the study decides whether a claim holds: means, standard errors and a stated rule, computed from the numbers.

Rule: the difference between two arms (or two settings on the same runs) counts when it exceeds two standard errors
of the difference. In the direction the paper claims: **holds**; in the other: **does not hold**; within two
standard errors (or with one seed, where no spread can be measured): **inconclusive at this scale**.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
RULE = ("a difference counts when it exceeds two standard errors of the difference (paired over seeds when both "
        "sides come from the same runs); within that, or with a single seed, the verdict is inconclusive")


@dataclass
class Estimate:
    """Mean and standard error of the mean of ``n`` values (se None for one value)."""

    mean: float
    se: float | None
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3g}" if self.se is None else f"{self.mean:.3g} ± {self.se:.2g}"


def estimate(values: Sequence[float]) -> Estimate:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to estimate from")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return Estimate(mean, None, 1)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


@dataclass
class Comparison:
    """``better`` against ``baseline`` on a metric where ``lower`` or ``higher`` is better."""

    difference: Estimate  # better - baseline
    verdict: str
    paired: bool

    def __str__(self) -> str:
        return f"{self.difference} ({'paired' if self.paired else 'unpaired'})"


def compare(claimed: Sequence[float], baseline: Sequence[float], better: Literal["lower", "higher"],
            paired: bool = False) -> Comparison:
    """Is ``claimed`` better than ``baseline`` by more than two standard errors of the difference?

    paired: both lists come from the same seeds in the same order (e.g. one checkpoint with and without IG): the
    difference is taken per seed, which removes the between-seed spread."""
    if paired:
        if len(claimed) != len(baseline):
            raise ValueError(f"paired comparison of {len(claimed)} and {len(baseline)} values")
        difference = estimate([a - b for a, b in zip(claimed, baseline)])
    else:
        a, b = estimate(claimed), estimate(baseline)
        se = None if a.se is None or b.se is None else math.sqrt(a.se ** 2 + b.se ** 2)
        difference = Estimate(a.mean - b.mean, se, min(a.n, b.n))
    sign = -1.0 if better == "lower" else 1.0
    if difference.se is None or difference.se == 0 and difference.mean == 0:
        verdict = INCONCLUSIVE
    elif sign * difference.mean > 2 * difference.se:
        verdict = HOLDS
    elif -sign * difference.mean > 2 * difference.se:
        verdict = FAILS
    else:
        verdict = INCONCLUSIVE
    return Comparison(difference, verdict, paired)


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons: holds if all hold, does not hold if any fails, else
    inconclusive."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == FAILS for v in verdicts):
        return FAILS
    return INCONCLUSIVE
