"""Paired comparisons of two models on the same test images: DeLong, Holm, paired bootstrap.

Why paired: "model A beats model B" is a statement about a *difference* measured on the same
patients. Two marginal 95% intervals that overlap say little about it, because both models err
on the same hard images, so their metrics are strongly positively correlated and the variance of
the difference is much smaller than the sum of the variances. Every test here therefore keeps
the pairing: DeLong's covariance of correlated AUCs, and a bootstrap that applies the *same*
patient resample to both models (and to every training seed).

* Per finding, AUROC: DeLong, DeLong & Clarke-Pearson (1988, Biometrics 44:837) estimate the
  covariance of correlated AUCs from their structural components (V10 per positive, V01 per
  negative); Sun & Xu (2014, IEEE Signal Processing Letters 21:1389, "Fast implementation of
  DeLong's algorithm") obtain the components from midranks in O(N log N) instead of O(m n),
  ties counting one half as in the Mann-Whitney statistic. The components are linear in the
  scores' pairwise kernel, so a contrast of AUCs -- e.g. the mean over seeds of
  (AUC_model_s - AUC_ref_s) -- has an exact DeLong variance c' S c.
* Patients, not films, are the unit: NIH has many follow-up films per patient, and two films of
  one patient are not independent evidence. Plain DeLong treats every film as independent and
  understates the variance (tests/test_paired.py's simulation, 60 patients with ~9 films each:
  median SE 0.027 against 0.059 clustered, and two equal models "differ" at alpha 0.05 in
  37.5% of 200 test sets, 4.0% clustered). The
  per-finding test therefore uses Obuchowski's clustered DeLong (1997, Biometrics 53:567,
  "Nonparametric analysis of clustered ROC curve data"): the same per-film structural
  components, summed per patient, with the variance taken over patients --
  S10 = I10/(I10-1) sum_i T10_i^2 / m^2, S01 alike over the I01 patients with a negative film,
  and a cross term S11 = I/(I-1) sum_i T10_i T01_i / (m n) for patients with films on both
  sides (T10_i = sum over patient i's positive films of V10 - AUC; m, n films). With one film
  per patient this is DeLong exactly. With a single positive (or negative) patient the
  variance is undefined (NaN), whatever the number of films.
* Across the 14 findings: Holm's step-down adjustment (family-wise error), since a "wins on
  rare findings" claim looks at many p-values at once.
* Macro AUROC / AUPRC / F1: a paired *patient* bootstrap (the resamples of
  `bootstrap.patient_weights`, so the same seed reproduces the project's marginal intervals);
  every resample averages ONE set of findings, those defined for *both* models on the test set
  as is (the point estimate's), so the two sides of the difference always cover the same
  findings and every resample the same statistic. A resample that drew none of a rare
  finding's positive patients cannot compute that set: it is dropped from the interval and the
  p-value and counted (`resamples_dropped`).
* Seeds: the tests are conditional on the trained weights. With S seeds the tested quantity is
  the mean over these S trainings of the per-seed differences; its interval and p-value carry
  the test-sampling error only, not the variation between retrainings. That variation is
  reported beside them (`seed_sd`, the sd of the per-seed differences) and not folded in: with
  S = 3 seeds a resampling of seeds has 10 distinct outcomes, too few for an interval.

Conventions follow `metrics.py`: NaN means undefined (no positives, no negatives, no
validation threshold), never zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import pandas as pd

from rare_cxr.evaluation.bootstrap import (
    patient_weights,
    percentile_interval,
    weighted_auroc,
    weighted_average_precision,
    weighted_threshold_metrics,
)
from rare_cxr.findings import FINDINGS

NAN = float("nan")
MACRO_METRICS = ("auroc", "auprc", "f1")
ROW_COLUMNS = (
    "model",
    "reference",
    "finding",
    "metric",
    "delta",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "method",
    # additive (issue 18): the sd over seeds of the per-seed difference (training variation,
    # NaN with one seed) and the macro resamples dropped (`_macro_sets`; NA for DeLong rows)
    "seed_sd",
    "resamples_dropped",
)
BOOTSTRAP_METHOD = "paired patient bootstrap"
DELONG_METHOD = "clustered DeLong (patients, Obuchowski 1997)"
# AUCs live in [0, 1]; a contrast or a standard error below this is floating-point noise.
_ZERO_TOL = 1e-12


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence!r}")
    return c


def _binary_labels(y_true: np.ndarray, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name}: expected binary labels (0/1 or bool)")
    return y.astype(bool)


def _midranks(values: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """1-based midranks of `values` within `sorted_pool` (ties get their average rank)."""
    below = np.searchsorted(sorted_pool, values, side="left")
    up_to = np.searchsorted(sorted_pool, values, side="right")
    return (below + up_to + 1) / 2.0


def _structural_components(
    y: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs `[k]`, V10 `[k, m]` (per positive) and V01 `[k, n]` (per negative), Sun & Xu 2014.

    V10_i = (Tz_i - Tx_i) / n = share of negatives below positive i (ties one half);
    V01_j = 1 - (Tz_j - Ty_j) / m = share of positives above negative j.
    """
    x, z = s[:, y], s[:, ~y]
    m, n = x.shape[1], z.shape[1]
    v10 = np.empty_like(x)
    v01 = np.empty_like(z)
    for r in range(s.shape[0]):
        pooled = np.sort(s[r])
        tx = _midranks(x[r], np.sort(x[r]))
        ty = _midranks(z[r], np.sort(z[r]))
        v10[r] = (_midranks(x[r], pooled) - tx) / n
        v01[r] = 1.0 - (_midranks(z[r], pooled) - ty) / m
    return v10.mean(axis=1), v10, v01


def _as_score_matrix(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = _binary_labels(y_true)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"y_true: expected shape [N], got {y.shape}")
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != y.shape[0]:
        raise ValueError(
            f"scores: expected shape [k, N] with N = len(y_true) = {y.shape[0]}, got "
            f"{np.asarray(scores).shape}"
        )
    if not np.isfinite(s).all():
        raise ValueError("scores: non-finite values (NaN/inf) cannot be ranked")
    return y, s


def _cluster_codes(clusters: np.ndarray | Sequence | None, n: int) -> np.ndarray | None:
    """Integer codes `[N]` of the cluster (patient) of each film; None = every film its own."""
    if clusters is None:
        return None
    c = np.asarray(clusters)
    if c.shape != (n,):
        raise ValueError(
            f"clusters: expected one patient id per image ({n}), got shape {np.shape(clusters)}"
        )
    codes, _ = pd.factorize(pd.Series(c).astype(str))
    return codes


def _clustered_covariance(
    v10: np.ndarray, v01: np.ndarray, auc: np.ndarray, pos_codes: np.ndarray, neg_codes: np.ndarray
) -> np.ndarray:
    """Obuchowski's (1997) covariance `[k, k]` from per-film components and their patients.

    T10 `[k, K]` sums (V10 - AUC) over each patient's positive films, T01 (V01 - AUC) over its
    negative films; the variance is taken over patients: I10/(I10-1) T10 T10' / m^2 +
    I01/(I01-1) T01 T01' / n^2 + I/(I-1) (T10 T01' + T01 T10') / (m n). NaN with fewer than two
    patients on either side.
    """
    k, m, n = v10.shape[0], v10.shape[1], v01.shape[1]
    n_clusters = int(max(pos_codes.max(initial=-1), neg_codes.max(initial=-1))) + 1
    i10, i01 = np.unique(pos_codes).size, np.unique(neg_codes).size
    i_all = np.unique(np.r_[pos_codes, neg_codes]).size
    if i10 < 2 or i01 < 2:
        return np.full((k, k), NAN)
    t10 = np.stack(
        [np.bincount(pos_codes, weights=v10[r] - auc[r], minlength=n_clusters) for r in range(k)]
    )
    t01 = np.stack(
        [np.bincount(neg_codes, weights=v01[r] - auc[r], minlength=n_clusters) for r in range(k)]
    )
    s10 = (i10 / (i10 - 1)) * (t10 @ t10.T) / m**2
    s01 = (i01 / (i01 - 1)) * (t01 @ t01.T) / n**2
    s11 = (i_all / (i_all - 1)) * (t10 @ t01.T) / (m * n)
    return s10 + s01 + s11 + s11.T


def _covariance(
    y: np.ndarray, v10: np.ndarray, v01: np.ndarray, auc: np.ndarray, codes: np.ndarray | None
) -> np.ndarray:
    """DeLong's covariance (codes None) or Obuchowski's clustered one, `[k, k]`."""
    k, m, n = v10.shape[0], v10.shape[1], v01.shape[1]
    if codes is not None:
        return _clustered_covariance(v10, v01, auc, codes[y], codes[~y])
    if m < 2 or n < 2:
        return np.full((k, k), NAN)
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return s10 / m + s01 / n


def delong_covariance(
    y_true: np.ndarray, scores: np.ndarray, clusters: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs `[k]` of k score vectors on the same images and their DeLong covariance `[k, k]`.

    Fast DeLong (Sun & Xu 2014) with midranks, so tied scores count one half exactly as in
    `sklearn.metrics.roc_auc_score`. Without `clusters`: S = S10 / m + S01 / n with S10, S01 the
    sample covariances (ddof 1, as DeLong et al. 1988) of the structural components over the m
    positives and the n negatives. With `clusters` (one patient id per image): Obuchowski's
    (1997) clustered covariance (module docstring), which equals DeLong's when every patient has
    one image. Everything is NaN when y has no positives or no negatives; the covariance alone
    is NaN with a single positive or negative (patient, with clusters).
    """
    y, s = _as_score_matrix(y_true, scores)
    codes = _cluster_codes(clusters, y.size)
    k = s.shape[0]
    m = int(y.sum())
    n = int(y.size - m)
    if m == 0 or n == 0:
        return np.full(k, NAN), np.full((k, k), NAN)
    auc, v10, v01 = _structural_components(y, s)
    return auc, _covariance(y, v10, v01, auc, codes)


def _contrast_test(estimate: float, variance: float, scale: float, confidence: float) -> dict:
    """Normal-approximation CI, z and two-sided p for an estimate with a known variance."""
    nan = dict.fromkeys(("se", "ci_low", "ci_high", "z", "p_value"), NAN)
    if not math.isfinite(estimate) or not math.isfinite(variance):
        return {"estimate": estimate if math.isfinite(estimate) else NAN, **nan}
    se = math.sqrt(max(variance, 0.0))
    tol = _ZERO_TOL * max(1.0, scale)
    if se <= tol:  # no sampling variability of the contrast at all
        same = abs(estimate) <= tol
        return {
            "estimate": estimate,
            "se": 0.0,
            "ci_low": estimate,
            "ci_high": estimate,
            "z": 0.0 if same else math.copysign(math.inf, estimate),
            "p_value": 1.0 if same else 0.0,
        }
    zq = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    z = estimate / se
    return {
        "estimate": estimate,
        "se": se,
        "ci_low": estimate - zq * se,
        "ci_high": estimate + zq * se,
        "z": z,
        "p_value": min(1.0, math.erfc(abs(z) / math.sqrt(2.0))),
    }


def _contrast(
    y: np.ndarray,
    s: np.ndarray,
    c: np.ndarray,
    confidence: float,
    codes: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """The AUCs `[k]` and the (clustered) DeLong test of c' auc, from one pass over the
    components."""
    k = s.shape[0]
    m = int(y.sum())
    n = int(y.size - m)
    if m == 0 or n == 0:
        undefined = dict.fromkeys(("estimate", "se", "ci_low", "ci_high", "z", "p_value"), NAN)
        return np.full(k, NAN), undefined
    auc, v10, v01 = _structural_components(y, s)
    # Split c into its positive and negative parts so that identical inputs cancel exactly.
    plus, minus = np.clip(c, 0.0, None), np.clip(-c, 0.0, None)
    d10 = plus @ v10 - minus @ v10  # the contrast's structural component, per positive
    d01 = plus @ v01 - minus @ v01  # ... and per negative
    estimate = float(plus @ auc - minus @ auc)
    variance = float(_covariance(y, d10[None], d01[None], np.array([estimate]), codes)[0, 0])
    return auc, _contrast_test(estimate, variance, float(np.abs(c).sum()), confidence)


def delong_contrast(
    y_true: np.ndarray,
    scores: np.ndarray,
    contrast: Sequence[float],
    confidence: float = 0.95,
    clusters: np.ndarray | None = None,
) -> dict[str, float]:
    """DeLong test of a linear contrast c' AUC of k correlated AUCs (DeLong et al. 1988);
    with `clusters` (a patient id per image) Obuchowski's clustered variance (module docstring).

    Returns `estimate` (c' auc), `se` (sqrt(c' S c), computed as the variance of the contrast's
    own structural components, which is the same number), the normal-approximation interval
    `ci_low`/`ci_high`, `z` and the two-sided `p_value`. se == 0 with estimate == 0 (identical
    inputs) gives p = 1; se == 0 with estimate != 0 gives p = 0; an undefined AUC (no positives
    or no negatives) gives NaN everywhere, an undefined covariance (a single positive or
    negative -- patient, with clusters) NaN everywhere but the estimate.
    """
    conf = _check_confidence(confidence)
    y, s = _as_score_matrix(y_true, scores)
    codes = _cluster_codes(clusters, y.size)
    c = np.asarray(contrast, dtype=float)
    if c.shape != (s.shape[0],):
        raise ValueError(
            f"contrast: expected shape [{s.shape[0]}] (one weight per score row), got {c.shape}"
        )
    return _contrast(y, s, c, conf, codes)[1]


def _seed_rows(scores: np.ndarray, name: str) -> np.ndarray:
    s = np.asarray(scores, dtype=float)
    if s.ndim == 1:
        return s[None, :]
    if s.ndim != 2:
        raise ValueError(f"{name}: expected shape [N] or [S, N] (S seeds), got {s.shape}")
    return s


def delong_paired(
    y_true: np.ndarray,
    scores_model: np.ndarray,
    scores_ref: np.ndarray,
    confidence: float = 0.95,
    clusters: np.ndarray | None = None,
) -> dict[str, float]:
    """Paired DeLong test of AUC(model) - AUC(ref) on the same images; with `clusters` (one
    patient id per image) the patient-clustered variance of Obuchowski (1997).

    Scores are `[N]` or `[S, N]` (S training seeds of each model on the same images; both the
    same shape). The tested quantity is mean_s (AUC_model_s - AUC_ref_s), the contrast
    (1/S, ..., 1/S, -1/S, ..., -1/S) over the 2S stacked score vectors, whose DeLong variance is
    exact because the structural components are linear. Returns `auc_model`, `auc_ref` (means
    over seeds), `delta`, `se`, `ci_low`, `ci_high`, `p_value` and `seed_sd`, the sample sd of
    the per-seed differences (NaN with one seed).

    The test is conditional on the trained weights: `se` is the test-sampling error of this
    mean over these S trainings; the training variation is `seed_sd`, reported beside it.
    """
    a = _seed_rows(scores_model, "scores_model")
    b = _seed_rows(scores_ref, "scores_ref")
    if a.shape != b.shape:
        raise ValueError(
            f"scores_model {a.shape} and scores_ref {b.shape}: expected the same shape "
            "(same seeds count, same images)"
        )
    conf = _check_confidence(confidence)
    k = a.shape[0]
    y, stacked = _as_score_matrix(y_true, np.concatenate([a, b], axis=0))
    codes = _cluster_codes(clusters, y.size)
    contrast = np.r_[np.full(k, 1.0 / k), np.full(k, -1.0 / k)]
    auc, res = _contrast(y, stacked, contrast, conf, codes)
    auc_model, auc_ref = float(auc[:k].mean()), float(auc[k:].mean())
    per_seed = auc[:k] - auc[k:]
    seed_sd = float(np.std(per_seed, ddof=1)) if k > 1 and np.isfinite(per_seed).all() else NAN
    return {
        "auc_model": auc_model,
        "auc_ref": auc_ref,
        "delta": res["estimate"],
        "se": res["se"],
        "ci_low": res["ci_low"],
        "ci_high": res["ci_high"],
        "p_value": res["p_value"],
        "seed_sd": seed_sd,
    }


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries stay NaN and are not counted in m.

    The i-th smallest of m p-values becomes max_{j <= i} min(1, (m - j + 1) p_(j)): monotone in
    the raw p-values, never above 1, and controlling the family-wise error rate without
    Bonferroni's loss of power.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values: expected a 1-D sequence, got shape {p.shape}")
    out = np.full(p.shape, NAN)
    idx = np.flatnonzero(~np.isnan(p))
    if idx.size == 0:
        return out
    order = idx[np.argsort(p[idx], kind="mergesort")]
    m = order.size
    stepped = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(stepped), 1.0)
    return out


class _Paired(NamedTuple):
    """Validated inputs: labels `[N, F]`, scores `[S, N, F]`, thresholds `[S, F]` per side."""

    y: np.ndarray
    scores_model: np.ndarray
    scores_ref: np.ndarray
    thresholds_model: np.ndarray
    thresholds_ref: np.ndarray


def _seeded_inputs(
    y_true: np.ndarray,
    scores: tuple[np.ndarray, np.ndarray],
    thresholds: tuple[np.ndarray, np.ndarray],
    patient_ids: np.ndarray,
) -> _Paired:
    """Validate (model, reference) scores and thresholds; add a seed axis where it is missing."""
    y = _binary_labels(y_true)
    if y.ndim != 2:
        raise ValueError(f"y_true: expected shape [N, F], got {y.shape}")
    n, f = y.shape
    out = []
    for name, arr, tail in (
        ("scores_model", scores[0], (n, f)),
        ("scores_ref", scores[1], (n, f)),
        ("thresholds_model", thresholds[0], (f,)),
        ("thresholds_ref", thresholds[1], (f,)),
    ):
        a = np.asarray(arr, dtype=float)
        if a.ndim == len(tail):
            a = a[None]
        if a.shape[1:] != tail or a.ndim != len(tail) + 1:
            raise ValueError(
                f"{name}: expected shape {list(tail)} or [S, {', '.join(map(str, tail))}] "
                f"(S seeds), got {np.asarray(arr).shape}"
            )
        out.append(a)
    seeds = [a.shape[0] for a in out]
    if len(set(seeds)) != 1:
        raise ValueError(
            "seeds: scores_model, scores_ref, thresholds_model and thresholds_ref must have the "
            f"same number of seeds S (seed s of the model is paired with seed s of the "
            f"reference), got {seeds}"
        )
    if not (np.isfinite(out[0]).all() and np.isfinite(out[1]).all()):
        raise ValueError("scores: non-finite values (NaN/inf) cannot be ranked")
    if len(np.asarray(patient_ids)) != n:
        raise ValueError(
            f"patient_ids: expected {n} entries (one per image), got {len(patient_ids)}"
        )
    return _Paired(y, *out)


def _metric_block(
    metric: str, y: np.ndarray, s: np.ndarray, t: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """One model-seed's metric per resample and finding `[r, F]` (NaN = undefined)."""
    f = y.shape[1]
    if metric == "auroc":
        return np.stack([weighted_auroc(y[:, i], s[:, i], w) for i in range(f)], axis=1)
    if metric == "auprc":
        return np.stack([weighted_average_precision(y[:, i], s[:, i], w) for i in range(f)], axis=1)
    defined = ~np.isnan(t)
    pred = s >= np.where(defined, t, np.inf)[None, :]
    out = weighted_threshold_metrics(y, pred, w)[metric]
    out[:, ~defined] = np.nan
    return out


def _seed_diffs(metric: str, data: _Paired, w: np.ndarray) -> list[np.ndarray]:
    """Per seed, the per-finding difference model - reference `[r, F]` (NaN where either
    side is undefined)."""
    out = []
    for k in range(data.scores_model.shape[0]):
        a = _metric_block(metric, data.y, data.scores_model[k], data.thresholds_model[k], w)
        b = _metric_block(metric, data.y, data.scores_ref[k], data.thresholds_ref[k], w)
        out.append(a - b)
    return out


def _macro_sets(metric: str, data: _Paired, findings: np.ndarray | None = None) -> list[np.ndarray]:
    """Per seed, the findings `[F]` (bool) of the macro: defined for both models on the test
    set as is (and among `findings`, a mask such as the long tail's group, when given). Every
    resample averages this one set (`bootstrap.fixed_set_mean`)."""
    ones = np.ones((1, data.y.shape[0]))
    chosen = np.ones(data.y.shape[1], bool) if findings is None else np.asarray(findings, bool)
    if chosen.shape != (data.y.shape[1],):
        raise ValueError(f"findings: expected {data.y.shape[1]} booleans, got {chosen.shape}")
    return [np.isfinite(d[0]) & chosen for d in _seed_diffs(metric, data, ones)]


def _macro_deltas(metric: str, data: _Paired, w: np.ndarray, sets: list[np.ndarray]) -> np.ndarray:
    """Per resample `[r]`: mean over seeds of macro_model_s - macro_ref_s.

    Each seed's macro is the mean of the per-finding differences over that seed's fixed set
    (`_macro_sets`); a resample in which one of them is undefined is undefined (NaN: dropped
    from the interval and the p-value, and counted), as is one where any seed is.
    """
    per_seed = []
    for diff, keep in zip(_seed_diffs(metric, data, w), sets, strict=True):
        per_seed.append(diff[:, keep].mean(axis=1) if keep.any() else np.full(len(w), NAN))
    return np.mean(per_seed, axis=0)


def paired_bootstrap_samples(  # noqa: PLR0917 -- (y, scores, thresholds, patients) x 2 sides
    y_true: np.ndarray,
    scores_model: np.ndarray,
    scores_ref: np.ndarray,
    thresholds_model: np.ndarray,
    thresholds_ref: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = MACRO_METRICS,
    chunk_size: int = 200,
    progress_desc: str | None = None,
    findings: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The bootstrap distribution `{metric: [R]}` of the macro difference (model - reference).

    Resample r uses row r of `bootstrap.patient_weights(patient_ids, n_resamples, seed)` for
    both models and every seed, which is what makes the comparison paired. `progress_desc`
    names a progress bar counting resamples. `findings` (bool `[F]`, default all) restricts
    the macro to a subset, e.g. the long tail's tail group.
    """
    bad = [m for m in metrics if m not in MACRO_METRICS]
    if bad:
        raise ValueError(f"metrics: expected a subset of {MACRO_METRICS}, got {bad}")
    data = _seeded_inputs(
        y_true, (scores_model, scores_ref), (thresholds_model, thresholds_ref), patient_ids
    )
    blocks: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    sets = {m: _macro_sets(m, data, findings) for m in metrics}
    for w in patient_weights(
        patient_ids, n_resamples, seed, chunk_size, progress_desc=progress_desc
    ):
        for m in metrics:
            blocks[m].append(_macro_deltas(m, data, w, sets[m]))
    return {m: np.concatenate(v) for m, v in blocks.items()}


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided bootstrap p of "difference = 0": min(1, 2 min(P*(D <= 0), P*(D >= 0))).

    Each tail counts (#{D* on that side of 0} + 1) / (R + 1), R the defined resamples, so p is
    never 0 with finitely many resamples; a distribution identically 0 gives p = 1 exactly.
    """
    d = np.asarray(samples, dtype=float)
    d = d[~np.isnan(d)]
    r = d.size
    if r == 0:
        return NAN
    if np.all(d == 0.0):
        return 1.0
    low = (np.count_nonzero(d <= 0.0) + 1) / (r + 1)
    high = (np.count_nonzero(d >= 0.0) + 1) / (r + 1)
    return float(min(1.0, 2.0 * min(low, high)))


def paired_bootstrap_macro(  # noqa: PLR0917 -- (y, scores, thresholds, patients) x 2 sides
    y_true: np.ndarray,
    scores_model: np.ndarray,
    scores_ref: np.ndarray,
    thresholds_model: np.ndarray,
    thresholds_ref: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    metrics: Sequence[str] = MACRO_METRICS,
    progress_desc: str | None = None,
    findings: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Paired patient-bootstrap test of macro AUROC/AUPRC/F1 differences (model - reference).

    `y_true [N, F]`; scores `[N, F]` or `[S, N, F]` (S seeds, same S for both models, seed s of
    the model paired with seed s of the reference); thresholds `[F]` or `[S, F]`, fixed from
    validation (a NaN threshold leaves that finding's F1 undefined). Per metric returns `delta`
    (the same statistic with unit weights, i.e. on the test set as is), the percentile interval
    `ci_low`/`ci_high`, the two-sided `p_value` (`bootstrap_p_value`), `n_resamples`, the
    number of resamples where the difference was defined (those used for CI and p), and
    `resamples_dropped`, the others: resamples that lost every positive patient of a finding
    in the macro's fixed set (`_macro_sets`). `findings` (bool `[F]`) restricts the macro to
    a subset of findings (default: all).
    """
    conf = _check_confidence(confidence)
    samples = paired_bootstrap_samples(
        y_true,
        scores_model,
        scores_ref,
        thresholds_model,
        thresholds_ref,
        patient_ids,
        n_resamples=n_resamples,
        seed=seed,
        metrics=metrics,
        progress_desc=progress_desc,
        findings=findings,
    )
    data = _seeded_inputs(
        y_true, (scores_model, scores_ref), (thresholds_model, thresholds_ref), patient_ids
    )
    ones = np.ones((1, data.y.shape[0]))
    out: dict[str, dict[str, float]] = {}
    for m, d in samples.items():
        point = float(_macro_deltas(m, data, ones, _macro_sets(m, data, findings))[0])
        low, high = percentile_interval(d, conf)
        out[m] = {
            "delta": point,
            "ci_low": float(low),
            "ci_high": float(high),
            "p_value": bootstrap_p_value(d),
            "n_resamples": int(np.count_nonzero(~np.isnan(d))),
            "resamples_dropped": int(np.count_nonzero(np.isnan(d))) if np.isfinite(point) else 0,
        }
    return out


def paired_comparison_rows(  # noqa: PLR0917 -- (y, scores, thresholds, patients) x 2 sides
    model: str,
    reference: str,
    y_true: np.ndarray,
    scores_model: np.ndarray,
    scores_ref: np.ndarray,
    thresholds_model: np.ndarray,
    thresholds_ref: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_resamples: int,
    seed: int,
    confidence: float,
    progress_desc: str | None = None,
) -> pd.DataFrame:
    """The report's paired comparison of `model` against `reference`, one row per test.

    Three macro rows (AUROC, AUPRC, F1; paired patient bootstrap; no Holm adjustment -- each is
    its own question) and one AUROC row per finding of FINDINGS by the patient-clustered
    paired DeLong test (`patient_ids` are the clusters), whose p-values are Holm-adjusted
    together (`p_holm`) over the findings where the test is defined. `delta` is always model
    minus reference. Columns: `ROW_COLUMNS`.
    """
    data = _seeded_inputs(
        y_true, (scores_model, scores_ref), (thresholds_model, thresholds_ref), patient_ids
    )
    y = data.y
    if y.shape[1] != len(FINDINGS):
        raise ValueError(
            f"y_true: expected {len(FINDINGS)} finding columns (FINDINGS order), got {y.shape[1]}"
        )
    macro = paired_bootstrap_macro(
        y,
        data.scores_model,
        data.scores_ref,
        data.thresholds_model,
        data.thresholds_ref,
        patient_ids,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        progress_desc=progress_desc,
    )
    ones = np.ones((1, y.shape[0]))
    rows = []
    for m, r in macro.items():
        per_seed = [
            d[0, keep].mean() if keep.any() else NAN
            for d, keep in zip(_seed_diffs(m, data, ones), _macro_sets(m, data), strict=True)
        ]
        rows.append(
            {
                "model": model,
                "reference": reference,
                "finding": "macro",
                "metric": m,
                "delta": r["delta"],
                "ci_low": r["ci_low"],
                "ci_high": r["ci_high"],
                "p_value": r["p_value"],
                "p_holm": NAN,
                "method": BOOTSTRAP_METHOD,
                "seed_sd": _sd(per_seed),
                "resamples_dropped": r["resamples_dropped"],
            }
        )
    per = [
        delong_paired(
            y[:, i],
            data.scores_model[:, :, i],
            data.scores_ref[:, :, i],
            confidence,
            clusters=np.asarray(patient_ids),
        )
        for i in range(y.shape[1])
    ]
    adjusted = holm([r["p_value"] for r in per])
    rows += [
        {
            "model": model,
            "reference": reference,
            "finding": f,
            "metric": "auroc",
            "delta": r["delta"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "p_value": r["p_value"],
            "p_holm": float(adjusted[i]),
            "method": DELONG_METHOD,
            "seed_sd": r["seed_sd"],
            "resamples_dropped": pd.NA,
        }
        for i, (f, r) in enumerate(zip(FINDINGS, per, strict=True))
    ]
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def _sd(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.std(v, ddof=1)) if v.size > 1 and np.isfinite(v).all() else NAN
