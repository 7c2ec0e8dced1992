"""Task success as a rate with its 95 % Wilson score interval and the episodes behind it.

Closed-loop success is what a fleet operator judges a version by, and it is measured on few
episodes (tens, not thousands): a bare rate hides how little 7/10 says. Every success figure zk0
reports (benches, the demo, ``run-task`` results, evaluation history) is a ``SuccessRate``.
The Wilson interval stays inside [0, 1] and is sensible at 0/n and n/n, where the normal
approximation collapses to a point (Wilson 1927; Brown, Cai & DasGupta 2001).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Self

from pydantic import Field, model_validator

from zk0.shared.validation import WireModel

#: Two-sided 95 %: the standard normal's 0.975 quantile.
Z_95 = 1.959963984540054

Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=10**9)]


def wilson_interval(successes: int, episodes: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``episodes`` (``(0, 1)`` for none)."""
    if not 0 <= successes <= episodes:
        raise ValueError(f"successes must lie in [0, episodes], got {successes}/{episodes}")
    if episodes == 0:
        return 0.0, 1.0
    p = successes / episodes
    z2 = z * z
    centre = (p + z2 / (2 * episodes)) / (1 + z2 / episodes)
    half = z * math.sqrt(p * (1 - p) / episodes + z2 / (4 * episodes**2)) / (1 + z2 / episodes)
    # Clamp rounding at the ends: 0/n has low exactly 0, n/n has high exactly 1.
    return max(0.0, centre - half), min(1.0, centre + half)


class SuccessRate(WireModel):
    """``successes`` of ``episodes`` with the point estimate and its 95 % Wilson interval.

    ``rate`` is None where no episode counted (for example a real arm with no labelled
    episode): no number is better than a made-up one.
    """

    successes: Count
    episodes: Count
    rate: Fraction | None
    low: Fraction
    high: Fraction

    @classmethod
    def of(cls, successes: int, episodes: int) -> SuccessRate:
        low, high = wilson_interval(successes, episodes)
        rate = successes / episodes if episodes else None
        return cls(successes=successes, episodes=episodes, rate=rate, low=low, high=high)

    @classmethod
    def of_outcomes(cls, outcomes: Iterable[bool | None]) -> SuccessRate:
        """From per-episode outcomes; ``None`` (not known: unlabelled) does not count."""
        known = [bool(o) for o in outcomes if o is not None]
        return cls.of(sum(known), len(known))

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.successes > self.episodes:
            raise ValueError(f"successes {self.successes} exceed episodes {self.episodes}")
        low, high = wilson_interval(self.successes, self.episodes)
        if abs(self.low - low) > 1e-9 or abs(self.high - high) > 1e-9:
            raise ValueError("low/high are not the Wilson interval of successes/episodes")
        expected = self.successes / self.episodes if self.episodes else None
        if (expected is None) != (self.rate is None) or (
            expected is not None and self.rate is not None and abs(self.rate - expected) > 1e-9
        ):
            raise ValueError("rate is not successes/episodes")
        return self

    def describe(self) -> str:
        """``7/10 = 70% [40, 89] %``, or ``no episodes``."""
        if self.rate is None:
            return "no episodes"
        return (
            f"{self.successes}/{self.episodes} = {self.rate:.0%} "
            f"[{self.low * 100:.0f}, {self.high * 100:.0f}] %"
        )
