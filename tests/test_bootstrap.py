"""Patient bootstrap: weighted metrics equal scikit-learn's, resampling is by patient, seeded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from rare_cxr.evaluation import bootstrap
from rare_cxr.findings import FINDINGS


def data(n: int = 90, seed: int = 3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(FINDINGS))) < 0.25).astype(bool)
    y[:3] = True
    y[:, FINDINGS.index("Hernia")] = False
    s = np.round(np.clip(0.3 * y + rng.random(y.shape) * 0.7, 0, 1), 2)  # ties on purpose
    patients = np.repeat(np.arange(n // 3), 3)  # 3 images per patient
    return y, s, patients


def test_weighted_auroc_and_ap_match_sklearn_sample_weight():
    y, s, _ = data()
    w = np.random.default_rng(0).integers(0, 4, size=(5, len(y))).astype(float)
    for i in range(3):
        auc = bootstrap.weighted_auroc(y[:, i], s[:, i], w)
        ap = bootstrap.weighted_average_precision(y[:, i], s[:, i], w)
        for r in range(len(w)):
            assert auc[r] == pytest.approx(roc_auc_score(y[:, i], s[:, i], sample_weight=w[r]))
            assert ap[r] == pytest.approx(
                average_precision_score(y[:, i], s[:, i], sample_weight=w[r])
            )


def test_images_of_a_patient_move_together():
    patients = np.array([7, 7, 7, 9, 9, 11, 12, 12, 12, 12])
    for w in bootstrap.patient_weights(patients, n_resamples=50, seed=1, chunk_size=16):
        for p in np.unique(patients):
            block = w[:, patients == p]
            assert np.all(block == block[:, :1])  # same weight for every image of a patient
        first = [np.flatnonzero(patients == p)[0] for p in np.unique(patients)]
        assert np.all(w[:, first].sum(axis=1) == 4)  # 4 patients drawn per resample


def test_intervals_reproducible_for_a_seed_and_differ_across_seeds():
    y, s, patients = data()
    t = np.full(len(FINDINGS), 0.5)
    a = bootstrap.bootstrap_intervals(y, s, t, patients, n_resamples=60, seed=5)
    b = bootstrap.bootstrap_intervals(y, s, t, patients, n_resamples=60, seed=5)
    c = bootstrap.bootstrap_intervals(y, s, t, patients, n_resamples=60, seed=6)
    assert json.dumps(a) == json.dumps(b)  # NaN-safe equality
    assert a["macro"]["auroc"] != c["macro"]["auroc"]
    lo, hi = a["per_finding"]["Atelectasis"]["auroc"]
    point = roc_auc_score(y[:, 0], s[:, 0])
    assert lo <= point <= hi
    assert np.isnan(a["per_finding"]["Hernia"]["auroc"]).all()
    assert a["unit"] == "patient" and a["n_resamples"] == 60


def test_undefined_threshold_gives_undefined_intervals():
    y, s, patients = data()
    t = np.full(len(FINDINGS), 0.5)
    t[1] = np.nan
    out = bootstrap.bootstrap_intervals(y, s, t, patients, n_resamples=20, seed=0)
    assert np.isnan(out["per_finding"][FINDINGS[1]]["f1"]).all()
    assert not np.isnan(out["per_finding"][FINDINGS[1]]["auroc"]).any()


def test_bad_parameters_are_named():
    y, s, patients = data()
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap.bootstrap_intervals(y, s, np.zeros(14), patients, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap.bootstrap_intervals(y, s, np.zeros(14), patients, confidence=1.5)


def test_bootstrap_samples_equal_expanded_rows_scored_by_sklearn_and_intervals_nanquantile():
    """Independent reference: turn each resample's patient counts into repeated rows (a
    patient drawn twice appears twice) and score them with scikit-learn."""
    from sklearn.metrics import f1_score

    y, s, patients = data()
    thresholds = np.full(len(FINDINGS), 0.5)
    thresholds[FINDINGS.index("Edema")] = np.nan
    samples = bootstrap.bootstrap_samples(y, s, thresholds, patients, n_resamples=30, seed=5)
    weights = np.concatenate(list(bootstrap.patient_weights(patients, 30, 5)))
    reference = {"auroc": [], "auprc": [], "f1": []}
    for w in weights:
        rows = np.repeat(np.arange(len(y)), w.astype(int))
        yy, ss = y[rows], s[rows]
        for name, score in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
            reference[name].append(
                [
                    score(yy[:, i], ss[:, i]) if 0 < yy[:, i].sum() < len(yy) else np.nan
                    for i in range(len(FINDINGS))
                ]
            )
        reference["f1"].append(
            [
                f1_score(yy[:, i], ss[:, i] >= thresholds[i])
                if yy[:, i].any() and not np.isnan(thresholds[i])
                else np.nan
                for i in range(len(FINDINGS))
            ]
        )
    for name, values in reference.items():
        np.testing.assert_allclose(samples[name], np.array(values), rtol=1e-9, atol=1e-12)
    # the reported interval is the percentile interval of exactly these samples
    ci = bootstrap.bootstrap_intervals(y, s, thresholds, patients, n_resamples=30, seed=5)
    auroc = np.array(reference["auroc"])
    for i, f in enumerate(FINDINGS):
        if np.isfinite(auroc[:, i]).any():
            want = np.nanquantile(auroc[:, i], [0.025, 0.975])
            np.testing.assert_allclose(ci["per_finding"][f]["auroc"], want)
    macro = np.nanmean(auroc, axis=1)
    np.testing.assert_allclose(ci["macro"]["auroc"], np.nanquantile(macro, [0.025, 0.975]))
