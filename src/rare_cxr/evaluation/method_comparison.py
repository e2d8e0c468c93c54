"""Each model against its reference on what the long-tail methods change (issue 20): mAP over
all findings, mAP and AUROC over the tail findings, and the macro expected calibration error.

`paired_comparison.csv` answers "is this model better at ranking, finding by finding"; a
re-weighting loss or a decoupled head is meant to move other numbers: the rare findings'
precision-recall (mAP, the CXR-LT challenges' score), the tail's AUROC, and how far the scores
are from probabilities (ECE; class re-weighting inflates the rare findings' scores). This module
tests those differences with the same design as the rest of the report: the paired patient
bootstrap (resample r draws the same patients for both models and every seed, seed s of the
model paired with seed s of the reference; `paired.paired_bootstrap_macro` for the ranking
metrics, and the same resamples for ECE here), Holm-adjusted across the models compared on one
metric.

ECE is hand-written on top of `calibration.weighted_ece` because no library computes a weighted
(bootstrap) ECE; the bins of each model-seed-finding are fixed from its test scores as they are
(equal mass, `reporting.calibration`), as `calibration.calibration_table` does, so a resample
moves weights, not bin edges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from rare_cxr.evaluation import paired
from rare_cxr.evaluation.bootstrap import patient_weights, percentile_interval
from rare_cxr.evaluation.calibration import assign_bins, bin_edges, weighted_ece

NAN = float("nan")

# (name in the table, statistic, findings) in report order; `lower_is_better` for ECE
COMPARED = (
    ("mAP", "auprc", "all"),
    ("mAP", "auprc", "tail"),
    ("AUROC", "auroc", "tail"),
    ("ECE", "ece", "all"),
)
LOWER_IS_BETTER = {"ECE"}
COLUMNS = (
    "model",
    "reference",
    "seeds",
    "metric",
    "findings",
    "n_findings",
    "model_value",
    "reference_value",
    "delta",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "better",
    "n_resamples",
    "resamples_dropped",
    "method",
)
METHOD = "paired patient bootstrap (Holm across the models on this metric)"


def _macro_value(metric: str, y: np.ndarray, scores: np.ndarray, keep: np.ndarray) -> float:
    """Mean over seeds of the macro of `metric` over the findings `keep`, on the test set as is."""
    ones = np.ones((1, y.shape[0]))
    values = []
    for s in scores:
        block = paired._metric_block(metric, y, s, np.full(y.shape[1], NAN), ones)[0]
        values.append(float(np.nanmean(block[keep])) if keep.any() else NAN)
    return float(np.mean(values))


def _ece_bins(scores: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    """Bin index of every image `[S, N, F]`, from each seed-finding's own test scores."""
    out = np.empty(scores.shape, dtype=np.int64)
    for k in range(scores.shape[0]):
        for i in range(scores.shape[2]):
            p = scores[k, :, i]
            out[k, :, i] = assign_bins(p, bin_edges(p, n_bins, binning))
    return out


def _macro_ece(y: np.ndarray, scores: np.ndarray, bins: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per resample `[r]`: mean over seeds of the mean over findings of the ECE."""
    per_seed = [
        np.mean(
            [weighted_ece(y[:, i], scores[k, :, i], bins[k, :, i], w) for i in range(y.shape[1])],
            axis=0,
        )
        for k in range(scores.shape[0])
    ]
    return np.mean(per_seed, axis=0)


def paired_ece(  # noqa: PLR0913 -- (y, scores x 2, patients), then the bootstrap settings
    y: np.ndarray,
    scores_model: np.ndarray,
    scores_ref: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_bins: int = 15,
    binning: str = "equal_mass",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Paired patient-bootstrap test of the macro ECE difference (model - reference); scores
    `[S, N, F]`. Same keys as `paired.paired_bootstrap_macro`'s entries, plus both values."""
    bins_m = _ece_bins(scores_model, n_bins, binning)
    bins_r = _ece_bins(scores_ref, n_bins, binning)
    ones = np.ones((1, y.shape[0]))
    value_m = float(_macro_ece(y, scores_model, bins_m, ones)[0])
    value_r = float(_macro_ece(y, scores_ref, bins_r, ones)[0])
    deltas = np.concatenate(
        [
            _macro_ece(y, scores_model, bins_m, w) - _macro_ece(y, scores_ref, bins_r, w)
            for w in patient_weights(patient_ids, n_resamples, seed)
        ]
    )
    low, high = percentile_interval(deltas, confidence)
    return {
        "model_value": value_m,
        "reference_value": value_r,
        "delta": value_m - value_r,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": paired.bootstrap_p_value(deltas),
        "n_resamples": int(np.count_nonzero(~np.isnan(deltas))),
        "resamples_dropped": int(np.count_nonzero(np.isnan(deltas))),
    }


# (model, reference) -> (y [N, F], patients [N], scores_model [S,N,F], scores_ref [S,N,F], t_m,
# t_r, seeds): what the pipeline node gathers from the predictions of both models
PairArrays = Callable[
    [str, str],
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None,
]


def compare_pair(  # noqa: PLR0913 -- arrays of one pair, then the reporting settings
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int],
    tail: np.ndarray,
    *,
    n_bins: int,
    binning: str,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> list[dict[str, object]]:
    """The rows of one (model, reference) pair, one per `COMPARED` entry, before Holm."""
    y, patients, scores_m, scores_r, t_m, t_r, seeds = arrays
    rows: list[dict[str, object]] = []
    masks = {"all": np.ones(y.shape[1], bool), "tail": np.asarray(tail, bool)}
    for name, statistic, findings in COMPARED:
        keep = masks[findings]
        if statistic == "ece":
            test = paired_ece(
                y,
                scores_m,
                scores_r,
                patients,
                n_bins=n_bins,
                binning=binning,
                n_resamples=n_resamples,
                seed=seed,
                confidence=confidence,
            )
        elif keep.any():
            test = paired.paired_bootstrap_macro(
                y,
                scores_m,
                scores_r,
                t_m,
                t_r,
                patients,
                n_resamples=n_resamples,
                seed=seed,
                confidence=confidence,
                metrics=(statistic,),
                findings=keep,
            )[statistic]
            test["model_value"] = _macro_value(statistic, y, scores_m, keep)
            test["reference_value"] = _macro_value(statistic, y, scores_r, keep)
        else:  # no tail finding in this data (the frequency groups are the training split's)
            test = {}
        rows.append(
            {
                "seeds": seeds,
                "metric": name,
                "findings": findings,
                "n_findings": int(keep.sum()),
                "model_value": test.get("model_value", NAN),
                "reference_value": test.get("reference_value", NAN),
                "delta": test.get("delta", NAN),
                "ci_low": test.get("ci_low", NAN),
                "ci_high": test.get("ci_high", NAN),
                "p_value": test.get("p_value", NAN),
                "n_resamples": test.get("n_resamples", 0),
                "resamples_dropped": test.get("resamples_dropped", 0),
                "method": METHOD if test else "",
            }
        )
    return rows


def method_comparison(
    pairs: Sequence[tuple[str, str]],
    arrays_of: PairArrays,
    tail: np.ndarray,
    *,
    n_bins: int = 15,
    binning: str = "equal_mass",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """`method_comparison.csv`: each (model, reference) pair on the `COMPARED` metrics.

    `arrays_of(model, reference)` gives the pair's test arrays (None: no common seed, the pair
    is skipped). `tail` (bool `[F]`): the tail findings (`longtail.frequency_groups` of the
    training split). `better` says which side the difference favours only where the Holm-
    adjusted p is below 1 - confidence ("model", "reference"), else "neither"; for ECE lower is
    better.
    """
    rows: list[dict[str, object]] = []
    for model, reference in pairs:
        arrays = arrays_of(model, reference)
        if arrays is None:
            continue
        for row in compare_pair(
            arrays,
            tail,
            n_bins=n_bins,
            binning=binning,
            n_resamples=n_resamples,
            seed=seed,
            confidence=confidence,
        ):
            rows.append({"model": model, "reference": reference, **row})
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "better")])
    table["p_holm"] = NAN
    for _, index in table.groupby(["metric", "findings"], sort=False).groups.items():
        table.loc[index, "p_holm"] = paired.holm(table.loc[index, "p_value"].to_numpy(float))
    alpha = 1.0 - float(confidence)
    table["better"] = [
        _better(metric, delta, p, alpha)
        for metric, delta, p in zip(table["metric"], table["delta"], table["p_holm"], strict=True)
    ]
    return table[list(COLUMNS)]


def _better(metric: str, delta: float, p_holm: float, alpha: float) -> str:
    if not (np.isfinite(delta) and np.isfinite(p_holm)) or p_holm >= alpha or delta == 0:
        return "neither"
    model_wins = delta < 0 if metric in LOWER_IS_BETTER else delta > 0
    return "model" if model_wins else "reference"
