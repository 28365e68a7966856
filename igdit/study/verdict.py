"""How the study decides whether a claim holds: t tests at a stated level, corrected for the comparisons of a claim.

Every comparison is claimed-side minus baseline-side over seeds: a paired t test when both sides come from the same
runs (one checkpoint sampled two ways), Welch's t test otherwise (two arms), through ``scipy.stats``. It reports the
difference with its 95% confidence interval (two-sided, t distribution with the test's degrees of freedom), the
one-sided p-value in the direction the paper claims, and the minimum detectable effect: the smallest true difference
this number of seeds would have detected with 80% power, given the measured spread.

The comparisons of one claim form a family: Holm–Bonferroni keeps the chance of any false "holds" in it at α. A
comparison **holds** when its Holm-adjusted one-sided p is at most α, **does not hold** when the Holm-adjusted p of
the opposite direction is, and is **inconclusive** otherwise (always with one seed: no spread, no test). Where the
values have no spread at all (both sides tied on every seed, as a step count read at evaluation intervals can be, or
the same paired difference on every seed), the t statistic is undefined and the exact sign test (paired) or
permutation test (two arms) gives the p-value instead. A claim holds
when all its comparisons hold and does not hold when any does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
from scipy import stats

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
ALPHA, POWER = 0.05, 0.80


def rule(alpha: float = ALPHA) -> str:
    """The verdict rule as the report states it."""
    return (f"one-sided t tests in the direction each paper claims (paired when both sides come from the same runs, "
            f"Welch's otherwise), at α = {alpha:g} with Holm–Bonferroni across the comparisons of one claim: a "
            f"comparison holds when its Holm-adjusted p ≤ {alpha:g}, does not hold when the opposite direction's "
            f"is, and is inconclusive otherwise (always with a single seed); where the values have no spread at "
            f"all (a step count tied on every seed) the exact sign test (paired) or permutation test replaces the "
            f"undefined t statistic. Each comparison gives the difference "
            f"with its 95% confidence interval and, when inconclusive, the smallest difference these seeds would have "
            f"detected with {POWER:.0%} power (the minimum detectable effect, MDE, at Holm's strictest level α/m). "
            f"The claims are separate questions: no correction is made across them, so among k claims that are all "
            f"false about α·k would be called 'holds' by chance")


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
    n, mean = len(values), float(np.mean(values))
    if n == 1:
        return Estimate(mean, None, 1)
    return Estimate(mean, float(np.std(values, ddof=1) / math.sqrt(n)), n)


@dataclass
class Comparison:
    """``claimed`` against ``baseline`` on a metric where ``better`` is "lower" or "higher".

    difference: mean(claimed) - mean(baseline) (paired: the mean per-seed difference). se, df: its standard error and
    the t test's degrees of freedom (None with fewer than two values a side). ci: 95% two-sided interval. p: one-sided
    p-value in the claimed direction, p_against in the other. mde: see ``minimum_detectable_effect``. p_holm,
    verdict: set by ``decide`` for the comparison's family."""

    label: str
    better: Literal["lower", "higher"]
    paired: bool
    difference: float
    n: tuple[int, int]
    se: Optional[float] = None
    df: Optional[float] = None
    ci: Optional[tuple[float, float]] = None
    p: Optional[float] = None
    p_against: Optional[float] = None
    mde: Optional[float] = None
    p_holm: Optional[float] = None
    p_holm_against: Optional[float] = None
    verdict: str = INCONCLUSIVE
    family: int = 1

    @property
    def test(self) -> str:
        if self.se == 0:  # no spread: the exact test that replaces the undefined t statistic
            return "sign test" if self.paired else "permutation test"
        return "paired t" if self.paired else "Welch t"

    def __str__(self) -> str:
        """One line for a report: difference [95% CI] (test, df, p, Holm p) → verdict; the MDE when inconclusive."""
        if self.p is None:
            return f"{self.difference:+.3g} (n = {self.n[0]}, no spread to test) → {self.verdict}"
        holm = "" if self.family == 1 else f", Holm p {self.p_holm:.2g}"
        if self.se == 0:
            return f"{self.difference:+.3g}, the same on every seed ({self.test}, p {self.p:.2g}{holm}) → {self.verdict}"
        ci = f"[{self.ci[0]:+.3g}, {self.ci[1]:+.3g}]"
        text = f"{self.difference:+.3g} {ci} ({self.test}, df {self.df:.3g}, p {self.p:.2g}{holm}) → {self.verdict}"
        if self.verdict == INCONCLUSIVE and self.mde is not None:
            text += f"; MDE {self.mde:.2g}"
        return text


def minimum_detectable_effect(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """The smallest true difference a one-sided t test at level ``alpha`` detects with probability ``power``, given
    the standard error ``se`` of the difference on ``df`` degrees of freedom: (t_{1-α, df} + t_{power, df}) · se."""
    return float((stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df)) * se)


def compare(claimed: Sequence[float], baseline: Sequence[float], better: Literal["lower", "higher"],
            paired: bool = False, label: str = "") -> Comparison:
    """The t test of ``claimed`` against ``baseline`` (paired: both lists come from the same seeds in the same order).

    The verdict is left inconclusive until ``decide`` sees the comparison's family."""
    a, b = np.asarray(claimed, float), np.asarray(baseline, float)
    if paired and len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} values")
    difference = float(np.mean(a - b) if paired else np.mean(a) - np.mean(b))
    c = Comparison(label, better, paired, difference, (len(a), len(b)))
    if (len(a) if paired else min(len(a), len(b))) < 2:
        return c  # one seed: no spread, no test
    alternative = "less" if better == "lower" else "greater"
    if paired:
        se = float(np.std(a - b, ddof=1)) / math.sqrt(len(a))
        test = stats.ttest_rel
    else:
        se = math.sqrt(float(np.var(a, ddof=1)) / len(a) + float(np.var(b, ddof=1)) / len(b))
        test = lambda x, y, alternative: stats.ttest_ind(x, y, equal_var=False, alternative=alternative)  # noqa: E731
    c.se = se
    if se == 0:
        # Identical values on each side (or identical paired differences), common for a step count read at evaluation
        # intervals: the t statistic is undefined, and calling it certain would let two seeds decide. The exact tests
        # for such data: paired, the sign test (every seed moved the same way: 0.5^n); otherwise the permutation test
        # (the chance that n_a of the pooled values, drawn at random, all fall on the claimed side: 1 / C(n_a+n_b, n_a)).
        chance = 0.5 ** len(a) if paired else 1.0 / math.comb(len(a) + len(b), len(a))
        toward = difference < 0 if better == "lower" else difference > 0
        away = difference > 0 if better == "lower" else difference < 0
        c.p, c.p_against = (chance if toward else 1.0), (chance if away else 1.0)
        return c
    one_sided, two_sided = test(a, b, alternative=alternative), test(a, b, alternative="two-sided")
    c.df = float(one_sided.df)
    interval = two_sided.confidence_interval(0.95)
    c.ci = (float(interval.low), float(interval.high))
    c.p = float(one_sided.pvalue)
    c.p_against = 1.0 - c.p
    return c


def compare_effects(arm: Sequence[float], base: Sequence[float], arm_ref: Sequence[float], base_ref: Sequence[float],
                    better: Literal["lower", "higher"], label: str = "") -> Comparison:
    """Whether an arm's effect changes between two settings (a deeper model and the reference one): the difference of
    differences (mean(arm) - mean(base)) - (mean(arm_ref) - mean(base_ref)) of four independent groups, with Welch's
    standard error and the Welch–Satterthwaite degrees of freedom, tested one-sided on the t distribution."""
    groups = [np.asarray(g, float) for g in (arm, base, arm_ref, base_ref)]
    difference = float(groups[0].mean() - groups[1].mean() - (groups[2].mean() - groups[3].mean()))
    c = Comparison(label, better, False, difference, (len(groups[0]), len(groups[2])))
    if min(len(g) for g in groups) < 2:
        return c
    parts = [float(g.var(ddof=1)) / len(g) for g in groups]
    se = math.sqrt(sum(parts))
    if se == 0:
        return c
    df = sum(parts) ** 2 / sum(p ** 2 / (len(g) - 1) for p, g in zip(parts, groups))
    t = difference / se
    c.se, c.df = se, float(df)
    half = float(stats.t.ppf(0.975, df)) * se
    c.ci = (difference - half, difference + half)
    c.p = float(stats.t.cdf(t, df) if better == "lower" else stats.t.sf(t, df))
    c.p_against = 1.0 - c.p
    return c


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the given order: the i-th smallest p times (m - i + 1), made monotone."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def decide(comparisons: Sequence[Comparison], alpha: float = ALPHA) -> list[Comparison]:
    """Set the verdict of each comparison of one claim (a family), with Holm's correction over the family; the MDE is
    computed at α/m, the level Holm applies to the family's smallest p."""
    tested = [c for c in comparisons if c.p is not None]
    for c in comparisons:
        c.family = max(1, len(comparisons))
        if c.p is None:
            c.verdict = INCONCLUSIVE
    if not tested:
        return list(comparisons)
    for c, p, p_against in zip(tested, holm([c.p for c in tested]), holm([c.p_against for c in tested])):
        c.p_holm, c.p_holm_against = p, p_against
        c.verdict = HOLDS if p <= alpha else FAILS if p_against <= alpha else INCONCLUSIVE
        if c.se:
            c.mde = minimum_detectable_effect(c.se, c.df, alpha / len(comparisons))
    return list(comparisons)


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons: holds if all hold, does not hold if any fails, else
    inconclusive."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == FAILS for v in verdicts):
        return FAILS
    return INCONCLUSIVE


# ---- training curves --------------------------------------------------------------------------------------------
def first_step_reaching(curve: dict[int, float], target: float) -> Optional[int]:
    """The first evaluated step whose value is at or below ``target`` (None: never within the curve)."""
    return next((step for step in sorted(curve) if curve[step] <= target), None)


def area_under_log_curve(curve: dict[int, float]) -> float:
    """The mean of log(value) over the curve's span of steps (trapezoidal rule): one number for a whole training
    curve, lower when a run gets low sooner and stays there. Needs at least two evaluated steps."""
    steps = sorted(curve)
    if len(steps) < 2:
        raise ValueError("an area under a curve needs at least two evaluated steps")
    logs = np.log([curve[s] for s in steps])
    return float(np.trapezoid(logs, steps) / (steps[-1] - steps[0]))


@dataclass
class Family:
    """The comparisons of one claim, decided together."""

    comparisons: list[Comparison] = field(default_factory=list)

    def add(self, comparison: Comparison) -> Comparison:
        self.comparisons.append(comparison)
        return comparison

    def decide(self, alpha: float = ALPHA) -> str:
        decide(self.comparisons, alpha)
        return combine([c.verdict for c in self.comparisons])
