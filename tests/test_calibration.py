"""Calibration: temperature scaling on validation, ECE against hand values and scikit-learn,
the threshold rescaling against hand values (rare_cxr.evaluation.calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit
from sklearn.calibration import calibration_curve

from rare_cxr.evaluation import calibration as C
from rare_cxr.evaluation.bootstrap import patient_weights
from rare_cxr.findings import FINDINGS

F = len(FINDINGS)


def miscalibrated(n: int, temperature: float, seed: int, prior: float = -2.0):
    """Labels drawn from sigmoid(z) and a model that reports sigmoid(z * temperature): its
    logits are those of a calibrated model multiplied by `temperature` (overconfident > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(prior, 1.5, size=n)
    y = (rng.random(n) < expit(z)).astype(int)
    return y, expit(z * temperature)


@pytest.mark.parametrize("true_t", [0.4, 1.0, 2.5, 6.0])
def test_temperature_is_recovered_within_5_percent_and_lowers_the_nll(true_t):
    y, p = miscalibrated(20_000, true_t, seed=int(true_t * 10))
    fit = C.fit_temperature(y, p)
    assert fit.temperature == pytest.approx(true_t, rel=0.05)
    assert fit.nll_calibrated <= fit.nll_raw + 1e-12
    if true_t != 1.0:
        assert fit.nll_calibrated < fit.nll_raw - 1e-3  # a real gain when miscalibrated
    assert not fit.at_bound and fit.reason == ""
    # the NLL of the fitted temperature is the minimum: neighbours are not lower
    for factor in (0.9, 1.1):
        assert C.binary_nll(y, C.apply_temperature(p, fit.temperature * factor)) > (
            fit.nll_calibrated
        )


def test_no_temperature_without_both_classes_and_missing_means_identity():
    p = np.array([0.1, 0.4, 0.8])
    fit = C.fit_temperature(np.zeros(3), p)
    assert fit.temperature is None and fit.reason == "no positive validation image"
    assert C.fit_temperature(np.ones(3), p).reason == "no negative validation image"
    grid = np.array([[0.2, 0.7], [0.9, 0.05]])
    out = C.apply_temperature(grid, [2.0, None])
    # T = 2 halves the logit: logit(0.2) = -log 4 -> sigmoid(-log 2) = 1/3
    assert out[0, 0] == pytest.approx(1 / 3)
    assert out[1, 0] == pytest.approx(expit(math.log(9) / 2))
    np.testing.assert_array_equal(out[:, 1], grid[:, 1])  # None: unchanged
    np.testing.assert_allclose(C.apply_temperature(grid, 1.0), grid)


def test_ece_by_hand_for_both_binnings():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    # equal mass, 2 bins: {0.1, 0.2} mean 0.15 observed 0; {0.3, 0.4} mean 0.35 observed 1
    # ECE = 2/4 * 0.15 + 2/4 * 0.65 = 0.4
    assert C.expected_calibration_error(y, p, 2, "equal_mass") == pytest.approx(0.4)
    # equal width, 2 bins: all four in [0, 0.5): mean 0.25, observed 0.5 -> 0.25
    assert C.expected_calibration_error(y, p, 2, "equal_width") == pytest.approx(0.25)
    # a perfectly calibrated bin structure: ECE 0
    assert C.expected_calibration_error([0, 1, 0, 1], [0.5] * 4, 3) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"reporting\.calibration\.binning"):
        C.expected_calibration_error(y, p, 2, "quantile")


@pytest.mark.parametrize(
    ("binning", "strategy"), [("equal_width", "uniform"), ("equal_mass", "quantile")]
)
def test_ece_equals_scikit_learns_calibration_curve(binning, strategy):
    y, p = miscalibrated(3000, 2.0, seed=4)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=15, strategy=strategy)
    edges = C.bin_edges(p, 15, binning)
    counts = np.bincount(C.assign_bins(p, edges), minlength=len(edges) - 1)
    counts = counts[counts > 0]
    expected = float(np.sum(counts * np.abs(prob_true - prob_pred)) / len(p))
    assert C.expected_calibration_error(y, p, 15, binning) == pytest.approx(expected)
    curve = C.reliability_curve(y, p, 15, binning)
    np.testing.assert_allclose(curve["observed"], prob_true)
    np.testing.assert_allclose(curve["mean_p"], prob_pred)


def test_weighted_ece_equals_ece_on_the_repeated_rows():
    y, p = miscalibrated(120, 1.7, seed=8)
    patients = np.repeat(np.arange(40), 3)
    bins = C.assign_bins(p, C.bin_edges(p, 5, "equal_mass"))
    w = next(patient_weights(patients, 7, seed=3))
    got = C.weighted_ece(y, p, bins, w)
    for r in range(len(w)):
        rows = np.repeat(np.arange(len(y)), w[r].astype(int))
        gap = np.bincount(bins[rows], weights=y[rows] - p[rows], minlength=bins.max() + 1)
        assert got[r] == pytest.approx(np.abs(gap).sum() / len(rows))


def test_rescale_to_threshold_by_hand():
    p = np.array([0.0, 0.1, 0.2, 0.6, 1.0])
    # t = 0.2: below, p / 0.4; above, 1 - (1 - p) / 1.6
    np.testing.assert_allclose(C.rescale_to_threshold(p, 0.2), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(C.rescale_to_threshold(np.array([0.3, 0.9]), 0.9), [1 / 6, 0.5])
    grid = np.array([[0.05, 0.5, 0.7], [0.3, 0.2, 0.0]])
    out = C.rescale_to_threshold(grid, [0.1, 0.6, None])
    np.testing.assert_allclose(out[:, 0], [0.25, 1 - 0.7 / 1.8])
    np.testing.assert_allclose(out[:, 1], [0.5 / 1.2, 0.2 / 1.2])
    assert np.isnan(out[:, 2]).all()  # no threshold, no rescaled score
    # the decision is unchanged: rescaled >= 0.5 exactly when p >= t
    rng = np.random.default_rng(0)
    q, t = rng.random(500), rng.random(500)
    np.testing.assert_array_equal(C.rescale_to_threshold(q, t) >= 0.5, q >= t)
    # monotone in p for a fixed threshold
    assert np.all(np.diff(C.rescale_to_threshold(np.linspace(0, 1, 101), 0.07)) > 0)


def test_calibration_table_fits_on_validation_and_reports_raw_and_calibrated_ece():
    rng = np.random.default_rng(1)
    n_val, n_test = 1500, 1500
    temperatures = np.linspace(0.5, 3.0, F)

    def split(n, seed):
        ys, ps = [], []
        for i, t in enumerate(temperatures):
            y, p = miscalibrated(n, t, seed=seed * 100 + i)
            ys.append(y)
            ps.append(p)
        return np.stack(ys, axis=1), np.stack(ps, axis=1)

    yv, pv = split(n_val, 1)
    yt, pt = split(n_test, 2)
    hernia = FINDINGS.index("Hernia")
    yv[:, hernia] = 0  # no validation positive: no temperature
    patients = rng.integers(0, 500, size=n_test)
    table, fits = C.calibration_table(
        yv, pv, yt, pt, patients, n_bins=15, n_resamples=40, seed=2, min_positives=10
    )
    assert list(table.columns) == list(C.ROW_COLUMNS)
    assert table["finding"].tolist() == [*FINDINGS, "macro"]
    rows = table.set_index("finding")
    assert fits["Hernia"].temperature is None and math.isnan(rows.loc["Hernia", "temperature"])
    assert rows.loc["Hernia", "temperature_note"] == "no positive validation image"
    assert rows.loc["Hernia", "ece_calibrated"] == pytest.approx(rows.loc["Hernia", "ece_raw"])
    others = rows.drop(index=["Hernia", "macro"])
    # every temperature within 20% of the truth on 1,500 validation images
    truth = dict(zip(FINDINGS, temperatures, strict=True))
    for f, r in others.iterrows():
        assert r["temperature"] == pytest.approx(truth[f], rel=0.2), f
        assert r["val_nll_calibrated"] <= r["val_nll_raw"] + 1e-12
    miscal = others[np.abs(np.log(others["temperature"])) > np.log(1.5)]
    assert (miscal["ece_calibrated"] < miscal["ece_raw"]).all()
    assert (miscal["test_nll_calibrated"] < miscal["test_nll_raw"]).all()
    for name in ("raw", "calibrated", "delta"):
        assert (table[f"ece_{name}_ci_low"] <= table[f"ece_{name}_ci_high"]).all()
    # a badly calibrated finding's ECE lies inside its interval; a calibrated one's interval
    # can sit above it (resampling adds noise, and |.| turns noise into a larger ECE)
    worst = rows.loc[FINDINGS[-2]]  # temperature 2.8
    assert worst["ece_raw_ci_low"] <= worst["ece_raw"] <= worst["ece_raw_ci_high"]
    macro = rows.loc["macro"]
    assert macro["ece_raw"] == pytest.approx(rows.drop(index="macro")["ece_raw"].mean())
    assert macro["ece_delta"] < 0 and macro["ece_delta_ci_high"] < 0
    # the test ECE is the module's function on the test split as is
    i = FINDINGS.index("Mass")
    assert rows.loc["Mass", "ece_raw"] == pytest.approx(
        C.expected_calibration_error(yt[:, i], pt[:, i], 15)
    )
    with pytest.raises(ValueError, match="patient_ids"):
        C.calibration_table(yv, pv, yt, pt, patients[:-1], n_resamples=5)
