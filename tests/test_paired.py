"""Paired tests: fast DeLong against a slow definition and the bootstrap, Holm, paired bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from rare_cxr.evaluation import bootstrap, paired
from rare_cxr.evaluation.metrics import threshold_metrics
from rare_cxr.findings import FINDINGS

F = len(FINDINGS)
HERNIA = FINDINGS.index("Hernia")
PNEUMONIA = FINDINGS.index("Pneumonia")


def slow_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. 1988 from the O(m n) kernel psi(x, y) = [x > y] + [x == y] / 2."""
    y = y.astype(bool)
    k = scores.shape[0]
    m, n = int(y.sum()), int((~y).sum())
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    for r in range(k):
        x, z = scores[r, y], scores[r, ~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        v10[r] = psi.mean(axis=1)  # one per positive
        v01[r] = psi.mean(axis=0)  # one per negative
    auc = v10.mean(axis=1)
    cov = np.empty((k, k))
    for a in range(k):
        for b in range(k):
            s10 = np.sum((v10[a] - auc[a]) * (v10[b] - auc[b])) / (m - 1)
            s01 = np.sum((v01[a] - auc[a]) * (v01[b] - auc[b])) / (n - 1)
            cov[a, b] = s10 / m + s01 / n
    return auc, cov


def correlated_scores(n: int, seed: int, gap: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels `[n]` and two correlated score vectors `[2, n]` sharing an image effect.

    Positives are rare (15%) and their shared effect more spread out than the negatives', so
    the positives' and negatives' structural components have different variances (a mix-up of
    m and n in S10 / m + S01 / n would show).
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(int)
    shared = rng.normal(size=n) * (1.0 + 1.5 * y)  # how hard the image is, for both models
    ref = 1.0 * y + shared + 0.7 * rng.normal(size=n)
    model = (1.0 + gap) * y + shared + 0.7 * rng.normal(size=n)
    return y, np.stack([model, ref])


def cohort(n_patients: int = 50, per_patient: int = 3, seed: int = 0, gap: float = 0.0):
    """14-finding test set: Hernia never present, Pneumonia in 3 images, ties on purpose."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    patients = np.repeat(np.arange(n_patients) + 1000, per_patient)
    y = rng.random((n, F)) < np.linspace(0.1, 0.4, F)[None, :]
    y[:, HERNIA] = False
    y[:, PNEUMONIA] = False
    y[[0, 40, 90], PNEUMONIA] = True
    y = y.astype(np.int8)
    shared = rng.normal(size=(n, F)) + rng.normal(size=(n_patients, 1)).repeat(per_patient, 0)
    ref = np.round(0.8 * y + shared + 0.6 * rng.normal(size=(n, F)), 1)
    model = np.round((0.8 + gap) * y + shared + 0.6 * rng.normal(size=(n, F)), 1)
    thresholds = np.full(F, 0.5)
    thresholds[PNEUMONIA] = np.nan  # as if validation had no positives
    return y, model, ref, thresholds, patients


# --- DeLong ----------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many tied scores
def test_fast_delong_equals_sklearn_auc_and_slow_structural_components(decimals):
    y, s = correlated_scores(300, seed=1)
    rng = np.random.default_rng(2)
    s = np.vstack([s, s[0] + rng.normal(size=s.shape[1])])  # k = 3
    if decimals is not None:
        s = np.round(s, decimals)
        assert len(np.unique(s[0])) < s.shape[1] / 2
    auc, cov = paired.delong_covariance(y, s)
    for r in range(3):
        assert auc[r] == pytest.approx(roc_auc_score(y, s[r]), abs=1e-12)
    slow_auc, slow_cov = slow_delong(y, s)
    np.testing.assert_allclose(auc, slow_auc, atol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, rtol=1e-9, atol=1e-15)
    assert np.all(np.linalg.eigvalsh(cov) > 0) and np.allclose(cov, cov.T)


def test_delong_undefined_and_shape_errors():
    s = np.arange(6.0)
    auc, cov = paired.delong_covariance(np.zeros(6), s)
    assert np.isnan(auc).all() and np.isnan(cov).all()
    res = paired.delong_paired(np.ones(6), s, s[::-1])
    assert all(np.isnan(v) for v in res.values())
    one = paired.delong_paired(np.array([0, 0, 0, 1, 0, 0]), s, s[::-1])
    assert one["delta"] == pytest.approx(0.6 - 0.4) and np.isnan(one["se"])
    with pytest.raises(ValueError, match="scores"):
        paired.delong_covariance(np.zeros(6), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="same shape"):
        paired.delong_paired(np.r_[0, 1, 0, 1, 0, 1], np.zeros((2, 6)), np.zeros(6))
    with pytest.raises(ValueError, match="contrast"):
        paired.delong_contrast(np.r_[0, 1, 0, 1, 0, 1], np.zeros((2, 6)), [1, -1, 0])


def test_delong_paired_variance_matches_image_bootstrap_with_sklearn():
    y, (model, ref) = correlated_scores(600, seed=2, gap=0.3)
    res = paired.delong_paired(y, model, ref)
    rng = np.random.default_rng(11)
    both_y, both_s = np.stack([y, y], axis=1), np.stack([model, ref], axis=1)
    deltas = []
    for _ in range(2000):  # images drawn with replacement; both models scored on the same draw
        idx = rng.integers(0, len(y), len(y))
        auc_model, auc_ref = roc_auc_score(both_y[idx], both_s[idx], average=None)
        deltas.append(auc_model - auc_ref)
    boot_var = np.var(deltas, ddof=1)
    assert res["se"] ** 2 == pytest.approx(boot_var, rel=0.15)
    # ... and much smaller than if the two AUCs were independent: the pairing matters.
    _, cov = paired.delong_covariance(y, np.stack([model, ref]))
    assert res["se"] ** 2 < 0.7 * (cov[0, 0] + cov[1, 1])
    assert res["delta"] == pytest.approx(res["auc_model"] - res["auc_ref"])


def test_delong_identical_better_swapped_and_perfect():
    y, (model, ref) = correlated_scores(400, seed=3, gap=1.2)
    same = paired.delong_paired(y, ref, ref.copy())
    assert same["delta"] == 0.0 and same["se"] == 0.0 and same["p_value"] == 1.0
    assert same["ci_low"] == same["ci_high"] == 0.0
    better = paired.delong_paired(y, model, ref)
    assert better["p_value"] < 1e-3 and better["ci_low"] > 0
    swapped = paired.delong_paired(y, ref, model)
    assert swapped["delta"] == pytest.approx(-better["delta"])
    assert swapped["ci_low"] == pytest.approx(-better["ci_high"])
    assert swapped["ci_high"] == pytest.approx(-better["ci_low"])
    assert swapped["p_value"] == pytest.approx(better["p_value"])
    perfect = paired.delong_paired(y, y.astype(float), -y.astype(float))  # AUC 1 vs AUC 0
    assert perfect["delta"] == 1.0 and perfect["se"] == 0.0 and perfect["p_value"] == 0.0


def test_delong_seeds_are_the_mean_contrast():
    y, (model, ref) = correlated_scores(300, seed=5, gap=0.3)
    one = paired.delong_paired(y, model, ref)
    assert paired.delong_paired(y, model[None], ref[None]) == one
    twice = paired.delong_paired(y, np.stack([model, model]), np.stack([ref, ref]))
    assert twice["delta"] == pytest.approx(one["delta"], abs=1e-12)
    assert twice["se"] == pytest.approx(one["se"], rel=1e-9)
    rng = np.random.default_rng(0)
    seeds_m = model + 0.3 * rng.normal(size=(3, len(y)))
    seeds_r = ref + 0.3 * rng.normal(size=(3, len(y)))
    res = paired.delong_paired(y, seeds_m, seeds_r)
    by_sklearn = np.mean(
        [roc_auc_score(y, seeds_m[s]) - roc_auc_score(y, seeds_r[s]) for s in range(3)]
    )
    assert res["delta"] == pytest.approx(by_sklearn, abs=1e-12)
    _, cov = paired.delong_covariance(y, np.vstack([seeds_m, seeds_r]))
    c = np.r_[np.full(3, 1 / 3), np.full(3, -1 / 3)]
    assert res["se"] == pytest.approx(np.sqrt(c @ cov @ c), rel=1e-9)
    same = paired.delong_paired(y, seeds_m, seeds_m.copy())
    assert same["delta"] == 0.0 and same["p_value"] == 1.0


# --- patient-clustered DeLong (Obuchowski 1997) ------------------------------------------


def slow_obuchowski(y: np.ndarray, scores: np.ndarray, clusters: np.ndarray):
    """Obuchowski (1997, Biometrics 53:567, section 2) written out from the paper, O(m n).

    Placement values from the kernel over EVERY (positive film, negative film) pair, then per
    patient i: V10(i) = sum over its positive films, V01(i) = sum over its negative films;
    S10 = I10 / ((I10 - 1) N1) sum_i (V10(i) - m_i A)^2, S01 alike,
    S11 = I / (I - 1) sum_i (V10(i) - m_i A)(V01(i) - n_i A),
    var = S10 / N1 + S01 / N0 + 2 S11 / (N1 N0); for k score rows the covariance by the
    same sums of products.
    """
    y = y.astype(bool)
    patients = list(dict.fromkeys(clusters.tolist()))
    n1, n0 = int(y.sum()), int((~y).sum())
    k = scores.shape[0]
    v10_i = np.zeros((k, len(patients)))
    v01_i = np.zeros((k, len(patients)))
    m_i = np.zeros(len(patients))
    n_i = np.zeros(len(patients))
    auc = np.zeros(k)
    for r in range(k):
        x, z = scores[r, y], scores[r, ~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        auc[r] = psi.sum() / (n1 * n0)
        for j, patient in enumerate(patients):
            mine = clusters == patient
            v10_i[r, j] = psi[mine[y]].sum() / n0
            v01_i[r, j] = psi[:, mine[~y]].sum() / n1
            m_i[j], n_i[j] = (mine & y).sum(), (mine & ~y).sum()
    i10, i01, i_all = int((m_i > 0).sum()), int((n_i > 0).sum()), len(patients)
    a10 = v10_i - m_i[None] * auc[:, None]
    a01 = v01_i - n_i[None] * auc[:, None]
    cov = np.empty((k, k))
    for a in range(k):
        for b in range(k):
            s10 = i10 / ((i10 - 1) * n1) * np.sum(a10[a] * a10[b])
            s01 = i01 / ((i01 - 1) * n0) * np.sum(a01[a] * a01[b])
            s11_ab = i_all / (i_all - 1) * np.sum(a10[a] * a01[b])
            s11_ba = i_all / (i_all - 1) * np.sum(a10[b] * a01[a])
            cov[a, b] = s10 / n1 + s01 / n0 + (s11_ab + s11_ba) / (n1 * n0)
    return auc, cov


def clustered_films(n_patients: int, seed: int, films: int = 9, gap: float = 0.0):
    """Labels, two models' scores `[2, N]` and patient ids: ~`films` films per patient.

    A patient is sick with probability 0.3 and then ~70% of its films are positive (follow-ups
    of one patient mix positive and negative films); each model has its own per-patient bias,
    shared by all of that patient's films -- what makes films of one patient dependent and the
    image-level DeLong test too sure of itself.
    """
    rng = np.random.default_rng(seed)
    counts = 1 + rng.poisson(films - 1, n_patients)
    patients = np.repeat(np.arange(n_patients), counts)
    sick = rng.random(n_patients) < 0.3
    y = (sick[patients] & (rng.random(patients.size) < 0.7)).astype(int)
    shared = rng.normal(size=n_patients)[patients]

    def model(g: float) -> np.ndarray:
        bias = 0.8 * rng.normal(size=n_patients)[patients]
        return (1.0 + g) * y + shared + bias + 0.5 * rng.normal(size=patients.size)

    return y, np.stack([model(gap), model(0.0)]), patients + 5000


@pytest.mark.parametrize("decimals", [None, 1])
def test_clustered_delong_equals_obuchowski_written_out(decimals):
    y, s, patients = clustered_films(25, seed=3)
    s = np.vstack([s, s[0] + np.random.default_rng(4).normal(size=s.shape[1])])  # k = 3
    if decimals is not None:
        s = np.round(s, decimals)
    mixed = [p for p in np.unique(patients) if 0 < y[patients == p].sum() < (patients == p).sum()]
    assert len(mixed) >= 3  # patients with films on both sides: the S11 term is exercised
    auc, cov = paired.delong_covariance(y, s, clusters=patients)
    slow_auc, slow_cov = slow_obuchowski(y, s, patients)
    np.testing.assert_allclose(auc, slow_auc, atol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, rtol=1e-9, atol=1e-15)
    # the contrast test reads c' S c off the same covariance
    res = paired.delong_contrast(y, s, [1, -1, 0], clusters=patients)
    c = np.array([1.0, -1.0, 0.0])
    assert res["se"] == pytest.approx(np.sqrt(c @ slow_cov @ c), rel=1e-9)
    # patient ids are labels: any spelling of the same grouping gives the same answer
    renamed = np.array([f"p{v:06d}" for v in patients[::-1]])[::-1]
    assert paired.delong_contrast(y, s, [1, -1, 0], clusters=renamed) == res


def test_one_film_per_patient_is_plain_delong():
    y, s = correlated_scores(300, seed=7)
    plain_auc, plain_cov = paired.delong_covariance(y, s)
    auc, cov = paired.delong_covariance(y, s, clusters=np.arange(len(y)) * 3 + 11)
    np.testing.assert_allclose(auc, plain_auc, atol=1e-15)
    np.testing.assert_allclose(cov, plain_cov, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(cov, slow_delong(y, s)[1], rtol=1e-9, atol=1e-15)
    a = paired.delong_paired(y, s[0], s[1], clusters=np.arange(len(y)))
    b = paired.delong_paired(y, s[0], s[1])
    assert a["se"] == pytest.approx(b["se"], rel=1e-12)
    assert a["p_value"] == pytest.approx(b["p_value"], rel=1e-9)


def test_clustered_se_matches_the_patient_bootstrap_and_exceeds_the_image_level_one():
    y, (model, ref), patients = clustered_films(80, seed=11, gap=0.2)
    clustered = paired.delong_paired(y, model, ref, clusters=patients)
    image_level = paired.delong_paired(y, model, ref)
    deltas = np.concatenate(
        [
            bootstrap.weighted_auroc(y, model, w) - bootstrap.weighted_auroc(y, ref, w)
            for w in bootstrap.patient_weights(patients, 3000, seed=5)
        ]
    )
    boot_se = np.nanstd(deltas, ddof=1)
    assert clustered["se"] == pytest.approx(boot_se, rel=0.12)
    assert image_level["se"] < 0.6 * clustered["se"]  # the clustering matters in this data
    assert clustered["delta"] == image_level["delta"]


def test_type_one_error_of_equal_models_with_nine_films_per_patient():
    """200 simulated test sets, two models of equal skill, ~9 films per patient: the
    patient-clustered test rejects at alpha = 0.05 in 0.05 +- 0.03 of them; the image-level
    DeLong test (films as independent) far more often."""
    clustered, image_level, films = [], [], []
    for r in range(200):
        y, (a, b), patients = clustered_films(60, seed=1000 + r)
        films.append(len(y) / len(np.unique(patients)))
        clustered.append(paired.delong_paired(y, a, b, clusters=patients)["p_value"] < 0.05)
        image_level.append(paired.delong_paired(y, a, b)["p_value"] < 0.05)
    assert 8.5 < np.mean(films) < 9.5
    assert abs(np.mean(clustered) - 0.05) <= 0.03, np.mean(clustered)
    assert np.mean(image_level) > 0.2, np.mean(image_level)


def test_a_single_positive_patient_leaves_the_variance_undefined():
    y, (model, ref), patients = clustered_films(30, seed=2, gap=0.5)
    first_sick = patients[np.flatnonzero(y)[0]]
    y = np.where(patients == first_sick, y, 0)  # all positives now come from one patient
    assert y.sum() >= 2
    res = paired.delong_paired(y, model, ref, clusters=patients)
    assert np.isfinite(res["delta"])
    assert np.isnan(res["se"]) and np.isnan(res["p_value"]) and np.isnan(res["ci_low"])
    assert np.isfinite(paired.delong_paired(y, model, ref)["se"])  # films alone would "test"
    with pytest.raises(ValueError, match="clusters"):
        paired.delong_paired(y, model, ref, clusters=patients[1:])


# --- Holm and the bootstrap p ----------------------------------------------------------------


def test_holm_hand_worked_with_nans():
    p = [0.01, np.nan, 0.04, 0.03, 0.005]
    # m = 4 defined: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> max 0.06
    np.testing.assert_allclose(paired.holm(p), [0.03, np.nan, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(paired.holm([0.5, 0.6, np.nan]), [1.0, 1.0, np.nan])
    assert np.isnan(paired.holm([np.nan, np.nan])).all()
    assert paired.holm([]).shape == (0,)


def test_bootstrap_p_value_counts_both_tails():
    # R = 4: P(<= 0) = (1 + 1) / 5, P(>= 0) = (3 + 1) / 5 -> p = 2 * 0.4
    assert paired.bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0, np.nan])) == pytest.approx(0.8)
    assert paired.bootstrap_p_value(np.zeros(10)) == 1.0
    assert paired.bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000)
    assert np.isnan(paired.bootstrap_p_value(np.full(3, np.nan)))


# --- paired patient bootstrap ----------------------------------------------------------------


def expanded_macro(y, s, t, idx, metric):
    """Macro of one model on the rows of a resample repeated `count` times, by scikit-learn."""
    ye, se = y[idx], s[idx]
    out = np.full(F, np.nan)
    for i in range(F):
        if metric == "auroc" and 0 < ye[:, i].sum() < len(ye):
            out[i] = roc_auc_score(ye[:, i], se[:, i])
        elif metric == "auprc" and ye[:, i].sum() > 0:
            out[i] = average_precision_score(ye[:, i], se[:, i])
        elif metric == "f1":
            out[i] = threshold_metrics(ye[:, i], se[:, i], t[i])["f1"]
    return out


def test_paired_bootstrap_equals_expanded_resamples_scored_with_sklearn():
    y, model, ref, t, patients = cohort(seed=2, gap=0.3)
    rng = np.random.default_rng(9)
    sm = np.stack([model, model + np.round(0.5 * rng.normal(size=model.shape), 1)])  # S = 2
    sr = np.stack([ref, ref + np.round(0.5 * rng.normal(size=ref.shape), 1)])
    tm = np.stack([t, t + 0.1])
    tr = np.stack([t, t - 0.1])
    tr[0, 2] = np.nan  # undefined for the reference only: that F1 leaves both macros
    samples = paired.paired_bootstrap_samples(y, sm, sr, tm, tr, patients, n_resamples=40, seed=123)
    w = next(bootstrap.patient_weights(patients, 40, 123))[:8]
    everything = np.arange(len(y))
    # the macro's ONE set per seed: defined for both models on the test set as is
    sets = {
        (metric, s): ~np.isnan(expanded_macro(y, sm[s], tm[s], everything, metric))
        & ~np.isnan(expanded_macro(y, sr[s], tr[s], everything, metric))
        for metric in ("auroc", "auprc", "f1")
        for s in range(2)
    }
    assert sets["auroc", 0][PNEUMONIA] and not sets["auroc", 0][HERNIA]
    n_undefined_pneumonia = 0
    for r in range(len(w)):
        idx = np.repeat(np.arange(len(y)), w[r].astype(int))
        lost = y[idx, PNEUMONIA].sum() == 0
        n_undefined_pneumonia += int(lost)
        for metric in ("auroc", "auprc", "f1"):
            per_seed = []
            for s in range(2):
                a = expanded_macro(y, sm[s], tm[s], idx, metric)
                b = expanded_macro(y, sr[s], tr[s], idx, metric)
                keep = sets[metric, s]
                per_seed.append(a[keep].mean() - b[keep].mean())  # NaN if one is undefined
            want = np.mean(per_seed)
            if lost and metric in ("auroc", "auprc"):  # Pneumonia is in their set: dropped
                assert np.isnan(samples[metric][r]) and np.isnan(want), (metric, r)
            else:
                assert samples[metric][r] == pytest.approx(want, abs=1e-10), (metric, r)
    assert n_undefined_pneumonia >= 1  # the fixed-set rule was exercised
    assert all(v.shape == (40,) for v in samples.values())
    macro = paired.paired_bootstrap_macro(y, sm, sr, tm, tr, patients, n_resamples=40, seed=123)
    for metric in ("auroc", "auprc", "f1"):
        dropped = int(np.isnan(samples[metric]).sum())
        assert macro[metric]["resamples_dropped"] == dropped
        assert macro[metric]["n_resamples"] == 40 - dropped
    assert macro["auroc"]["resamples_dropped"] >= n_undefined_pneumonia


def test_paired_bootstrap_identical_better_and_swapped():
    y, model, ref, t, patients = cohort(seed=4, gap=1.0)
    same = paired.paired_bootstrap_macro(y, ref, ref.copy(), t, t, patients, n_resamples=50)
    for m in ("auroc", "auprc", "f1"):
        assert same[m]["delta"] == 0.0 and same[m]["p_value"] == 1.0
        assert same[m]["ci_low"] == same[m]["ci_high"] == 0.0
    kw = {"n_resamples": 2000, "seed": 1}
    better = paired.paired_bootstrap_macro(y, model, ref, t, t, patients, **kw)
    swapped = paired.paired_bootstrap_macro(y, ref, model, t, t, patients, **kw)
    for m in ("auroc", "auprc"):
        b, s = better[m], swapped[m]
        assert b["p_value"] < 2e-3 and b["ci_low"] > 0, m
        # Pneumonia's 3 positive patients are all missed by ~4.5% of the resamples: dropped
        assert (
            0 < b["resamples_dropped"] < 200 and b["n_resamples"] + b["resamples_dropped"] == 2000
        )
        assert s["delta"] == pytest.approx(-b["delta"])
        assert s["ci_low"] == pytest.approx(-b["ci_high"])
        assert s["ci_high"] == pytest.approx(-b["ci_low"])
        assert s["p_value"] == pytest.approx(b["p_value"])
    # The point estimate is the same statistic on the test set as is.
    auc_m = [roc_auc_score(y[:, i], model[:, i]) for i in range(F) if i != HERNIA]
    auc_r = [roc_auc_score(y[:, i], ref[:, i]) for i in range(F) if i != HERNIA]
    assert better["auroc"]["delta"] == pytest.approx(np.mean(auc_m) - np.mean(auc_r))


def test_paired_bootstrap_seed_axis():
    y, model, ref, t, patients = cohort(seed=6, gap=0.2)
    kw = {"n_resamples": 30, "seed": 3}
    flat = paired.paired_bootstrap_macro(y, model, ref, t, t, patients, **kw)
    one = paired.paired_bootstrap_macro(y, model[None], ref[None], t[None], t[None], patients, **kw)
    assert one == flat
    twice = paired.paired_bootstrap_macro(
        y,
        np.stack([model, model]),
        np.stack([ref, ref]),
        np.stack([t, t]),
        np.stack([t, t]),
        patients,
        **kw,
    )
    for m in ("auroc", "auprc", "f1"):
        assert twice[m]["delta"] == flat[m]["delta"]
        assert twice[m]["ci_low"] == pytest.approx(flat[m]["ci_low"])
    with pytest.raises(ValueError, match="seeds"):
        paired.paired_bootstrap_macro(y, np.stack([model, model]), ref, t, t, patients, **kw)
    with pytest.raises(ValueError, match="patient_ids"):
        paired.paired_bootstrap_macro(y, model, ref, t, t, patients[1:], **kw)


# --- report rows -----------------------------------------------------------------------------


def test_paired_comparison_rows():
    y, model, ref, t, patients = cohort(seed=8, gap=0.5)
    rows = paired.paired_comparison_rows(
        "multiscale",
        "singlescale",
        y,
        np.stack([model, model + 0.1]),
        np.stack([ref, ref]),
        np.stack([t, t]),
        np.stack([t, t]),
        patients,
        n_resamples=50,
        seed=0,
        confidence=0.95,
    )
    assert list(rows.columns) == [
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
        "seed_sd",
        "resamples_dropped",
    ]
    assert len(rows) == 3 + F
    assert set(rows["finding"]) <= {*FINDINGS, "macro"}
    assert (rows["model"] == "multiscale").all() and (rows["reference"] == "singlescale").all()
    macro = rows[rows["finding"] == "macro"]
    assert list(macro["metric"]) == ["auroc", "auprc", "f1"]
    assert (macro["method"] == "paired patient bootstrap").all() and macro["p_holm"].isna().all()
    per = rows[rows["finding"] != "macro"].set_index("finding")
    assert list(per.index) == list(FINDINGS)
    assert (per["metric"] == "auroc").all()
    assert (per["method"] == "clustered DeLong (patients, Obuchowski 1997)").all()
    # the per-finding test is the patient-clustered one, with the rows' patients as clusters
    effusion = FINDINGS.index("Effusion")
    clustered = paired.delong_paired(
        y[:, effusion],
        np.stack([model, model + 0.1])[:, :, effusion],
        np.stack([ref, ref])[:, :, effusion],
        clusters=patients,
    )
    assert per.loc["Effusion", "p_value"] == clustered["p_value"]
    # model + 0.1 ranks like model: both seeds give the same AUC difference, so sd 0
    assert per.loc["Effusion", "seed_sd"] == clustered["seed_sd"] == pytest.approx(0, abs=1e-15)
    assert macro["resamples_dropped"].notna().all() and per["resamples_dropped"].isna().all()
    assert np.isnan(per.loc["Hernia", ["delta", "p_value", "p_holm"]].astype(float)).all()
    np.testing.assert_allclose(per["p_holm"], paired.holm(per["p_value"].to_numpy()))
    defined = per["p_value"].notna()
    assert (per.loc[defined, "p_holm"] >= per.loc[defined, "p_value"]).all()
    i = FINDINGS.index("Effusion")
    expected = np.mean(
        [
            roc_auc_score(y[:, i], model[:, i] + d) - roc_auc_score(y[:, i], ref[:, i])
            for d in (0, 0.1)
        ]
    )
    assert per.loc["Effusion", "delta"] == pytest.approx(expected)
    assert isinstance(rows, pd.DataFrame)
