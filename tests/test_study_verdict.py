"""The study's verdict rule on synthetic numbers: holds, does not hold, inconclusive."""
import math

import pytest

from igdit.study.verdict import FAILS, HOLDS, INCONCLUSIVE, combine, compare, estimate


def test_estimate_is_the_mean_and_its_standard_error():
    e = estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.se == pytest.approx(math.sqrt(1.0 / 3)) and e.n == 3
    assert estimate([5.0]).se is None


@pytest.mark.parametrize("claimed,baseline,better,paired,verdict", [
    ([1.0, 1.1, 0.9], [3.0, 3.1, 2.9], "lower", False, HOLDS),            # clearly lower FD
    ([3.0, 3.1, 2.9], [1.0, 1.1, 0.9], "lower", False, FAILS),            # clearly higher
    ([1.0, 3.0, 2.0], [2.0, 1.5, 2.5], "lower", False, INCONCLUSIVE),     # within the spread
    ([0.9, 0.95, 0.92], [0.5, 0.55, 0.52], "higher", False, HOLDS),       # accuracy: higher is better
    ([1.0], [3.0], "lower", False, INCONCLUSIVE),                         # one seed: no spread, no verdict
    # paired: a large between-seed spread but a consistent per-seed gain
    ([10.0, 20.0, 30.0], [10.5, 20.6, 30.4], "lower", True, HOLDS),
    ([10.0, 20.0, 30.0], [10.5, 20.6, 30.4], "lower", False, INCONCLUSIVE),
])
def test_the_rule_decides_from_the_numbers(claimed, baseline, better, paired, verdict):
    assert compare(claimed, baseline, better, paired).verdict == verdict


def test_a_claim_of_several_comparisons():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, FAILS]) == FAILS
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    with pytest.raises(ValueError):
        compare([1.0, 2.0], [1.0], "lower", paired=True)


class _Runs:
    """Stands in for the study's Results: final FD per arm over three seeds, flat curves, one probe step."""

    def __init__(self, fd: dict[str, list[float]]):
        from types import SimpleNamespace

        from igdit.study.spec import Probe

        self.fd, self.spec = fd, SimpleNamespace(probe=Probe())

    def has(self, *arms):
        return all(a in self.fd for a in arms)

    def logged_fd(self, arm, setting="none", step=None):
        return self.fd[arm]

    def curve(self, arm, setting="none"):
        return {800: self.fd[arm]}

    def probes(self, arm):
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
    assert labels.index("ST (both stages)") < labels.index("ST, student block = teacher block") < labels.index(
        "  plain")
    assert claim.rows[labels.index("ST, ω 1 (the teacher's conditional features, no sharpening)")][1] == "10 ± 0.058"
