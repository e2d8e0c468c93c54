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


# --- issue 18: one set of findings per macro resample; binomial intervals where it degenerates


def test_macro_interval_averages_one_set_and_counts_the_dropped_resamples():
    y, s, patients = data(n=120, seed=5)
    rare = FINDINGS.index("Pneumonia")
    y[:, rare] = False
    y[[3, 4], rare] = True  # two films of one patient (patient 1): missed by ~37% of resamples
    t = np.full(len(FINDINGS), 0.5)
    samples = bootstrap.bootstrap_samples(y, s, t, patients, n_resamples=300, seed=2)
    out = bootstrap.bootstrap_intervals(y, s, t, patients, n_resamples=300, seed=2)
    lost = np.isnan(samples["auroc"][:, rare])
    assert 0.25 < lost.mean() < 0.5
    # the set: findings with an AUROC on the test set as is (Hernia has no positive: not in it)
    keep = [i for i in range(len(FINDINGS)) if i != FINDINGS.index("Hernia")]
    kept = samples["auroc"][~lost][:, keep].mean(axis=1)
    want = np.quantile(kept, [0.025, 0.975])
    np.testing.assert_allclose(out["macro"]["auroc"], want)
    assert out["macro_resamples_dropped"]["auroc"] == int(lost.sum())
    assert out["macro_resamples_dropped"]["accuracy"] == 0  # defined whatever is drawn
    means, dropped = bootstrap.fixed_set_mean(np.array([[1.0, np.nan], [2.0, 4.0]]), [0.5, 0.5])
    assert dropped == 1 and np.isnan(means[0]) and means[1] == 3.0
    means, dropped = bootstrap.fixed_set_mean(np.array([[1.0, np.nan], [2.0, 4.0]]), [0.5, np.nan])
    np.testing.assert_array_equal(means, [1.0, 2.0])
    assert dropped == 0


def test_degenerate_proportions_get_a_clopper_pearson_interval_on_patients():
    from scipy.stats import binomtest

    y, s, patients = data(n=150, seed=8)  # 50 patients of 3 films
    t = np.full(len(FINDINGS), 0.5)
    few = FINDINGS.index("Edema")
    y[:, few] = False
    y[[0, 3, 6, 9], few] = True  # 4 films of 4 patients ...
    s[[0, 3, 6, 9], few] = 0.9  # ... all detected: recall 4/4
    clustered = FINDINGS.index("Fibrosis")
    y[:, clustered] = False
    y[[12, 13, 14, 15], clustered] = True  # 4 films of 2 patients (4 and 5)
    s[[12, 13, 14, 15], clustered] = 0.9
    out = bootstrap.bootstrap_intervals(y, s, t, patients, n_resamples=100, seed=0)
    per, how = out["per_finding"], out["per_finding_method"]
    exact = binomtest(4, 4).proportion_ci(0.95, "exact")
    assert per["Edema"]["recall"] == pytest.approx([exact.low, 1.0])  # [0.398, 1], not [1, 1]
    assert how["Edema"]["recall"] == "Clopper-Pearson (patients)"
    two = binomtest(2, 2).proportion_ci(0.95, "exact")  # 4 films of 2 patients: 2 units
    assert per["Fibrosis"]["recall"] == pytest.approx([two.low, 1.0])
    # every proportion of a finding with < min_positives positive patients, not only 0 or 1
    pred = s[:, few] >= 0.5
    k, n = int((~y[:, few] & ~pred).sum()), int((~y[:, few]).sum())
    low, high = per["Edema"]["specificity"]
    assert how["Edema"]["specificity"] == "Clopper-Pearson (patients)"
    assert low < k / n < high
    # a common finding with a proportion strictly inside (0, 1) keeps its bootstrap interval
    common = FINDINGS.index("Atelectasis")
    assert how[FINDINGS[common]]["recall"] == "bootstrap"
    assert how["Edema"]["auroc"] == "bootstrap"  # AUROC is not a proportion of counts
    wilson = bootstrap.bootstrap_intervals(
        y, s, t, patients, n_resamples=100, seed=0, proportion_method="wilson"
    )
    w = binomtest(4, 4).proportion_ci(0.95, "wilson")
    assert wilson["per_finding"]["Edema"]["recall"] == pytest.approx([w.low, w.high])
    assert wilson["per_finding_method"]["Edema"]["recall"] == "Wilson (patients)"


@pytest.mark.parametrize("method", ["exact", "wilson"])
def test_proportion_interval_matches_scipy(method):
    from scipy.stats import binomtest

    from rare_cxr.evaluation import proportions

    for n in (1, 2, 3, 7, 20, 113):
        ks = np.arange(n + 1)
        low, high = proportions.proportion_interval(ks, np.full(n + 1, n), 0.9, method)
        for k in ks:
            ci = binomtest(int(k), n).proportion_ci(0.9, method)
            assert (low[k], high[k]) == pytest.approx((ci.low, ci.high), abs=1e-10), (k, n)
    low, high = proportions.proportion_interval([0], [0])
    assert np.isnan(low).all() and np.isnan(high).all()
    with pytest.raises(ValueError, match="proportion_interval"):
        proportions.proportion_interval(1, 2, method="agresti")
    assert proportions.patient_counts(6, 12, 3) == (1.5, 3.0)


# --- issue 19: the faster weighted metrics give the numbers of the grouped form, bit for bit ----


def grouped_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`bootstrap.weighted_auroc` as it was before issue 19 (tied-score groups summed with
    `np.add.reduceat` over every film): the reference of the rewrite."""
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


def grouped_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`bootstrap.weighted_average_precision` as it was before issue 19 (the reference)."""
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


@pytest.mark.parametrize("decimals", [1, 2, 6])  # many ties ... almost none
@pytest.mark.parametrize("prevalence", [0.002, 0.05, 0.5, 0.97])
def test_weighted_metrics_equal_the_grouped_form_bit_for_bit(decimals: int, prevalence: float):
    """Patient-draw weights (integers, many zero), unit weights and the edge cases (no positive
    or no negative drawn in a resample, a finding without positives): the same floats."""
    rng = np.random.default_rng(decimals * 100 + int(prevalence * 1000))
    n = 3000
    patients = np.sort(rng.integers(0, 800, n))
    y = rng.random(n) < prevalence
    s = np.round(np.clip(0.2 * y + rng.random(n), 0, 1), decimals)
    blocks = list(bootstrap.patient_weights(patients, n_resamples=120, seed=4, chunk_size=50))
    blocks.append(np.ones((1, n)))
    for w in blocks:
        for yy in (y, np.zeros(n, bool), np.ones(n, bool)):
            np.testing.assert_array_equal(
                bootstrap.weighted_auroc(yy, s, w), grouped_auroc(yy, s, w)
            )
            np.testing.assert_array_equal(
                bootstrap.weighted_average_precision(yy, s, w),
                grouped_average_precision(yy, s, w),
            )


def test_weighted_metrics_with_fractional_weights_agree_with_the_grouped_form():
    """Fractional weights (no caller uses them) agree to rounding error, not bit for bit."""
    rng = np.random.default_rng(9)
    y = rng.random(500) < 0.1
    s = np.round(rng.random(500), 2)
    w = rng.random((20, 500))
    np.testing.assert_allclose(bootstrap.weighted_auroc(y, s, w), grouped_auroc(y, s, w), 1e-12)
    np.testing.assert_allclose(
        bootstrap.weighted_average_precision(y, s, w), grouped_average_precision(y, s, w), 1e-12
    )
