"""The study's verdict rule on synthetic numbers, against scipy.stats and hand computations: paired and Welch t
tests one-sided in the paper's direction, 95% intervals, Holm across a claim's comparisons, the minimum detectable
effect, and the training-curve metrics."""
import math

import numpy as np
import pytest
from scipy import stats

from igdit.study.verdict import (FAILS, HOLDS, INCONCLUSIVE, area_under_log_curve, combine, compare, compare_effects,
                                 decide, estimate, first_step_reaching, holm, minimum_detectable_effect)


def test_estimate_is_the_mean_and_its_standard_error():
    e = estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.se == pytest.approx(math.sqrt(1.0 / 3)) and e.n == 3
    assert estimate([5.0]).se is None


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("better", ["lower", "higher"])
def test_p_values_and_intervals_are_scipys_t_tests(paired, better):
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 5), rng.normal(1.6, 0.5, 5)
    c = compare(a, b, better, paired=paired)
    alternative = "less" if better == "lower" else "greater"
    if paired:
        ref, both = stats.ttest_rel(a, b, alternative=alternative), stats.ttest_rel(a, b)
    else:
        ref, both = (stats.ttest_ind(a, b, equal_var=False, alternative=alternative),
                     stats.ttest_ind(a, b, equal_var=False))
    assert c.p == pytest.approx(ref.pvalue) and c.df == pytest.approx(ref.df)
    assert c.p + c.p_against == pytest.approx(1.0)
    interval = both.confidence_interval(0.95)
    assert c.ci == pytest.approx((interval.low, interval.high))
    # the standard error by hand: of the per-seed differences (paired), Welch's otherwise
    se = np.std(a - b, ddof=1) / math.sqrt(5) if paired else math.sqrt(np.var(a, ddof=1) / 5 + np.var(b, ddof=1) / 5)
    assert c.se == pytest.approx(se)
    assert c.difference == pytest.approx(np.mean(a) - np.mean(b))
    # Welch's degrees of freedom, by hand
    if not paired:
        va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 5
        assert c.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 4))


def test_where_the_old_two_standard_error_rule_and_the_t_test_disagree():
    # paired over three seeds: per-seed differences m + (-1, 0, 1) have standard error 1/sqrt(3), so t = m sqrt(3)
    baseline = np.array([10.0, 20.0, 30.0])

    def paired_at(t):
        return decide([compare(baseline + t / math.sqrt(3) + np.array([-1.0, 0.0, 1.0]), baseline, "lower",
                               paired=True)])[0]

    c = paired_at(-2.5)
    assert c.difference / c.se == pytest.approx(-2.5)
    assert abs(c.difference) > 2 * c.se  # the old rule said "holds"
    assert c.p == pytest.approx(stats.t.cdf(-2.5, 2)) and c.p > 0.05  # one-sided p 0.065 on 2 df
    assert c.verdict == INCONCLUSIVE
    assert paired_at(-3.2).verdict == HOLDS  # past the one-sided 5% threshold on 2 df (2.92)
    assert paired_at(-4.5).verdict == HOLDS and paired_at(4.5).verdict == FAILS


@pytest.mark.parametrize("claimed,baseline,better,paired,verdict", [
    ([1.0, 1.1, 0.9, 1.05, 0.95], [3.0, 3.1, 2.9, 3.05, 2.95], "lower", False, HOLDS),
    ([3.0, 3.1, 2.9, 3.05, 2.95], [1.0, 1.1, 0.9, 1.05, 0.95], "lower", False, FAILS),
    ([1.0, 3.0, 2.0], [2.0, 1.5, 2.5], "lower", False, INCONCLUSIVE),
    ([0.9, 0.95, 0.92], [0.5, 0.55, 0.52], "higher", False, HOLDS),
    ([1.0], [3.0], "lower", False, INCONCLUSIVE),                         # one seed: no spread, no test
    ([10.0, 20.0, 30.0], [10.5, 20.6, 30.4], "lower", True, HOLDS),       # paired removes the between-seed spread
    ([10.0, 20.0, 30.0], [10.5, 20.6, 30.4], "lower", False, INCONCLUSIVE),
])
def test_the_rule_decides_from_the_numbers(claimed, baseline, better, paired, verdict):
    c = decide([compare(claimed, baseline, better, paired)])[0]
    assert c.verdict == verdict
    if len(claimed) == 1:
        assert c.p is None and "no spread" in str(c)


def test_holm_by_hand_and_a_family_of_three():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, 0.001]) == pytest.approx([0.2, 0.002])
    # three comparisons whose raw one-sided p are about 0.01, 0.04, 0.03: alone each "holds", in one family only one
    comparisons = []
    for target in (0.01, 0.04, 0.03):
        t = stats.t.ppf(target, 4)  # a paired test on 5 seeds with this one-sided p
        d = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
        d = d / d.std(ddof=1) * math.sqrt(5)  # standard error 1
        comparisons.append(compare(d + t, np.zeros(5), "lower", paired=True))
    assert [c.p for c in comparisons] == pytest.approx([0.01, 0.04, 0.03])
    decide(comparisons)
    assert [c.verdict for c in comparisons] == [HOLDS, INCONCLUSIVE, INCONCLUSIVE]
    assert [c.p_holm for c in comparisons] == pytest.approx([0.03, 0.06, 0.06])
    assert combine([c.verdict for c in comparisons]) == INCONCLUSIVE
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([HOLDS, FAILS]) == FAILS


def test_the_minimum_detectable_effect_by_hand_and_its_power():
    # (t_{0.95, 4} + t_{0.80, 4}) * se = (2.1318 + 0.9410) * 1
    assert minimum_detectable_effect(1.0, 4, 0.05) == pytest.approx(2.1318 + 0.9410, abs=1e-3)
    assert minimum_detectable_effect(0.5, 10, 0.05 / 3) == pytest.approx(
        0.5 * (stats.t.ppf(1 - 0.05 / 3, 10) + stats.t.ppf(0.8, 10)))
    # a true difference of one MDE is detected about 80% of the time (noncentral t; the formula is the usual
    # approximation)
    se, df = 1.0, 8
    mde = minimum_detectable_effect(se, df, 0.05)
    power = stats.nct.sf(stats.t.ppf(0.95, df), df, mde / se)
    assert 0.75 < power < 0.85
    # an inconclusive comparison reports it, at alpha / m for a family of m
    a, b = [1.0, 3.0, 2.0, 2.5], [2.0, 1.5, 2.5, 2.2]
    pair = decide([compare(a, b, "lower"), compare(a, b, "lower")])
    assert pair[0].verdict == INCONCLUSIVE
    assert pair[0].mde == pytest.approx(minimum_detectable_effect(pair[0].se, pair[0].df, 0.025))
    assert "MDE" in str(pair[0])


def test_values_without_spread_are_decided_by_the_exact_tests_not_called_certain():
    # Two arms, every seed tied: of the C(6, 3) = 20 ways to split the pooled values, one puts the claimed arm lowest.
    three = decide([compare([2.0, 2.0, 2.0], [3.0, 3.0, 3.0], "lower")])[0]
    assert three.p == pytest.approx(1 / 20) and three.verdict == HOLDS and "permutation test" in str(three)  # p ≤ α
    four = decide([compare([1800.0] * 4, [2000.0] * 4, "lower")])[0]
    assert four.p == pytest.approx(1 / 70) and four.verdict == HOLDS  # 4 seeds a side all earlier: p 0.014
    # Two seeds on each side (the old rule called this certain): 1 / C(4, 2) = 1/6
    two = decide([compare([1800.0, 1800.0], [2000.0, 2000.0], "lower")])[0]
    assert two.p == pytest.approx(1 / 6) and two.verdict == INCONCLUSIVE
    worse = decide([compare([3.0] * 5, [2.0] * 5, "lower")])[0]
    assert worse.p == 1.0 and worse.p_against == pytest.approx(1 / 252) and worse.verdict == FAILS
    # Paired, the same difference on every seed: the sign test, 0.5^n
    paired = [compare([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.5, 3.5, 4.5, 5.5], "lower", paired=True)]
    assert decide(paired)[0].p == pytest.approx(0.5 ** 5) and paired[0].verdict == HOLDS and "sign test" in str(paired[0])
    assert decide([compare([1.0, 2.0], [1.5, 2.5], "lower", paired=True)])[0].verdict == INCONCLUSIVE  # p 0.25
    assert decide([compare([2.0, 2.0], [2.0, 2.0], "lower", paired=True)])[0].verdict == INCONCLUSIVE
    with pytest.raises(ValueError):
        compare([1.0, 2.0], [1.0], "lower", paired=True)


def test_the_difference_of_two_effects_by_hand():
    rng = np.random.default_rng(1)
    groups = [rng.normal(m, s, 5) for m, s in ((1.0, 0.2), (2.0, 0.3), (0.5, 0.1), (2.5, 0.4))]
    c = compare_effects(*groups, "lower")
    means = [g.mean() for g in groups]
    parts = [g.var(ddof=1) / 5 for g in groups]
    assert c.difference == pytest.approx((means[0] - means[1]) - (means[2] - means[3]))
    assert c.se == pytest.approx(math.sqrt(sum(parts)))
    assert c.df == pytest.approx(sum(parts) ** 2 / sum(p ** 2 / 4 for p in parts))
    assert c.p == pytest.approx(stats.t.cdf(c.difference / c.se, c.df))
    # effect at depth 12: -1.0; at depth 6: -2.0 -> the effect shrank (difference +1): not "lower"
    assert c.difference > 0 and decide([c])[0].verdict in (FAILS, INCONCLUSIVE)


def test_curve_metrics_on_synthetic_curves():
    curve = {200: 100.0, 400: 10.0, 600: 3.0, 800: 2.0}
    assert first_step_reaching(curve, 3.0) == 600
    assert first_step_reaching(curve, 2.5) == 800
    assert first_step_reaching(curve, 1.0) is None
    # mean of log over 200..800 by the trapezoidal rule, by hand
    logs = [math.log(v) for v in curve.values()]
    by_hand = sum((logs[i] + logs[i + 1]) / 2 * 200 for i in range(3)) / 600
    assert area_under_log_curve(curve) == pytest.approx(by_hand)
    # a curve that gets low sooner has the smaller area, though both end at the same value
    assert area_under_log_curve({200: 100.0, 400: 3.0, 600: 2.5, 800: 2.0}) < area_under_log_curve(curve)
    with pytest.raises(ValueError):
        area_under_log_curve({200: 1.0})


class _Runs:
    """Stands in for the study's Results: final FD per arm over three seeds, flat curves, one probe step."""

    def __init__(self, fd: dict[str, list[float]]):
        from types import SimpleNamespace

        from igdit.study.spec import Probe

        self.fd, self.spec = fd, SimpleNamespace(probe=Probe(), alpha=0.05)

    def has(self, *arms):
        return all(a in self.fd for a in arms)

    def common_step(self, *arms):
        return 800

    def logged_fd(self, arm, setting="none", step=None):
        return self.fd[arm]

    def curve(self, arm, setting="none", until=None):
        return {800: self.fd[arm]}

    def probes(self, arm, until=None):
        return {800: [0.8, 0.81, 0.79] if arm == "plain" else [0.9, 0.91, 0.89]}


def test_self_transcendence_reports_its_ablation_beside_a_verdict_that_is_st_against_plain():
    from igdit.study.claims import claim_self_transcendence

    runs = {"plain": [12.0, 12.2, 11.8], "st": [8.0, 8.1, 7.9]}
    alone = claim_self_transcendence(_Runs(runs))
    assert alone.verdict == HOLDS and not alone.notes
    # omega 1 is clearly worse than the default (as in ST Table 5); the same-block student clearly better (against it)
    claim = claim_self_transcendence(_Runs(runs | {"st_omega_1": [10.0, 10.1, 9.9], "st_same_block": [5.0, 5.1, 4.9]}))
    assert claim.verdict == HOLDS  # the ablation does not move ST's own verdict
    omega, block = claim.notes
    assert "ω 1" in omega and f"→ {HOLDS}" in omega and "29.30" in omega
    assert "student block = teacher block" in block and f"→ {FAILS}" in block
    labels = [row[0] for row in claim.rows]
    assert labels.index("ST (both stages, per-sample t-range)") < labels.index(
        "ST, student block = teacher block") < labels.index("  plain")
    assert claim.rows[labels.index("ST, ω 1 (the teacher's conditional features, no sharpening)")][1] == "10 ± 0.058"


def test_self_transcendence_decides_on_the_public_codes_t_range_and_reports_the_other():
    from igdit.study.claims import claim_self_transcendence

    runs = {"plain": [12.0, 12.2, 11.8], "st": [8.0, 8.1, 7.9], "st_broadcast": [13.0, 13.1, 12.9]}
    claim = claim_self_transcendence(_Runs(runs))
    fd_vs_plain = next(c for c in claim.family.comparisons if c.label.endswith("vs plain (FD)"))
    assert "as the public code computes it" in fd_vs_plain.label and fd_vs_plain.verdict == FAILS
    assert claim.verdict == FAILS  # the per-sample arm's clear gain does not decide
    assert any("two t-range semantics" in note for note in claim.notes)
