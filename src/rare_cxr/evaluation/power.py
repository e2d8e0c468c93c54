"""How many test patients does a paired AUROC comparison need? A normal-approximation power
calculation from a measured interval (issue 18 item 8: sizing the `phantom_study` environment).

The paired tests of the project (`paired.py`) estimate a difference D = AUROC(model) -
AUROC(reference) with a standard error SE that comes from the test patients alone (conditional
on the trained weights). Measured once on n0 test patients, SE0 is read back from the paired
95% interval: SE0 = (high - low) / (2 z_{1 - (1 - confidence) / 2}) -- the bootstrap interval
is a percentile one, so this is the SE of the normal interval of the same width. Assuming the SE
scales as 1 / sqrt(test patients) (independent patients, same case mix, same models), the SE on
n patients is SE0 sqrt(n0 / n), and a two-sided test at level alpha detects a true difference
delta with probability `power` when

    delta >= (z_{1 - alpha/2} + z_power) SE0 sqrt(n0 / n)
    <=>  n >= n0 ((z_{1 - alpha/2} + z_power) SE0 / delta)^2.

The same formula, with the sd of the per-seed differences in place of SE0 sqrt(n0) and seeds in
place of patients, gives the seeds needed for the difference to hold across retrainings (a
question the conditional test does not answer; `paired.py`'s docstring).

Why hand-written rather than statsmodels: statsmodels is not a dependency, and the formula is the
textbook z-test sample size (e.g. Chow, Shao & Wang, "Sample Size Calculations in Clinical
Research", 2nd ed., section 3.1), two lines with `statistics.NormalDist`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist, stdev


def _z(p: float) -> float:
    return NormalDist().inv_cdf(p)


def _check(alpha: float, power: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected in (0, 1), got {alpha!r}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power: expected in (0, 1), got {power!r}")


def se_from_interval(low: float, high: float, confidence: float = 0.95) -> float:
    """The standard error whose normal `confidence` interval is as wide as [low, high]."""
    if not high > low:
        raise ValueError(f"interval: expected low < high, got [{low!r}, {high!r}]")
    return (high - low) / (2.0 * _z(0.5 + confidence / 2.0))


def z_sum(alpha: float = 0.05, power: float = 0.80) -> float:
    """z_{1 - alpha/2} + z_power (two-sided test): 2.80 for alpha 0.05 and power 0.80."""
    _check(alpha, power)
    return _z(1.0 - alpha / 2.0) + _z(power)


def required_units(
    delta: float, se0: float, n0: float, alpha: float = 0.05, power: float = 0.80
) -> int:
    """Units (test patients, or seeds with se0 = seed sd and n0 = 1) for a two-sided test at
    `alpha` to detect a true difference `delta` with probability `power`, when the SE measured
    on `n0` units was `se0` and scales as 1 / sqrt(units): n0 (z_sum se0 / delta)^2, rounded up."""
    if not delta > 0 or not se0 > 0 or not n0 > 0:
        raise ValueError(f"expected delta, se0, n0 > 0, got {delta!r}, {se0!r}, {n0!r}")
    return math.ceil(n0 * (z_sum(alpha, power) * se0 / delta) ** 2 - 1e-9)


def detectable_delta(
    n: float, se0: float, n0: float, alpha: float = 0.05, power: float = 0.80
) -> float:
    """The smallest true difference detected with probability `power` on `n` units."""
    if not n > 0:
        raise ValueError(f"n: expected > 0, got {n!r}")
    return z_sum(alpha, power) * se0 * math.sqrt(n0 / n)


def seed_sd(per_seed_deltas: Sequence[float]) -> float:
    """The sd (n - 1) of the per-seed differences: the variation between retrainings."""
    if len(per_seed_deltas) < 2:
        raise ValueError("per_seed_deltas: need at least two seeds for an sd")
    return stdev(float(d) for d in per_seed_deltas)
