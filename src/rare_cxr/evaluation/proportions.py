"""Binomial intervals for per-finding proportions where the percentile bootstrap degenerates.

Why: a percentile bootstrap of "4 of 4 positives detected" resamples only 4/4s and prints
recall [1.000, 1.000]; with two positive patients every resample repeats the same two. An
interval from the binomial distribution does not collapse: Clopper-Pearson (1934, "exact",
guaranteed coverage, the default) or Wilson (1927, score interval, shorter, close to nominal
coverage). Both are textbook; scipy computes them in `scipy.stats.binomtest(...).proportion_ci`,
which works on one integer count at a time, so the vectorised forms are written here from the
beta quantiles (Clopper-Pearson) and the closed form (Wilson) and tested against scipy.

Patients, not films: a finding's films are not independent (follow-ups of one patient), so the
counts are scaled to the patients behind the denominator before the interval is taken:
n_eff = distinct patients among the denominator's films, k_eff = k * n_eff / n (the design
effect of films that always agree within a patient: the most conservative choice). With one
film per patient n_eff = n and this is the textbook interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import beta, norm

NAN = float("nan")
PROPORTION_METHODS = ("exact", "wilson")
# how the report names them
METHOD_LABELS = {"exact": "Clopper-Pearson (patients)", "wilson": "Wilson (patients)"}


def proportion_interval(
    k: float | np.ndarray | Sequence[float],
    n: float | np.ndarray | Sequence[float],
    confidence: float = 0.95,
    method: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided interval of a binomial proportion k / n, element-wise; NaN where n == 0.

    `exact` (Clopper-Pearson): [B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)] with B the beta quantile,
    0 at k = 0 and 1 at k = n. `wilson`: the score interval. k and n may be non-integer
    (effective counts), where the same formulas apply.
    """
    if method not in PROPORTION_METHODS:
        raise ValueError(
            f"reporting.proportion_interval: expected one of {PROPORTION_METHODS}, got {method!r}"
        )
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence!r}")
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"proportion: expected 0 <= k <= n, got k={k!r}, n={n!r}")
    alpha = 1.0 - c
    ok = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "exact":
            low = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
            high = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
        else:
            z = norm.ppf(1 - alpha / 2)
            p = k / n
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    return np.where(ok, low, NAN), np.where(ok, high, NAN)


def patient_counts(k: float, n: float, n_patients: int) -> tuple[float, float]:
    """(k_eff, n_eff): k successes of n films scaled to the `n_patients` behind the n films."""
    if n <= 0:
        return 0.0, 0.0
    n_eff = float(min(n_patients, n))
    return float(k) * n_eff / float(n), n_eff
