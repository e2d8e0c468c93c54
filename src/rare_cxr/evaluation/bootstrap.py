"""95% confidence intervals by bootstrap over *patients*, vectorised over resamples.

Why patients: NIH has up to ~180 images per patient, strongly correlated; resampling images
would treat them as independent and make intervals too narrow. Each resample draws patients
with replacement (a multinomial count per patient) and every image of a drawn patient enters
with that count as its weight -- so all images of a patient move together.

Why vectorised: metrics are computed for a whole block of resamples at once from weight
matrices `W [R, N]` (AUROC by the weighted Mann-Whitney statistic over tied-score groups, AP by
weighted cumulative TP/FP), so 1,000 resamples x 14 findings x 6 models takes seconds.
Thresholds stay the validation ones: the interval describes the test-set sampling error of the
deployed rule, not a re-tuned one.

Two places where a plain percentile interval would mislead (issue 18): a macro mean averages ONE
set of findings in every resample (`fixed_set_mean`; resamples that lost one are dropped and
counted), and a per-finding proportion whose bootstrap degenerates (0 or 1, a handful of
positive patients) gets a binomial interval on patient-scaled counts (`proportions.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd

from rare_cxr.evaluation import proportions
from rare_cxr.findings import FINDINGS
from rare_cxr.progress import progress

METRICS = (
    "auroc",
    "auprc",
    "precision",
    "recall",
    "f1",
    "specificity",
    "accuracy",
    "balanced_accuracy",
)


def patient_weights(
    patient_ids: np.ndarray,
    n_resamples: int,
    seed: int,
    chunk_size: int = 200,
    *,
    progress_desc: str | None = None,
) -> Iterator[np.ndarray]:
    """Blocks of image weights `[r, N]`: each row one resample of patients with replacement.

    `progress_desc` names a progress bar counting resamples (`rare_cxr.progress`); every
    bootstrap of the project draws its resamples here, so this is where they are counted.
    """
    if int(n_resamples) < 1:
        raise ValueError(f"reporting.bootstrap.n_resamples: expected >= 1, got {n_resamples!r}")
    codes, uniques = pd.factorize(pd.Series(patient_ids).astype(str))
    n_patients = len(uniques)
    rng = np.random.default_rng(int(seed))
    done = 0
    with progress(
        total=int(n_resamples),
        desc=progress_desc or "",
        unit="resample",
        enabled=bool(progress_desc),
    ) as bar:
        while done < n_resamples:
            r = min(chunk_size, n_resamples - done)
            counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=r)
            yield counts[:, codes].astype(np.float64)
            done += r
            bar.update(r)  # after the caller has computed this block's metrics


def _sorted_negative_cumsum(
    neg_scores: np.ndarray, neg_index: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(negatives' scores ascending `[n]`, `c [R, n + 1]`): c[:, k] = the weight of the k
    lowest-scored negatives (c[:, 0] = 0), so that the weight of the negatives below a score v
    is c[:, searchsorted(scores, v)]."""
    order = np.argsort(neg_scores, kind="mergesort")
    c = np.zeros((w.shape[0], order.size + 1))
    np.cumsum(w[:, neg_index[order]], axis=1, out=c[:, 1:])
    return neg_scores[order], c


def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC per row of weights `w [R, N]` (ties count one half, as scikit-learn).

    The weighted Mann-Whitney statistic: sum over positives i of w_i (weight of the negatives
    scored below s_i + half the weight of those tied with it), over (positive weight x negative
    weight). Why this form (issue 19): it reads the [R, N] weights twice (one gather, one
    cumulative sum over the negatives) and then only the positives' columns, where grouping
    tied scores with `np.add.reduceat` over every film cost ~10 passes, the bottleneck of every
    bootstrap at NIH's size. With integer weights (patient draw counts, unit weights) every sum
    is exact in float64, so the result is bit for bit the grouped form's
    (tests/test_bootstrap.py keeps that implementation as the reference).
    """
    yy = np.asarray(y).astype(bool)
    ss = np.asarray(s, dtype=float)
    w = np.asarray(w, dtype=float)
    pos, neg = np.flatnonzero(yy), np.flatnonzero(~yy)
    neg_scores, c = _sorted_negative_cumsum(ss[neg], neg, w)
    pos_scores = ss[pos]
    below = c[:, np.searchsorted(neg_scores, pos_scores, side="left")]
    up_to = c[:, np.searchsorted(neg_scores, pos_scores, side="right")]
    wp = w[:, pos]
    num = (wp * (below + 0.5 * (up_to - below))).sum(axis=1)
    den = wp.sum(axis=1) * c[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision per row of weights (scikit-learn's step-wise definition).

    AP = sum over tied-score groups g, in descending score order, of (positive weight of g /
    all positive weight) x precision at the end of g. Only groups holding a positive add to it,
    so precision is computed there alone, from the positives' cumulative weight and the weight
    of the negatives scored at or above the group (`_sorted_negative_cumsum`). Why, and why the
    numbers are unchanged: see `weighted_auroc`; the terms are placed back at their groups'
    positions among all tied-score groups before the sum, so that floating-point addition sees
    the very same sequence as the grouped form's (bit for bit, tests/test_bootstrap.py).
    """
    yy = np.asarray(y).astype(bool)
    ss = np.asarray(s, dtype=float)
    w = np.asarray(w, dtype=float)
    r = w.shape[0]
    pos, neg = np.flatnonzero(yy), np.flatnonzero(~yy)
    if pos.size == 0:
        return np.full(r, np.nan)
    # tied-score groups of all films, descending: the positions the terms are summed at
    every = np.sort(ss)[::-1]
    groups_desc = np.r_[every[:1], every[1:][every[1:] != every[:-1]]]
    pos_order = pos[np.argsort(-ss[pos], kind="mergesort")]
    pos_scores = ss[pos_order]
    last = np.flatnonzero(np.r_[pos_scores[1:] != pos_scores[:-1], True])  # end of each group
    first = np.r_[0, last[:-1] + 1]
    values = pos_scores[last]
    cp = np.cumsum(w[:, pos_order], axis=1)
    tp = cp[:, last]  # positive weight scored >= the group's score
    in_group = tp - np.where(first > 0, cp[:, np.maximum(first - 1, 0)], 0.0)
    neg_scores, c = _sorted_negative_cumsum(ss[neg], neg, w)
    fp = c[:, -1:] - c[:, np.searchsorted(neg_scores, values, side="left")]
    total = cp[:, -1:]
    terms = np.zeros((r, groups_desc.size))
    slots = np.searchsorted(-groups_desc, -values)  # each positive group's position
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        terms[:, slots] = in_group / total * precision
        ap = terms.sum(axis=1)
    return np.where(total[:, 0] > 0, ap, np.nan)


def weighted_threshold_metrics(
    y: np.ndarray, pred: np.ndarray, w: np.ndarray
) -> dict[str, np.ndarray]:
    """Precision/recall/F1/specificity/accuracy `[R, F]` from weights and fixed predictions."""
    y = y.astype(bool)
    tp = w @ (y & pred).astype(float)
    fp = w @ (~y & pred).astype(float)
    fn = w @ (y & ~pred).astype(float)
    tn = w @ (~y & ~pred).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        return {
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            # for the macro mean only: no predicted positive although the finding occurs in the
            # resample counts 0, as in metrics.evaluate_split's macro precision
            "precision_zero_filled": np.where(
                tp + fp > 0, tp / (tp + fp), np.where(tp + fn > 0, 0.0, np.nan)
            ),
            "recall": recall,
            "f1": np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
            "specificity": specificity,
            "accuracy": (tp + tn) / (tp + fp + fn + tn),
            "balanced_accuracy": (recall + specificity) / 2.0,
        }


def bootstrap_samples(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    chunk_size: int = 200,
    progress_desc: str | None = None,
) -> dict[str, np.ndarray]:
    """Metric values per resample: `{metric: [R, F]}` plus `subset_accuracy: [R]`.

    Findings whose validation threshold is undefined (NaN) get NaN threshold metrics in every
    resample, exactly as in the point estimate. `progress_desc`: see `patient_weights`.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    blocks: dict[str, list[np.ndarray]] = {}
    for w in patient_weights(
        patient_ids, n_resamples, seed, chunk_size, progress_desc=progress_desc
    ):
        for k, v in _metric_blocks(y, s, t, w).items():
            blocks.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in blocks.items()}


def _metric_blocks(
    y: np.ndarray, s: np.ndarray, t: np.ndarray, w: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric `[r, F]` (and subset accuracy `[r]`) for one block of weights `w [r, N]`."""
    defined = ~np.isnan(t)
    pred = s >= np.where(defined, t, np.inf)[None, :]
    exact = (pred == y).all(axis=1).astype(float)
    out = {
        "auroc": np.stack([weighted_auroc(y[:, i], s[:, i], w) for i in range(y.shape[1])], axis=1),
        "auprc": np.stack(
            [weighted_average_precision(y[:, i], s[:, i], w) for i in range(y.shape[1])],
            axis=1,
        ),
    }
    for k, v in weighted_threshold_metrics(y, pred, w).items():
        v[:, ~defined] = np.nan
        out[k] = v
    out["subset_accuracy"] = (w @ exact) / w.sum(axis=1)
    return out


def percentile_interval(
    samples: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0, ignoring NaN resamples (all NaN -> NaN)."""
    alpha = (1.0 - float(confidence)) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanquantile(samples, alpha, axis=0)
        high = np.nanquantile(samples, 1.0 - alpha, axis=0)
    return low, high


def fixed_set_mean(samples: np.ndarray, point: np.ndarray) -> tuple[np.ndarray, int]:
    """One mean per resample over ONE set of findings: those defined in the point estimate.

    `samples [R, F]`, `point [F]` (the statistic on the test set as is, NaN = undefined).
    A resample in which one of those findings is undefined (it drew none of a rare finding's
    positive patients) gets NaN -- it is dropped from the interval -- instead of a mean over
    fewer findings: averaging a different set per resample mixes different statistics into
    one interval. Returns (means `[R]`, number of resamples dropped). No defined finding: all
    NaN and 0 dropped (there is no macro to drop from).
    """
    keep = np.isfinite(np.asarray(point, dtype=float))
    r = samples.shape[0]
    if not keep.any():
        return np.full(r, np.nan), 0
    means = samples[:, keep].mean(axis=1)  # NaN as soon as one finding of the set is
    return means, int(np.isnan(means).sum())


def _unit_point(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric `[F]` on the test set as is (unit weights): the same code as a resample."""
    samples = _metric_blocks(y, s, t, np.ones((1, y.shape[0])))
    return {k: v[0] for k, v in samples.items()}


def _counts(y: np.ndarray, pred: np.ndarray, patients: np.ndarray) -> dict[str, np.ndarray]:
    """Per finding: (k, n, patients behind n) of recall, precision, specificity, accuracy."""
    codes, _ = pd.factorize(pd.Series(patients).astype(str))

    def distinct(mask: np.ndarray) -> np.ndarray:
        return np.array([np.unique(codes[mask[:, i]]).size for i in range(mask.shape[1])])

    tp, tn = y & pred, ~y & ~pred
    every = np.ones_like(y)
    return {
        "recall": (tp.sum(0), y.sum(0), distinct(y)),
        "precision": (tp.sum(0), pred.sum(0), distinct(pred)),
        "specificity": (tn.sum(0), (~y).sum(0), distinct(~y)),
        "accuracy": ((tp | tn).sum(0), every.sum(0), distinct(every)),
    }


PROPORTIONS = ("recall", "precision", "specificity", "accuracy")


def _proportion_fallback(
    per: dict[str, dict[str, list[float]]],
    methods: dict[str, dict[str, str]],
    *,
    y: np.ndarray,
    pred: np.ndarray,
    defined: np.ndarray,
    patients: np.ndarray,
    confidence: float,
    min_positive_patients: int,
    method: str,
) -> None:
    """Replace degenerate percentile intervals of recall/precision/specificity/accuracy.

    Degenerate: the estimate is 0 or 1 (every resample repeats it), or the finding has fewer
    than `min_positive_patients` positive patients (the resamples repeat a handful of
    patients). Those get a binomial interval on patient-scaled counts (`proportions`).
    """
    positive_patients = _counts(y, y, patients)["recall"][2]
    for metric, (k, n, units) in _counts(y, pred, patients).items():
        for i, f in enumerate(FINDINGS):
            if not defined[i] or n[i] == 0:
                continue
            estimate = k[i] / n[i]
            if estimate in (0.0, 1.0) or positive_patients[i] < min_positive_patients:
                k_eff, n_eff = proportions.patient_counts(k[i], n[i], int(units[i]))
                low, high = proportions.proportion_interval(k_eff, n_eff, confidence, method)
                per[f][metric] = [float(low), float(high)]
                methods[f][metric] = proportions.METHOD_LABELS[method]


def bootstrap_intervals(  # noqa: PLR0913 -- data, then the reporting parameters by name
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_positive_patients: int = 10,
    proportion_method: str = "exact",
    progress_desc: str | None = None,
) -> dict[str, dict]:
    """Intervals per finding (`per_finding[f][metric] = [low, high]`), macro and subset accuracy.

    * Per finding: percentile bootstrap over patients, except recall, precision, specificity
      and accuracy where it degenerates (estimate 0 or 1, or fewer than
      `min_positive_patients` positive patients): there a binomial interval on patient-scaled
      counts (`proportion_method`: `exact` = Clopper-Pearson, `wilson`); `per_finding_method
      [f][metric]` names the interval used.
    * Macro: the mean over findings taken *inside* each resample, so it carries the
      correlation between findings of the same patient, over ONE set of findings -- those
      defined on the test set (the point estimate's); resamples where one of them is undefined
      are dropped and counted in `macro_resamples_dropped[metric]` (`fixed_set_mean`).
    `progress_desc`: see `patient_weights`.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"reporting.bootstrap.confidence: expected in (0, 1), got {confidence!r}")
    samples = bootstrap_samples(
        y_true,
        y_score,
        thresholds,
        patient_ids,
        n_resamples=n_resamples,
        seed=seed,
        progress_desc=progress_desc,
    )
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    point = _unit_point(y, s, t)
    per: dict[str, dict[str, list[float]]] = {f: {} for f in FINDINGS}
    methods: dict[str, dict[str, str]] = {f: dict.fromkeys(METRICS, "bootstrap") for f in FINDINGS}
    macro: dict[str, list[float]] = {}
    dropped: dict[str, int] = {}
    for m in METRICS:
        low, high = percentile_interval(samples[m], confidence)
        for i, f in enumerate(FINDINGS):
            per[f][m] = [float(low[i]), float(high[i])]
        source = "precision_zero_filled" if m == "precision" else m
        macro_samples, dropped[m] = fixed_set_mean(samples[source], point[source])
        lo, hi = percentile_interval(macro_samples, confidence)
        macro[m] = [float(lo), float(hi)]
    defined = ~np.isnan(t)
    pred = s >= np.where(defined, t, np.inf)[None, :]
    _proportion_fallback(
        per,
        methods,
        y=y,
        pred=pred,
        defined=defined,
        patients=np.asarray(patient_ids),
        confidence=float(confidence),
        min_positive_patients=int(min_positive_patients),
        method=proportion_method,
    )
    lo, hi = percentile_interval(samples["subset_accuracy"], confidence)
    return {
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "confidence": float(confidence),
        "unit": "patient",
        "per_finding": per,
        "per_finding_method": methods,
        "macro": macro,
        "macro_resamples_dropped": dropped,
        "macro_findings": "defined on the test set (the point estimate's); resamples where one "
        "is undefined are dropped",
        "subset_accuracy": [float(lo), float(hi)],
    }
