"""Long-tail metrics as the NIH-CXR-LT benchmark reports them, with honest small-sample handling.

Why this module exists: the paper-style macro numbers (metrics.py) average 14 findings whose
training counts differ by two orders of magnitude (Infiltration ~20k images, Hernia ~200), so a
model can look good on average while failing the rare findings the project is about. NIH-CXR-LT
(Holste et al., 2022) therefore reports

* metrics by *frequency group* (head / medium / tail by training-image count, the OLTR
  "many / medium / few-shot" split) so the tail is visible on its own,
* balanced accuracy, which -- unlike plain accuracy -- is not ~0.9 for a model that says
  "absent" everywhere, and
* sensitivity at a fixed high specificity, the operating point a screening reader would use.

Small-sample honesty: a finding with 1-3 positive test patients gets a percentile interval from
resamples that mostly repeat the same few patients, so the interval prints as a narrow, confident
range although the estimate is close to anecdote (Hernia with 2 test positives showed AUROC 0.954
[0.900, 0.992]). Such findings are flagged `reliable = False` instead of being dropped. The
count is of distinct positive PATIENTS (`test_positive_patients`), not films: twelve films of two
patients are two units to resample. (Macro precision counts a finding that is never predicted as
0: `metrics.evaluate_split`.)

Everything undefined stays NaN (never 0), thresholds are the validation ones, and intervals use
the patient bootstrap of bootstrap.py (same `patient_weights` seed semantics).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from rare_cxr.evaluation.bootstrap import bootstrap_samples, fixed_set_mean, percentile_interval
from rare_cxr.evaluation.metrics import auprc, auroc, positive_patients, threshold_metrics
from rare_cxr.findings import FINDINGS

NAN = float("nan")
GROUPS = ("head", "medium", "tail")
GROUP_METRICS = ("auroc", "auprc", "balanced_accuracy")
# The NIH-CXR-LT / OLTR convention: many-shot > 1,000, medium 100-1,000, few-shot < 100 images.
NIH_CXR_LT_HEAD_MIN = 1001
NIH_CXR_LT_TAIL_MAX = 100


def balanced_accuracy(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> float:
    """(recall + specificity) / 2 at a fixed (validation-chosen) threshold.

    NaN when the threshold is undefined or the split lacks positives (recall undefined) or
    negatives (specificity undefined): half of a balanced accuracy is not a balanced accuracy.
    """
    m = threshold_metrics(y_true, y_score, threshold)
    recall, specificity = m["recall"], m["specificity"]
    if math.isnan(recall) or math.isnan(specificity):
        return NAN
    return float((recall + specificity) / 2.0)


def _spec_column(target: float) -> str:
    return f"sensitivity_at_spec_{round(100 * float(target))}"


def sensitivity_at_specificity(
    y_true: np.ndarray, y_score: np.ndarray, target: float
) -> dict[str, float]:
    """The ROC operating point with the highest sensitivity whose specificity >= `target`.

    Computed on the given split itself (an oracle threshold, as NIH-CXR-LT reports it), so it
    describes the ranking quality at a clinically relevant specificity, not a deployable rule.
    Among points of equal sensitivity the one with the higher specificity wins. Every ROC
    point is considered (`drop_intermediate=False`); the first one (threshold +inf, nothing
    predicted positive) always qualifies, so the answer can be sensitivity 0 at threshold inf.
    NaN everywhere when the split lacks positives or negatives.
    """
    target = float(target)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"specificity target: expected in [0, 1], got {target!r}")
    y = np.asarray(y_true).astype(int)
    if not 0 < int(y.sum()) < y.size:
        return {"sensitivity": NAN, "specificity": NAN, "threshold": NAN}
    fpr, tpr, thresholds = roc_curve(y, np.asarray(y_score, dtype=float), drop_intermediate=False)
    specificity = 1.0 - fpr
    ok = np.flatnonzero(specificity >= target - 1e-12)
    # Highest sensitivity, then highest specificity (lexsort: last key is primary).
    best = ok[np.lexsort((-specificity[ok], -tpr[ok]))[0]]
    return {
        "sensitivity": float(tpr[best]),
        "specificity": float(specificity[best]),
        "threshold": float(thresholds[best]),
    }


def frequency_groups(
    train_positives: Mapping[str, int], head_min: int, tail_max: int
) -> dict[str, str]:
    """Head / medium / tail group of each finding from its training-split positive count.

    `head` if count >= head_min, `tail` if count < tail_max, else `medium`. The NIH-CXR-LT /
    OLTR "many / medium / few-shot" convention is > 1,000 / 100-1,000 / < 100 training images
    (head_min=1001, tail_max=100). The counts are parameters, not constants, because our
    patient-level splits (and the phantom data) have far fewer training images than NIH-CXR-LT's
    ~88k: with the benchmark's cut-offs every finding of a small run would land in one group.
    """
    head_min, tail_max = int(head_min), int(tail_max)
    if tail_max < 0:
        raise ValueError(f"reporting.long_tail.tail_max: expected >= 0, got {tail_max!r}")
    if head_min <= tail_max:
        raise ValueError(
            f"reporting.long_tail.head_min: expected > tail_max ({tail_max}), got {head_min!r}"
        )
    groups: dict[str, str] = {}
    for finding, count in train_positives.items():
        n = int(count)
        groups[finding] = "head" if n >= head_min else "tail" if n < tail_max else "medium"
    return groups


def _threshold_array(thresholds: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
    """Thresholds in FINDINGS order, from a finding -> threshold mapping or an [F] array."""
    if isinstance(thresholds, Mapping):
        return np.array([thresholds.get(f, NAN) for f in FINDINGS], dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if t.shape != (len(FINDINGS),):
        raise ValueError(f"thresholds: expected {len(FINDINGS)} values, got shape {t.shape}")
    return t


def _check_arrays(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(FINDINGS) or s.shape != y.shape:
        raise ValueError(
            f"y_true/y_score: expected matching [N, {len(FINDINGS)}] arrays, "
            f"got {y.shape} and {s.shape}"
        )
    return y, s


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; all-NaN -> NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=-1)


def group_bootstrap_samples(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Mapping[str, float] | Sequence[float] | np.ndarray,
    patient_ids: np.ndarray,
    groups: Mapping[str, str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Group means per patient-bootstrap resample: `{metric: {group: [R]}}`.

    Metrics are auroc, auprc and balanced_accuracy per finding from bootstrap.py's
    `bootstrap_samples` (same resamples for the same seed). Every resample averages ONE set of
    findings per group, those defined on the test set as is (the point estimate's): a resample
    that drew none of a member's positive patients is NaN (dropped from the interval), not a
    mean over fewer findings (`bootstrap.fixed_set_mean`). The correlation between findings is
    kept. Groups without findings are absent.
    """
    y, s = _check_arrays(y_true, y_score)
    t = _threshold_array(thresholds)
    samples = bootstrap_samples(
        y, s, t, np.asarray(patient_ids), n_resamples=n_resamples, seed=seed
    )
    per_finding = {
        "auroc": samples["auroc"],
        "auprc": samples["auprc"],
        # NaN when recall or specificity is undefined in the resample, as in the point estimate.
        "balanced_accuracy": (samples["recall"] + samples["specificity"]) / 2.0,
    }
    point = _point_estimates(y, s, t)
    out: dict[str, dict[str, np.ndarray]] = {m: {} for m in GROUP_METRICS}
    for g in GROUPS:
        idx = [i for i, f in enumerate(FINDINGS) if groups.get(f) == g]
        if idx:
            for m in GROUP_METRICS:
                out[m][g] = fixed_set_mean(per_finding[m][:, idx], point[m][idx])[0]
    return out


def _point_estimates(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """auroc, auprc, balanced_accuracy per finding `[F]` on the test set as is."""
    return {
        "auroc": np.array([auroc(y[:, i], s[:, i]) for i in range(y.shape[1])]),
        "auprc": np.array([auprc(y[:, i], s[:, i]) for i in range(y.shape[1])]),
        "balanced_accuracy": np.array(
            [balanced_accuracy(y[:, i], s[:, i], t[i]) for i in range(y.shape[1])]
        ),
    }


def long_tail_tables(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Mapping[str, float] | Sequence[float] | np.ndarray,
    train_positives: Mapping[str, int],
    patient_ids: np.ndarray,
    *,
    head_min: int,
    tail_max: int,
    min_positives: int = 10,
    specificities: Sequence[float] = (0.90, 0.95),
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-finding table, per-group table `long_tail.csv`) of one split, NIH-CXR-LT style.

    Per finding (FINDINGS order): `finding, group, train_positives, test_positives,
    test_positive_patients, auroc, auprc, balanced_accuracy, specificity` (at the validation
    threshold), one `sensitivity_at_spec_<100*target>` column per entry of `specificities`
    (default `sensitivity_at_spec_90`, `sensitivity_at_spec_95`), and `reliable` =
    test_positive_patients >= min_positives. Why the flag: percentile intervals from 1-3
    positive patients print as narrow, confident ranges (Hernia with 2 test positives showed
    AUROC 0.954 [0.900, 0.992]) although they say almost nothing; flagging keeps the number
    visible but marked.

    Per group (head, medium, tail; only groups that have findings): `group, findings` ("A|B"),
    `n_findings`, and for each of auroc, auprc, balanced_accuracy the mean over the group's
    findings where the metric is defined plus `<metric>_ci_low`, `<metric>_ci_high` and
    `<metric>_resamples_dropped`. The interval is the patient bootstrap of bootstrap.py with the
    group mean taken *inside* each resample over one fixed set of findings (see
    `group_bootstrap_samples`; resamples that lost a member's positives are dropped and
    counted), so the correlation between findings of the same patients is kept (averaging
    per-finding interval ends would not be an interval of the mean).
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"reporting.bootstrap.confidence: expected in (0, 1), got {confidence!r}")
    y, s = _check_arrays(y_true, y_score)
    pids = np.asarray(patient_ids)
    if len(pids) != len(y):
        raise ValueError(f"patient_ids: expected {len(y)} values, got {len(pids)}")
    missing = [f for f in FINDINGS if f not in train_positives]
    if missing:
        raise ValueError(f"train_positives: missing finding(s) {missing}")
    t = _threshold_array(thresholds)
    groups = frequency_groups({f: train_positives[f] for f in FINDINGS}, head_min, tail_max)

    patients_with = positive_patients(y, pids)
    rows = []
    for i, f in enumerate(FINDINGS):
        yi, si = y[:, i], s[:, i]
        row = {
            "finding": f,
            "group": groups[f],
            "train_positives": int(train_positives[f]),
            "test_positives": int(yi.sum()),
            "test_positive_patients": int(patients_with[i]),
            "auroc": auroc(yi, si),
            "auprc": auprc(yi, si),
            "balanced_accuracy": balanced_accuracy(yi, si, t[i]),
            "specificity": threshold_metrics(yi, si, t[i])["specificity"],
        }
        for target in specificities:
            row[_spec_column(target)] = sensitivity_at_specificity(yi, si, target)["sensitivity"]
        row["reliable"] = bool(patients_with[i] >= max(int(min_positives), 2))
        rows.append(row)
    per_finding = pd.DataFrame(rows)

    boot = group_bootstrap_samples(y, s, t, pids, groups, n_resamples=n_resamples, seed=seed)
    group_rows = []
    for g in GROUPS:
        idx = [i for i, f in enumerate(FINDINGS) if groups[f] == g]
        if not idx:
            continue
        row = {
            "group": g,
            "findings": "|".join(FINDINGS[i] for i in idx),
            "n_findings": len(idx),
        }
        for m in GROUP_METRICS:
            row[m] = float(_nanmean_rows(per_finding[m].to_numpy(dtype=float)[idx]))
            low, high = percentile_interval(boot[m][g], confidence)
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = float(low), float(high)
        for m in GROUP_METRICS:  # additive columns (issue 18), after the issue-13 ones
            defined = np.isfinite(per_finding[m].to_numpy(dtype=float)[idx]).any()
            row[f"{m}_resamples_dropped"] = int(np.isnan(boot[m][g]).sum()) if defined else 0
        group_rows.append(row)
    columns = (
        ["group", "findings", "n_findings"]
        + [c for m in GROUP_METRICS for c in (m, f"{m}_ci_low", f"{m}_ci_high")]
        + [f"{m}_resamples_dropped" for m in GROUP_METRICS]
    )
    return per_finding, pd.DataFrame(group_rows, columns=columns)
