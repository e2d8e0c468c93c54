"""Per-finding and aggregate classification metrics, with thresholds chosen on validation only.

Why this module exists: on ChestX-ray14 a classifier that says "no finding" everywhere reaches
~0.92 plain accuracy, and several findings have a handful of positives (or none) in a split.
So every metric here (a) uses decision thresholds fixed on the *validation* split and applied
unchanged to *test*, (b) returns NaN -- "undefined" -- instead of 0 when a split has no positives
(or no predicted positives), and (c) is reported next to the all-negative baseline.

Definitions (test split, threshold t_f chosen on validation for finding f):
* precision_f = TP/(TP+FP), recall_f = TP/(TP+FN), specificity_f = TN/(TN+FP),
  accuracy_f = (TP+TN)/N, F1_f = 2TP/(2TP+FP+FN) (undefined when the split has no positives).
* balanced_accuracy_f = (recall_f + specificity_f) / 2: unlike accuracy, 0.5 for a model that
  says "absent" everywhere, however rare the finding (NIH-CXR-LT reports it).
* The paper's four numbers: ACC, Recall, Precision, F1 = the *macro* (unweighted mean over the
  findings where the metric is defined) of accuracy_f, recall_f, precision_f, F1_f. One
  exception: a finding with positives in the split but no predicted positive has an undefined
  precision (0/0); macro precision counts it as 0, not as missing, because dropping it would
  reward a model for never predicting a rare finding. `macro["precision_zero_filled"]` says how
  many findings that was.
* micro: the same ratios from TP/FP/FN/TN pooled over all findings.
* all-negative accuracy: macro accuracy of a classifier that predicts every finding absent,
  i.e. mean_f(1 - prevalence_f); subset accuracy: share of images whose 14 predictions are all
  right (exact match).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from rare_cxr.findings import FINDINGS

THRESHOLD_METHODS = ("f1", "youden")
THRESHOLD_METRICS = (
    "precision",
    "recall",
    "f1",
    "specificity",
    "accuracy",
    "balanced_accuracy",
)
NAN = float("nan")


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when the split lacks positives or negatives."""
    y = np.asarray(y_true).astype(int)
    return float(roc_auc_score(y, y_score)) if _both_classes(y) else NAN


def auprc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision (area under the PR curve); NaN when the split has no positives."""
    y = np.asarray(y_true).astype(int)
    return float(average_precision_score(y, y_score)) if y.sum() > 0 else NAN


def select_threshold(y_true: np.ndarray, y_score: np.ndarray, method: str = "f1") -> float:
    """The decision threshold for one finding, from *validation* labels and scores.

    `f1` maximises F1 over every distinct score; `youden` maximises TPR - FPR. Returns NaN when
    the validation split cannot define one (no positives; Youden also needs negatives), so the
    finding's threshold metrics are reported as undefined rather than invented.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(
            f"reporting.threshold_method: expected one of {THRESHOLD_METHODS}, got {method!r}"
        )
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=float)
    if y.sum() == 0:
        return NAN
    if method == "f1":
        precision, recall, thresholds = precision_recall_curve(y, s)
        p, r = precision[:-1], recall[:-1]  # the last point has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return float(thresholds[int(np.argmax(f1))])
    if not _both_classes(y):
        return NAN
    fpr, tpr, thresholds = roc_curve(y, s)
    j = tpr[1:] - fpr[1:]  # skip roc_curve's +inf threshold (predicts nothing positive)
    return float(thresholds[1:][int(np.argmax(j))])


def confusion_at(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, int]:
    """TP/FP/FN/TN when predicting positive for score >= threshold."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_score, dtype=float) >= threshold
    return {
        "tp": int(np.sum(pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "fn": int(np.sum(~pred & y)),
        "tn": int(np.sum(~pred & ~y)),
    }


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else NAN


def rates_from_counts(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Precision, recall, F1, specificity, accuracy; NaN where the denominator is empty.

    F1 is undefined when there are no positives (its recall is), never silently zero.
    """
    n = tp + fp + fn + tn
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn > 0 else NAN,
        "specificity": specificity,
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": (recall + specificity) / 2.0,  # NaN if either is undefined
    }


def threshold_metrics(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float
) -> dict[str, float]:
    """Test metrics of one finding at a fixed (validation-chosen) threshold."""
    if threshold is None or math.isnan(threshold):
        return dict.fromkeys(THRESHOLD_METRICS, NAN)
    c = confusion_at(y_true, y_score, threshold)
    return rates_from_counts(c["tp"], c["fp"], c["fn"], c["tn"])


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else NAN


def prediction_seeds(predictions: pd.DataFrame) -> list[int | None]:
    """The training seeds in a predictions table, primary first ([None] without a seed column)."""
    if "seed" not in predictions.columns:
        return [None]
    return [int(s) for s in pd.unique(predictions["seed"])]


def seed_rows(predictions: pd.DataFrame, seed: int | None = None) -> pd.DataFrame:
    """The rows of one seed (default: the primary, first one); a table without seeds as is."""
    if "seed" not in predictions.columns:
        return predictions
    chosen = prediction_seeds(predictions)[0] if seed is None else int(seed)
    return predictions[predictions["seed"].astype(int) == chosen]


def split_arrays(
    predictions: pd.DataFrame, labels: pd.DataFrame, split: str, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, patient_ids, y_true [N,14], y_score [N,14]) of one split and one seed
    (default: the primary seed; a model trained with several seeds has one row per image and
    seed).

    Labels come from `labels` (the contract's ground truth), joined on image_id; predictions
    without a label row are an error naming the first few, not a silent drop.
    """
    predictions = seed_rows(predictions, seed)
    missing_cols = [
        c for c in ("image_id", "patient_id", "split", *FINDINGS) if c not in predictions
    ]
    if missing_cols:
        raise ValueError(f"predictions: missing column(s) {missing_cols}")
    part = predictions[predictions["split"].astype(str) == split]
    truth = labels.set_index(labels["image_id"].astype(str))[list(FINDINGS)]
    ids = part["image_id"].astype(str)
    unknown = ids[~ids.isin(truth.index)]
    if len(unknown):
        raise ValueError(
            f"predictions ({split}): {len(unknown)} image(s) not in labels, "
            f"e.g. {unknown.head(3).tolist()}"
        )
    y = truth.loc[ids.to_numpy()].to_numpy(dtype=np.int8)
    s = part[list(FINDINGS)].to_numpy(dtype=float)
    return ids.to_numpy(), part["patient_id"].to_numpy(), y, s


def select_thresholds(
    predictions: pd.DataFrame, labels: pd.DataFrame, method: str = "f1", seed: int | None = None
) -> dict[str, float]:
    """One threshold per finding from the validation rows only (test rows are never read)."""
    _, _, y, s = split_arrays(predictions, labels, "val", seed)
    return {f: select_threshold(y[:, i], s[:, i], method) for i, f in enumerate(FINDINGS)}


def positive_patients(y_true: np.ndarray, patient_ids: np.ndarray) -> np.ndarray:
    """Distinct patients with at least one positive image, per finding `[F]`.

    The unit of every small-sample judgement (`reliable`, the dagger): twelve positive films of
    two patients are two patients' worth of evidence, and a patient bootstrap has two units to
    resample."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(patient_ids)
    if len(p) != len(y):
        raise ValueError(f"patient_ids: expected {len(y)} values (one per image), got {len(p)}")
    codes, _ = pd.factorize(pd.Series(p).astype(str))
    return np.array([np.unique(codes[y[:, i]]).size for i in range(y.shape[1])], dtype=int)


def evaluate_split(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Mapping[str, float],
    patient_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of the report for one split, given fixed thresholds.

    Returns `per_finding` (finding -> metrics; with `patient_ids` also `positive_patients`),
    `macro`, `micro`, `paper`, `all_negative`, `subset_accuracy`, `n_images` and `undefined`
    (finding -> metrics that are NaN and why).
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=float)
    t = np.array([thresholds.get(f, NAN) for f in FINDINGS], dtype=float)
    patients = None if patient_ids is None else positive_patients(y, patient_ids)
    per: dict[str, dict[str, float]] = {}
    undefined: dict[str, list[str]] = {}
    for i, f in enumerate(FINDINGS):
        m = {
            "prevalence": float(y[:, i].mean()) if len(y) else NAN,
            "positives": int(y[:, i].sum()),
            **({} if patients is None else {"positive_patients": int(patients[i])}),
            "threshold": float(t[i]),
            "auroc": auroc(y[:, i], s[:, i]),
            "auprc": auprc(y[:, i], s[:, i]),
            **threshold_metrics(y[:, i], s[:, i], t[i]),
        }
        per[f] = m
        bad = [k for k, v in m.items() if isinstance(v, float) and math.isnan(v)]
        if bad:
            undefined[f] = bad
    macro = _macro(per)
    # Undefined thresholds predict "absent": the prior, and what the all-negative baseline does.
    pred = s >= np.where(np.isnan(t), np.inf, t)[None, :]
    paper = {
        "ACC": macro["accuracy"],
        "Recall": macro["recall"],
        "Precision": macro["precision"],
        "F1": macro["f1"],
    }
    all_negative = {
        "accuracy": _nanmean([1.0 - per[f]["prevalence"] for f in FINDINGS]),
        "subset_accuracy": float((y.sum(axis=1) == 0).mean()) if len(y) else NAN,
    }
    subset = float((pred == (y == 1)).all(axis=1).mean()) if len(y) else NAN
    return {
        "n_images": int(len(y)),
        "per_finding": per,
        "macro": macro,
        "micro": _micro(y, s, pred),
        "paper": paper,
        "all_negative": all_negative,
        "subset_accuracy": subset,
        "undefined": undefined,
    }


def _macro(per: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Means over the findings where each metric is defined; precision 0-filled (see the
    module doc), with how many findings each mean covers."""
    keys = ("auroc", "auprc", *THRESHOLD_METRICS)
    macro: dict[str, Any] = {k: _nanmean([per[f][k] for f in FINDINGS]) for k in keys}
    macro["n_defined"] = {k: int(sum(not math.isnan(per[f][k]) for f in FINDINGS)) for k in keys}
    # no predicted positive although the finding occurs: precision 0, not "missing"
    zero_filled = [
        f
        for f in FINDINGS
        if math.isnan(per[f]["precision"])
        and not math.isnan(per[f]["threshold"])
        and per[f]["positives"] > 0
    ]
    macro["precision"] = _nanmean(
        [0.0 if f in zero_filled else per[f]["precision"] for f in FINDINGS]
    )
    macro["precision_zero_filled"] = len(zero_filled)
    macro["n_defined"]["precision"] += len(zero_filled)
    return macro


def _micro(y: np.ndarray, s: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The ratios from TP/FP/FN/TN pooled over all findings, and the pooled AUROC/AUPRC."""
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "auroc": auroc(y.ravel(), s.ravel()),
            "auprc": auprc(y.ravel(), s.ravel()),
            **rates_from_counts(tp, fp, fn, tn),
        }


def split_prevalence(labels: pd.DataFrame, splits: pd.DataFrame, split: str) -> dict[str, float]:
    """Share of images of `split` carrying each finding (labels joined to splits on image_id)."""
    ids = splits.loc[splits["split"].astype(str) == split, "image_id"].astype(str)
    rows = labels[labels["image_id"].astype(str).isin(set(ids))]
    if rows.empty:
        return dict.fromkeys(FINDINGS, NAN)
    return {f: float(rows[f].astype(float).mean()) for f in FINDINGS}


def rare_findings(
    prevalence: Mapping[str, float], n_rarest: int = 5, max_prevalence: float | None = None
) -> list[str]:
    """The rare-finding block: findings below `max_prevalence`, else the `n_rarest` rarest.

    Ties and order follow prevalence then FINDINGS order, so the block is deterministic.
    """
    ranked = sorted(FINDINGS, key=lambda f: (prevalence.get(f, NAN), FINDINGS.index(f)))
    if max_prevalence is not None:
        return [f for f in ranked if prevalence.get(f, NAN) < max_prevalence]
    return ranked[: int(n_rarest)]


def to_jsonable(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so JSON files stay valid JSON."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def from_json_number(value: Any) -> float:
    """None (an undefined metric in JSON) -> NaN; numbers -> float."""
    return NAN if value is None else float(value)
