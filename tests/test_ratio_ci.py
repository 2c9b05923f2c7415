"""The bootstrap interval of a latency ratio (the report's ``latency.speedup_ci``)."""

import pytest

from hawada.core.profiler import ratio_ci
from tests.helpers import latency_result as result


def test_the_interval_holds_the_ratio_of_medians_and_narrows_with_less_spread():
    base = result([100.0 + (i % 7) for i in range(40)])  # median 103
    slim = result([50.0 + (i % 5) for i in range(40)])  # median 52
    lo, hi = ratio_ci(base, slim)
    assert lo <= 103.0 / 52.0 <= hi and hi - lo < 0.2
    noisy = result([50.0 + 3 * (i % 11) for i in range(40)])
    nlo, nhi = ratio_ci(base, noisy)
    assert nhi - nlo > hi - lo  # more spread, wider interval
    assert ratio_ci(base, slim) == (lo, hi)  # seeded: the same samples give the same interval


def test_identical_samples_give_a_point_interval_and_missing_samples_are_refused():
    same = result([10.0] * 20)
    assert ratio_ci(same, same) == pytest.approx((1.0, 1.0))
    no_samples = result([10.0])
    no_samples.samples_ms = []  # a result whose samples were not kept
    with pytest.raises(ValueError, match="samples"):
        ratio_ci(same, no_samples)
