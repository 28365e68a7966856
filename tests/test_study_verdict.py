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
