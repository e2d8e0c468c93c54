"""Calibration of the per-finding probabilities: expected calibration error (ECE) with
patient-bootstrap intervals, temperature scaling fitted on validation, and the threshold
rescaling torchxrayvision applies.

Why: a score is used as a probability ("12% Hernia") as soon as it is shown with two decimals,
and the project trains with balanced class weights (BCE pos_weight up to 100), which pushes the
scores of rare findings far above their frequency. Users of torchxrayvision keep asking what a
probability or a threshold means (mlmed/torchxrayvision issues 88, 96, 151, 175). This module
measures how far a score is from a probability, offers one correction, and says what 0.5 means.

* **ECE** (Naeini et al. 2015, AAAI; Guo et al. 2017, ICML "On calibration of modern neural
  networks"): the images are sorted into bins by predicted probability and
  ECE = sum_b (n_b / N) |observed rate_b - mean probability_b|
      = sum_b |sum_{i in b} (y_i - p_i)| / N.
  **Binning: 15 equal-mass bins** by default (each bin holds ~N/15 images; the edges are
  quantiles of the scores, Nixon et al. 2019 "Measuring calibration in deep learning", CVPRW).
  Why not Guo's 15 equal-width bins: a rare finding's scores crowd near 0, so equal-width bins
  put almost every image into the first bin and leave the others with a handful, and the ECE
  then measures one bin. Equal-mass bins also contain the SAME images before and after
  temperature scaling (a monotone map keeps the order), so raw and calibrated ECE compare the
  same groups of images. `reporting.calibration.binning: equal_width` gives Guo's bins.
* **Interval**: the patient bootstrap of `bootstrap.patient_weights` (same seed, same resamples
  as every other interval of the report): each resample's ECE is the weighted ECE of the
  test set's bins (the bin edges are those of the test set as is, fixed in every resample as the
  thresholds are). ECE is biased upwards (the |.| of a noisy bin mean is positive on average,
  Kumar et al. 2019, NeurIPS), and a resample adds noise: for a well-calibrated finding the
  percentile interval can lie entirely above the estimate. Read it as the spread of the
  estimate, and compare raw with calibrated through `ece_delta`, whose interval is paired (the
  same resample for both).
* **Temperature scaling** (Guo et al. 2017), one temperature T_f per finding:
  p_cal = sigmoid(logit(p) / T_f), with T_f minimising the binary negative log-likelihood on the
  VALIDATION split only (scipy's bounded scalar minimiser on log T, T in [0.05, 20]). It is a
  map on the output probability, so it applies to test-time-flip averaged scores alike. It is
  monotone: AUROC, AUPRC, rankings and the decisions at the (raw) thresholds do not change. One
  temperature cannot remove a constant shift of the logits (what class weights add, ~log
  pos_weight): a finding whose scores are too high everywhere stays too high in part. A finding
  without a positive or a negative validation image gets no temperature (None): its calibrated
  score is the raw one.
* **Threshold rescaling** (torchxrayvision's `op_norm`, `torchxrayvision/models.py`): the
  piecewise-linear map on the probability p -> p / (2t) below the threshold t and
  1 - (1 - p) / (2 (1 - t)) above, so that 0.5 is the decision threshold. It is not a
  probability, only a score whose 0.5 means "at the validation-tuned threshold".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit

from rare_cxr.evaluation.bootstrap import patient_weights, percentile_interval
from rare_cxr.evaluation.metrics import positive_patients
from rare_cxr.findings import FINDINGS

NAN = float("nan")
BINNINGS = ("equal_mass", "equal_width")
DEFAULT_BINS = 15
# Probabilities are clipped before the logit to what the project's float32 sigmoid scores can
# hold: down to float32's smallest normal number (logit -87) but only up to 1 - 2**-24, the
# largest float32 below 1 (logit 16.6): above a logit of ~17 a float32 sigmoid is exactly 1.0,
# whose logit would be infinite.
P_MIN = float(np.finfo(np.float32).tiny)
P_MAX = 1.0 - 2.0**-24
TEMPERATURE_BOUNDS = (0.05, 20.0)
METHOD = "temperature scaling (Guo et al. 2017), one temperature per finding, fitted on val"


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of probabilities clipped to [P_MIN, P_MAX]."""
    q = np.clip(np.asarray(p, dtype=float), P_MIN, P_MAX)
    return np.log(q) - np.log1p(-q)


def apply_temperature(p: np.ndarray, temperature: Any) -> np.ndarray:
    """sigmoid(logit(p) / T), element-wise; `temperature` a number or an array broadcast over
    the last axis (one per finding). A missing temperature (None, NaN) leaves p unchanged."""
    t = _numbers(temperature)
    p = np.asarray(p, dtype=float)
    scaled = expit(logit(p) / np.where(np.isfinite(t) & (t > 0), t, 1.0))
    return np.where(np.isfinite(t) & (t > 0), scaled, p)


def binary_nll(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary negative log-likelihood (nats) of labels `y` under probabilities `p`."""
    z = logit(p)
    y = np.asarray(y, dtype=float)
    return float(np.mean(np.logaddexp(0.0, z) - y * z)) if y.size else NAN


@dataclass(frozen=True)
class TemperatureFit:
    """One finding's fit: `temperature` None when the split cannot define one (`reason`)."""

    temperature: float | None
    nll_raw: float
    nll_calibrated: float
    at_bound: bool = False
    reason: str = ""


def fit_temperature(
    y_val: np.ndarray, p_val: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> TemperatureFit:
    """The temperature minimising the validation NLL of sigmoid(logit(p) / T).

    Minimised over log T (the NLL is smooth and close to convex there; T and 1/T are symmetric)
    with scipy's bounded Brent method. Needs a positive and a negative validation image: with
    one class only, the NLL keeps falling as T -> 0 (every score pushed to 0 or 1) and no
    temperature is meaningful.
    """
    y = np.asarray(y_val, dtype=float)
    z = logit(p_val)
    nll_raw = binary_nll(y, p_val)
    if not 0 < y.sum() < y.size:
        reason = "no positive validation image" if y.sum() == 0 else "no negative validation image"
        return TemperatureFit(None, nll_raw, nll_raw, reason=reason)

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-7})
    t = float(math.exp(result.x))
    at_bound = bool(min(result.x - low, high - result.x) < 1e-3)
    return TemperatureFit(t, nll_raw, float(result.fun), at_bound=at_bound)


def fit_temperatures(y_val: np.ndarray, p_val: np.ndarray) -> dict[str, TemperatureFit]:
    """One `TemperatureFit` per finding (FINDINGS order) from validation labels and scores."""
    y, p = _check(y_val, p_val)
    return {f: fit_temperature(y[:, i], p[:, i]) for i, f in enumerate(FINDINGS)}


def bin_edges(p: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_mass") -> np.ndarray:
    """Bin edges from 0 to 1: equal-width, or equal-mass (quantiles of `p`; ties can merge
    bins, so there may be fewer than `n_bins`)."""
    if binning not in BINNINGS:
        raise ValueError(
            f"reporting.calibration.binning: expected one of {BINNINGS}, got {binning!r}"
        )
    if int(n_bins) < 1:
        raise ValueError(f"reporting.calibration.n_bins: expected >= 1, got {n_bins!r}")
    if binning == "equal_width" or not np.size(p):
        return np.linspace(0.0, 1.0, int(n_bins) + 1)
    inner = np.quantile(np.asarray(p, dtype=float), np.linspace(0.0, 1.0, int(n_bins) + 1)[1:-1])
    return np.unique(np.r_[0.0, inner, 1.0])


def assign_bins(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each probability: [e_k, e_{k+1}), the last bin closed at 1."""
    idx = np.searchsorted(edges, np.asarray(p, dtype=float), side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def weighted_ece(y: np.ndarray, p: np.ndarray, bins: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ECE per row of image weights `w [R, N]` over fixed bin indices `bins [N]`:
    sum_b |sum_{i in b} w_i (y_i - p_i)| / sum_i w_i (NaN for an all-zero row)."""
    n_bins = int(bins.max()) + 1 if bins.size else 1
    onehot = np.zeros((bins.size, n_bins))
    onehot[np.arange(bins.size), bins] = 1.0
    gap = onehot * (np.asarray(y, dtype=float) - np.asarray(p, dtype=float))[:, None]
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(w @ gap).sum(axis=1) / total, NAN)


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_mass"
) -> float:
    """ECE of one finding (module doc); NaN for an empty split."""
    p = np.asarray(p, dtype=float)
    if not p.size:
        return NAN
    bins = assign_bins(p, bin_edges(p, n_bins, binning))
    return float(weighted_ece(y, p, bins, np.ones((1, p.size)))[0])


def reliability_curve(
    y: np.ndarray, p: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_mass"
) -> pd.DataFrame:
    """Per non-empty bin: mean predicted probability, observed positive rate, images."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    bins = assign_bins(p, bin_edges(p, n_bins, binning))
    frame = pd.DataFrame({"bin": bins, "p": p, "y": y})
    out = frame.groupby("bin", sort=True).agg(mean_p=("p", "mean"), observed=("y", "mean"))
    out["images"] = frame.groupby("bin", sort=True).size()
    return out.reset_index(drop=True)


def rescale_to_threshold(p: np.ndarray, thresholds: Any) -> np.ndarray:
    """torchxrayvision's `op_norm` on probabilities: [0, t] -> [0, 0.5] and [t, 1] -> [0.5, 1],
    linear on each side (so p >= t exactly when the result >= 0.5). `thresholds` broadcast over
    the last axis; a missing threshold (NaN, None) gives NaN (no decision, so no rescaled score;
    torchxrayvision returns 0.5 there)."""
    p = np.asarray(p, dtype=float)
    t = _numbers(thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = p / (2.0 * t)
        above = 1.0 - (1.0 - p) / (2.0 * (1.0 - t))
        out = np.where(p < t, below, above)
    # t = 0: everything is at or above it; t = 1: only p = 1 is
    out = np.where(t <= 0.0, 0.5 + p / 2.0, out)
    out = np.where(t >= 1.0, np.where(p >= 1.0, 1.0, p / 2.0), out)
    return np.where(np.isfinite(t), np.clip(out, 0.0, 1.0), NAN)


def _numbers(values: Any) -> np.ndarray:
    """A number or a sequence of numbers as a float array, None -> NaN (JSON's undefined)."""
    if values is None:
        return np.array(NAN)
    if isinstance(values, int | float | np.number):
        return np.array(float(values))
    return np.array([NAN if v is None else float(v) for v in values], dtype=float)


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(FINDINGS) or p.shape != y.shape:
        raise ValueError(
            f"labels/scores: expected matching [N, {len(FINDINGS)}] arrays, got {y.shape} and "
            f"{p.shape}"
        )
    return y, p


ROW_COLUMNS = (
    "finding",
    "test_positives",
    "test_positive_patients",
    "reliable",
    "temperature",
    "temperature_note",
    "val_nll_raw",
    "val_nll_calibrated",
    "test_nll_raw",
    "test_nll_calibrated",
    "ece_raw",
    "ece_raw_ci_low",
    "ece_raw_ci_high",
    "ece_calibrated",
    "ece_calibrated_ci_low",
    "ece_calibrated_ci_high",
    "ece_delta",
    "ece_delta_ci_low",
    "ece_delta_ci_high",
)


def calibration_table(  # noqa: PLR0913 -- (val, test) data, then the reporting parameters
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: np.ndarray,
    patients_test: np.ndarray,
    *,
    n_bins: int = DEFAULT_BINS,
    binning: str = "equal_mass",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_positives: int = 10,
) -> tuple[pd.DataFrame, dict[str, TemperatureFit]]:
    """(per-finding table with a `macro` row, the validation fits).

    Temperatures are fitted on (y_val, p_val) only; every ECE and test NLL is on the test split,
    raw and with the validation temperatures, with percentile intervals over the same patient
    resamples (`ece_delta` = calibrated - raw, paired in each resample). The macro row averages
    the 14 findings inside each resample. `reliable`: at least `min_positives` (and 2) positive
    test patients, as everywhere in the report.
    """
    yv, pv = _check(y_val, p_val)
    yt, pt = _check(y_test, p_test)
    pids = np.asarray(patients_test)
    if len(pids) != len(yt):
        raise ValueError(f"patient_ids: expected {len(yt)} values, got {len(pids)}")
    fits = fit_temperatures(yv, pv)
    temps = np.array([NAN if fit.temperature is None else fit.temperature for fit in fits.values()])
    pc = apply_temperature(pt, temps)
    # equal-mass bins on raw and calibrated scores hold the same images (monotone map)
    bins_raw = np.stack(
        [assign_bins(pt[:, i], bin_edges(pt[:, i], n_bins, binning)) for i in range(pt.shape[1])],
        axis=1,
    )
    bins_cal = np.stack(
        [assign_bins(pc[:, i], bin_edges(pc[:, i], n_bins, binning)) for i in range(pc.shape[1])],
        axis=1,
    )
    samples: dict[str, list[np.ndarray]] = {"raw": [], "calibrated": []}
    for w in patient_weights(pids, n_resamples, seed):
        for name, probs, bins in (("raw", pt, bins_raw), ("calibrated", pc, bins_cal)):
            samples[name].append(
                np.stack(
                    [
                        weighted_ece(yt[:, i], probs[:, i], bins[:, i], w)
                        for i in range(pt.shape[1])
                    ],
                    axis=1,
                )
            )
    boot = {k: np.concatenate(v) for k, v in samples.items()}  # [R, F]
    ones = np.ones((1, len(yt)))
    point = {
        "raw": np.array(
            [
                weighted_ece(yt[:, i], pt[:, i], bins_raw[:, i], ones)[0]
                for i in range(len(FINDINGS))
            ]
        ),
        "calibrated": np.array(
            [
                weighted_ece(yt[:, i], pc[:, i], bins_cal[:, i], ones)[0]
                for i in range(len(FINDINGS))
            ]
        ),
    }
    people = positive_patients(yt, pids) if len(yt) else np.zeros(len(FINDINGS), int)
    rows = []
    for i, f in enumerate(FINDINGS):
        fit = fits[f]
        row = {
            "finding": f,
            "test_positives": int(yt[:, i].sum()),
            "test_positive_patients": int(people[i]),
            "reliable": bool(people[i] >= max(int(min_positives), 2)),
            "temperature": NAN if fit.temperature is None else fit.temperature,
            "temperature_note": fit.reason or ("at the search bound" if fit.at_bound else ""),
            "val_nll_raw": fit.nll_raw,
            "val_nll_calibrated": fit.nll_calibrated,
            "test_nll_raw": binary_nll(yt[:, i], pt[:, i]),
            "test_nll_calibrated": binary_nll(yt[:, i], pc[:, i]),
        }
        row.update(_ece_columns(point, boot, i, confidence))
        rows.append(row)
    rows.append(_macro_row(rows, point, boot, confidence))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS)), fits


def _ece_columns(
    point: Mapping[str, np.ndarray],
    boot: Mapping[str, np.ndarray],
    index: int | slice,
    confidence: float,
) -> dict[str, float]:
    """ece_raw/calibrated/delta with intervals, for one finding (index) or the macro (slice)."""
    out: dict[str, float] = {}
    values = {
        "raw": (point["raw"][index], boot["raw"][:, index]),
        "calibrated": (point["calibrated"][index], boot["calibrated"][:, index]),
    }
    values["delta"] = (
        values["calibrated"][0] - values["raw"][0],
        values["calibrated"][1] - values["raw"][1],
    )
    for name, (value, samples) in values.items():
        macro = isinstance(index, slice)
        estimate = float(np.mean(value)) if macro else float(value)
        low, high = percentile_interval(samples.mean(axis=1) if macro else samples, confidence)
        out[f"ece_{name}"] = estimate
        out[f"ece_{name}_ci_low"], out[f"ece_{name}_ci_high"] = float(low), float(high)
    return out


def _macro_row(
    rows: Sequence[Mapping[str, Any]],
    point: Mapping[str, np.ndarray],
    boot: Mapping[str, np.ndarray],
    confidence: float,
) -> dict[str, Any]:
    """Mean over the 14 findings (ECE is defined for every finding on a non-empty split)."""
    frame = pd.DataFrame(rows)
    row: dict[str, Any] = {
        "finding": "macro",
        "test_positives": int(frame["test_positives"].sum()),
        "test_positive_patients": NAN,
        "reliable": True,
        "temperature": NAN,
        "temperature_note": "",
    }
    for column in ("val_nll_raw", "val_nll_calibrated", "test_nll_raw", "test_nll_calibrated"):
        row[column] = float(frame[column].mean())
    row.update(_ece_columns(point, boot, slice(None), confidence))
    return row
