"""rare_cxr.evaluation.metrics against scikit-learn on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from rare_cxr.evaluation import metrics
from rare_cxr.findings import FINDINGS


def make_split(n: int = 60, seed: int = 0, empty: str | None = "Hernia"):
    """Labels and informative scores for all 14 findings; `empty` has no positives."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(FINDINGS))) < 0.3).astype(np.int8)
    y[0, :] = 1  # every finding at least once...
    if empty is not None:
        y[:, FINDINGS.index(empty)] = 0  # ...except the empty one
    s = np.clip(0.35 * y + rng.random(y.shape) * 0.7, 0, 1)
    return y, s


def make_frames(n_val: int = 60, n_test: int = 80, seed: int = 0):
    """`predictions` and `labels` DataFrames in the contract's layout; 2 images per patient."""
    yv, sv = make_split(n_val, seed, empty="Hernia")
    yt, st = make_split(n_test, seed + 1, empty="Hernia")
    ids = [f"{i:08d}_000.png" for i in range(n_val + n_test)]
    patients = [i // 2 for i in range(n_val + n_test)]
    split = ["val"] * n_val + ["test"] * n_test
    preds = pd.DataFrame({"image_id": ids, "patient_id": patients, "split": split})
    labels = pd.DataFrame({"image_id": ids, "patient_id": patients})
    for i, f in enumerate(FINDINGS):
        preds[f] = np.r_[sv[:, i], st[:, i]]
        labels[f] = np.r_[yv[:, i], yt[:, i]].astype(np.int8)
    return preds, labels


def test_auroc_auprc_match_sklearn_and_are_undefined_without_positives():
    y, s = make_split()
    for i, f in enumerate(FINDINGS):
        if f == "Hernia":
            assert math.isnan(metrics.auroc(y[:, i], s[:, i]))
            assert math.isnan(metrics.auprc(y[:, i], s[:, i]))
        else:
            assert metrics.auroc(y[:, i], s[:, i]) == pytest.approx(roc_auc_score(y[:, i], s[:, i]))
            assert metrics.auprc(y[:, i], s[:, i]) == pytest.approx(
                average_precision_score(y[:, i], s[:, i])
            )


def test_threshold_metrics_match_sklearn():
    y, s = make_split()
    for i in range(len(FINDINGS)):
        if y[:, i].sum() == 0:
            continue
        t = 0.5
        got = metrics.threshold_metrics(y[:, i], s[:, i], t)
        pred = (s[:, i] >= t).astype(int)
        assert got["precision"] == pytest.approx(
            precision_score(y[:, i], pred, zero_division=np.nan), nan_ok=True
        )
        assert got["recall"] == pytest.approx(recall_score(y[:, i], pred))
        assert got["f1"] == pytest.approx(f1_score(y[:, i], pred))
        tn = np.sum((pred == 0) & (y[:, i] == 0))
        assert got["specificity"] == pytest.approx(tn / np.sum(y[:, i] == 0))
        assert got["accuracy"] == pytest.approx(np.mean(pred == y[:, i]))


def test_no_positive_finding_is_undefined_not_zero():
    y = np.zeros(10, dtype=int)
    s = np.linspace(0, 1, 10)
    got = metrics.threshold_metrics(y, s, 0.5)
    assert math.isnan(got["recall"]) and math.isnan(got["f1"])
    assert got["precision"] == 0.0  # 5 predicted positives, all false: defined, and zero
    assert got["specificity"] == pytest.approx(0.5)
    assert math.isnan(metrics.select_threshold(y, s, "f1"))
    assert math.isnan(metrics.select_threshold(y, s, "youden"))
    nothing = metrics.threshold_metrics(np.r_[1, 0, 0], np.r_[0.1, 0.2, 0.3], 0.9)
    assert math.isnan(nothing["precision"]) and nothing["recall"] == 0.0


def test_threshold_selection_max_f1_and_youden():
    y, s = make_split()
    yi, si = y[:, 0], s[:, 0]
    t = metrics.select_threshold(yi, si, "f1")
    p, r, ts = precision_recall_curve(yi, si)
    best = np.nanmax(2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12))
    assert f1_score(yi, (si >= t).astype(int)) == pytest.approx(best)
    tj = metrics.select_threshold(yi, si, "youden")
    fpr, tpr, thr = roc_curve(yi, si)
    assert (tpr - fpr)[list(thr).index(tj)] == pytest.approx(np.max(tpr - fpr))
    with pytest.raises(ValueError, match="threshold_method"):
        metrics.select_threshold(yi, si, "median")


def test_thresholds_come_from_validation_only():
    preds, labels = make_frames()
    before = metrics.select_thresholds(preds, labels, "f1")
    test_ids = preds.loc[preds["split"] == "test", "image_id"]
    flipped = labels.copy()
    rows = flipped["image_id"].isin(test_ids)
    flipped.loc[rows, list(FINDINGS)] = 1 - flipped.loc[rows, list(FINDINGS)]
    scrambled = preds.copy()
    scrambled.loc[scrambled["split"] == "test", list(FINDINGS)] = 0.123
    after = metrics.select_thresholds(scrambled, flipped, "f1")
    assert before.keys() == after.keys()
    for f in FINDINGS:
        assert (math.isnan(before[f]) and math.isnan(after[f])) or before[f] == after[f]
    assert math.isnan(before["Hernia"])


def test_evaluate_split_aggregates_and_paper_numbers():
    preds, labels = make_frames()
    thresholds = metrics.select_thresholds(preds, labels)
    _, _, y, s = metrics.split_arrays(preds, labels, "test")
    out = metrics.evaluate_split(y, s, thresholds)
    per = out["per_finding"]
    defined = [f for f in FINDINGS if not math.isnan(per[f]["f1"])]
    assert "Hernia" not in defined and len(defined) == 13
    assert out["paper"]["F1"] == pytest.approx(np.mean([per[f]["f1"] for f in defined]))
    assert out["paper"]["ACC"] == pytest.approx(np.mean([per[f]["accuracy"] for f in defined]))
    assert out["macro"]["n_defined"]["auroc"] == 13
    assert set(out["undefined"]["Hernia"]) >= {"auroc", "auprc", "recall", "f1", "threshold"}
    prev = y.mean(axis=0)
    assert out["all_negative"]["accuracy"] == pytest.approx(np.mean(1 - prev))
    t = np.array([thresholds[f] for f in FINDINGS])
    pred = s >= np.where(np.isnan(t), np.inf, t)
    assert out["subset_accuracy"] == pytest.approx(np.mean((pred == (y == 1)).all(axis=1)))
    assert out["micro"]["recall"] == pytest.approx(
        recall_score(y.ravel(), pred.ravel().astype(int))
    )
    assert out["micro"]["auroc"] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()))
    json_ready = metrics.to_jsonable(out)
    assert json_ready["per_finding"]["Hernia"]["auroc"] is None


def test_rare_findings_from_training_prevalence():
    prevalence = {f: 0.1 + i / 100 for i, f in enumerate(FINDINGS)}
    prevalence["Hernia"] = 0.001
    assert metrics.rare_findings(prevalence, n_rarest=2) == ["Hernia", "Atelectasis"]
    assert metrics.rare_findings(prevalence, max_prevalence=0.105) == ["Hernia", "Atelectasis"]


def test_predictions_without_labels_fail_clearly():
    preds, labels = make_frames()
    with pytest.raises(ValueError, match="not in labels"):
        metrics.select_thresholds(preds, labels.iloc[5:])


def test_balanced_accuracy_matches_sklearn_and_macro_precision_counts_silent_findings_as_zero():
    from sklearn.metrics import balanced_accuracy_score

    from rare_cxr.evaluation import bootstrap

    y, s = make_split(80, seed=3, empty=None)
    thresholds = {f: 0.5 for f in FINDINGS}
    silent = FINDINGS.index("Edema")
    s[:, silent] = 0.1  # Edema occurs but is never predicted: precision 0/0
    out = metrics.evaluate_split(y, s, thresholds)
    for i, f in enumerate(FINDINGS):
        want = balanced_accuracy_score(y[:, i], (s[:, i] >= 0.5).astype(int))
        assert out["per_finding"][f]["balanced_accuracy"] == pytest.approx(want)
    assert math.isnan(out["per_finding"]["Edema"]["precision"])  # per finding: undefined
    others = [out["per_finding"][f]["precision"] for f in FINDINGS if f != "Edema"]
    assert out["macro"]["precision"] == pytest.approx(sum(others) / len(FINDINGS))  # 0 counted
    assert out["macro"]["precision_zero_filled"] == 1
    # the interval is computed the same way: it brackets the zero-filled point estimate
    ci = bootstrap.bootstrap_intervals(
        y, s, np.full(len(FINDINGS), 0.5), np.arange(len(y)) // 2, n_resamples=200, seed=1
    )
    low, high = ci["macro"]["precision"]
    assert low <= out["macro"]["precision"] <= high


def test_positive_patients_count_patients_not_films():
    y = np.zeros((8, len(FINDINGS)), dtype=int)
    y[[0, 1, 2, 3], 0] = 1  # 4 films of 2 patients
    y[[7], 1] = 1
    patients = np.array(["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p5"])
    got = metrics.positive_patients(y, patients)
    assert got[0] == 2 and got[1] == 1 and got[2:].sum() == 0
    out = metrics.evaluate_split(y, np.zeros(y.shape), {f: 0.5 for f in FINDINGS}, patients)
    assert out["per_finding"][FINDINGS[0]]["positives"] == 4
    assert out["per_finding"][FINDINGS[0]]["positive_patients"] == 2
    assert (
        "positive_patients"
        not in metrics.evaluate_split(y, np.zeros(y.shape), {})["per_finding"][FINDINGS[0]]
    )
    with pytest.raises(ValueError, match="patient_ids"):
        metrics.positive_patients(y, patients[1:])
