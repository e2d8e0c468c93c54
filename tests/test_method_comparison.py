"""The long-tail methods' comparison table (issue 20 item 5): each model against its reference
on mAP, tail mAP, tail AUROC and macro ECE, by the paired patient bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from rare_cxr.evaluation import calibration, method_comparison, paired

N, F = 240, 4
TAIL = np.array([False, False, True, True])


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(N // 3), 3)  # three films a patient
    y = rng.random((N, F)) < np.array([0.4, 0.3, 0.1, 0.08])
    y[:4] = True  # every finding has positives
    signal = y + rng.normal(0, 0.8, (N, F))
    good = 1 / (1 + np.exp(-signal))
    noisy = 1 / (1 + np.exp(-(y * 0.3 + rng.normal(0, 1.0, (N, F)))))
    return y.astype(int), patients, good, noisy


def _arrays(y, patients, a, b):
    t = np.full((1, F), 0.5)
    return y, patients, a[None], b[None], t, t, 1


def test_point_values_are_the_library_metrics_and_the_delta_their_difference():
    y, patients, good, noisy = _data()
    rows = method_comparison.compare_pair(
        _arrays(y, patients, good, noisy),
        TAIL,
        n_bins=10,
        binning="equal_mass",
        n_resamples=200,
        seed=1,
        confidence=0.95,
    )
    got = {(r["metric"], r["findings"]): r for r in rows}
    ap = lambda s, cols: np.mean([average_precision_score(y[:, i], s[:, i]) for i in cols])  # noqa: E731
    auc = lambda s, cols: np.mean([roc_auc_score(y[:, i], s[:, i]) for i in cols])  # noqa: E731
    ece = lambda s: np.mean(  # noqa: E731
        [calibration.expected_calibration_error(y[:, i], s[:, i], 10) for i in range(F)]
    )
    expected = {
        ("mAP", "all"): (ap(good, range(F)), ap(noisy, range(F))),
        ("mAP", "tail"): (ap(good, [2, 3]), ap(noisy, [2, 3])),
        ("AUROC", "tail"): (auc(good, [2, 3]), auc(noisy, [2, 3])),
        ("ECE", "all"): (ece(good), ece(noisy)),
    }
    assert set(got) == set(expected)
    for key, (model, reference) in expected.items():
        row = got[key]
        assert row["model_value"] == pytest.approx(model, abs=1e-9), key
        assert row["reference_value"] == pytest.approx(reference, abs=1e-9), key
        assert row["delta"] == pytest.approx(model - reference, abs=1e-9), key
        assert row["ci_low"] <= row["delta"] <= row["ci_high"], key
    assert got[("mAP", "tail")]["n_findings"] == 2 and got[("ECE", "all")]["n_findings"] == F


def test_the_ranking_rows_are_the_paired_macro_bootstrap_on_the_same_resamples():
    y, patients, good, noisy = _data(3)
    rows = method_comparison.compare_pair(
        _arrays(y, patients, good, noisy),
        TAIL,
        n_bins=10,
        binning="equal_mass",
        n_resamples=150,
        seed=7,
        confidence=0.9,
    )
    tail_auroc = next(r for r in rows if r["metric"] == "AUROC")
    direct = paired.paired_bootstrap_macro(
        y,
        good,
        noisy,
        np.full(F, 0.5),
        np.full(F, 0.5),
        patients,
        n_resamples=150,
        seed=7,
        confidence=0.9,
        metrics=("auroc",),
        findings=TAIL,
    )["auroc"]
    for key in ("delta", "ci_low", "ci_high", "p_value"):
        assert tail_auroc[key] == pytest.approx(direct[key], abs=1e-12), key


def test_a_model_against_itself_differs_by_nothing():
    y, patients, good, _ = _data(1)
    result = method_comparison.paired_ece(y, good[None], good[None], patients, n_resamples=100)
    assert result["delta"] == 0.0 and result["p_value"] == 1.0
    assert result["ci_low"] == result["ci_high"] == 0.0


def test_ece_is_resampled_by_patient_and_lower_is_better():
    y, patients, good, _ = _data(2)
    # the same ranking, miscalibrated: every probability pushed towards 1
    overconfident = good**0.2
    table = method_comparison.method_comparison(
        [("calibrated", "overconfident"), ("overconfident", "calibrated")],
        lambda m, r: _arrays(
            y,
            patients,
            *(good if name == "calibrated" else overconfident for name in (m, r)),
        ),
        TAIL,
        n_bins=10,
        n_resamples=200,
    )
    ece = table[table["metric"] == "ECE"].set_index("model")
    assert ece.loc["calibrated", "delta"] < 0 < ece.loc["overconfident", "delta"]
    assert ece.loc["calibrated", "better"] == "model"
    assert ece.loc["overconfident", "better"] == "reference"
    # the ranking is the same: AUROC and mAP differ by nothing, so neither is better
    ranking = table[table["metric"] != "ECE"]
    assert np.allclose(ranking["delta"], 0.0) and set(ranking["better"]) == {"neither"}
    assert list(table.columns) == list(method_comparison.COLUMNS)


def test_holm_adjusts_across_the_models_on_one_metric():
    y, patients, good, noisy = _data(4)
    table = method_comparison.method_comparison(
        [("a", "ref"), ("b", "ref")],
        lambda m, r: _arrays(y, patients, good if m == "a" else noisy * 0.9 + 0.05, noisy),
        TAIL,
        n_resamples=200,
    )
    for (_metric, _findings), part in table.groupby(["metric", "findings"]):
        expected = paired.holm(part["p_value"].to_numpy(float))
        assert np.allclose(part["p_holm"], expected, equal_nan=True)
        assert (part["p_holm"].dropna() >= part["p_value"][part["p_holm"].notna()]).all()


def test_a_pair_without_a_common_seed_is_skipped_and_no_tail_gives_empty_cells():
    y, patients, good, noisy = _data(5)
    table = method_comparison.method_comparison(
        [("a", "ref"), ("lonely", "ref")],
        lambda m, r: None if m == "lonely" else _arrays(y, patients, good, noisy),
        np.zeros(F, bool),
        n_resamples=50,
    )
    assert set(table["model"]) == {"a"}
    tail = table[table["findings"] == "tail"]
    assert len(tail) == 2 and tail["delta"].isna().all() and (tail["better"] == "neither").all()
    assert isinstance(table, pd.DataFrame)
