"""The 95 % Wilson interval every success figure carries (``zk0.shared.success``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zk0.shared.success import SuccessRate, wilson_interval


@pytest.mark.parametrize(
    ("successes", "episodes", "low", "high"),
    [
        # Reference values: Brown, Cai & DasGupta (2001), and R's prop.test(correct=FALSE).
        (7, 10, 0.3968, 0.8922),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (20, 40, 0.3520, 0.6480),
        (18, 30, 0.4232, 0.7541),
    ],
)
def test_wilson_interval_matches_reference_values(successes, episodes, low, high):
    got_low, got_high = wilson_interval(successes, episodes)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


def test_interval_narrows_with_episodes_and_contains_the_rate():
    widths = []
    for episodes in (10, 40, 160):
        rate = SuccessRate.of(episodes // 2, episodes)
        assert rate.low < rate.rate < rate.high  # type: ignore[operator]
        widths.append(rate.high - rate.low)
    assert widths[0] > widths[1] > widths[2]


def test_no_episodes_reports_no_rate():
    rate = SuccessRate.of_outcomes([None, None])
    assert rate.rate is None and rate.episodes == 0 and (rate.low, rate.high) == (0.0, 1.0)
    assert rate.describe() == "no episodes"
    assert SuccessRate.of_outcomes([True, None, False]).describe() == "1/2 = 50% [9, 91] %"


def test_a_peer_cannot_send_an_inconsistent_rate():
    honest = SuccessRate.of(3, 10).model_dump()
    with pytest.raises(ValidationError, match="Wilson"):
        SuccessRate.model_validate({**honest, "low": 0.0})
    with pytest.raises(ValidationError, match="exceed"):
        SuccessRate.model_validate({**honest, "successes": 11})
    with pytest.raises(ValueError, match="successes must lie"):
        wilson_interval(-1, 10)
