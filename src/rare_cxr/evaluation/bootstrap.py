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
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd

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


def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC per row of weights `w [R, N]` (ties count one half, as scikit-learn)."""
    order = np.argsort(s, kind="mergesort")
    ss, yy = s[order], y[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ww = w[:, order]
    pos = np.add.reduceat(ww * yy, starts, axis=1)
    neg = np.add.reduceat(ww * ~yy, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision per row of weights (scikit-learn's step-wise definition)."""
    order = np.argsort(-s, kind="mergesort")
    ss, yy = s[order], y[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ww = w[:, order]
    pos = np.add.reduceat(ww * yy, starts, axis=1)
    neg = np.add.reduceat(ww * ~yy, starts, axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos / total * precision).sum(axis=1)
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
    defined = ~np.isnan(t)
    pred = s >= np.where(defined, t, np.inf)[None, :]
    exact = (pred == y).all(axis=1).astype(float)
    blocks: dict[str, list[np.ndarray]] = {
        m: [] for m in (*METRICS, "precision_zero_filled", "subset_accuracy")
    }
    for w in patient_weights(
        patient_ids, n_resamples, seed, chunk_size, progress_desc=progress_desc
    ):
        blocks["auroc"].append(
            np.stack([weighted_auroc(y[:, i], s[:, i], w) for i in range(y.shape[1])], axis=1)
        )
        blocks["auprc"].append(
            np.stack(
                [weighted_average_precision(y[:, i], s[:, i], w) for i in range(y.shape[1])],
                axis=1,
            )
        )
        for k, v in weighted_threshold_metrics(y, pred, w).items():
            v[:, ~defined] = np.nan
            blocks[k].append(v)
        blocks["subset_accuracy"].append((w @ exact) / w.sum(axis=1))
    return {k: np.concatenate(v, axis=0) for k, v in blocks.items()}


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


def bootstrap_intervals(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    progress_desc: str | None = None,
) -> dict[str, dict]:
    """Intervals per finding (`per_finding[f][metric] = [low, high]`), macro and subset accuracy.

    Macro intervals take the mean over findings *inside* each resample, so they carry the
    correlation between findings of the same patient. `progress_desc`: see `patient_weights`.
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
    per: dict[str, dict[str, list[float]]] = {f: {} for f in FINDINGS}
    macro: dict[str, list[float]] = {}
    for m in METRICS:
        low, high = percentile_interval(samples[m], confidence)
        for i, f in enumerate(FINDINGS):
            per[f][m] = [float(low[i]), float(high[i])]
        macro_source = samples["precision_zero_filled" if m == "precision" else m]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            macro_samples = np.nanmean(macro_source, axis=1)
        lo, hi = percentile_interval(macro_samples, confidence)
        macro[m] = [float(lo), float(hi)]
    lo, hi = percentile_interval(samples["subset_accuracy"], confidence)
    return {
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "confidence": float(confidence),
        "unit": "patient",
        "per_finding": per,
        "macro": macro,
        "subset_accuracy": [float(lo), float(hi)],
    }
