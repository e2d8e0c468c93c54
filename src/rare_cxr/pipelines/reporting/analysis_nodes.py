"""Reporting nodes of the analyses beyond the paper (issue 20): calibration (temperatures fitted
on validation, test ECE raw and calibrated), underdiagnosis by subgroup, and the long-tail
ranking by tail mAP / tail AUROC. Thin adapters over `rare_cxr.evaluation.calibration`,
`.underdiagnosis` and `.longtail`; a module of their own because `nodes.py` is long already
(STYLE.md: split a nodes module by domain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation import calibration, figures, longtail, metrics, paired, underdiagnosis
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.params import ReportingParams, validate_reporting_params
from rare_cxr.pipelines.reporting.test_arrays import (
    _seed_arrays,
    _seed_thresholds,
    _test_arrays,
    _test_table,
)


def _by_model(inputs: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """`{model: value}` of the keyword inputs named `<model>__<kind>`."""
    return {k.rsplit("__", 1)[0]: v for k, v in inputs.items() if k.endswith(f"__{kind}")}


# --- calibration ------------------------------------------------------------------------------


def calibration_metrics(
    predictions: pd.DataFrame, labels: pd.DataFrame, reporting: ReportingParams
) -> dict[str, Any]:
    """One temperature per finding fitted on the VALIDATION rows (what the model bundle
    carries), then the test ECE raw and calibrated with patient-bootstrap intervals (primary
    seed: the bundle's weights)."""
    cfg = validate_reporting_params(reporting)
    bins = cfg["calibration"]
    _, _, y_val, p_val = metrics.split_arrays(predictions, labels, "val")
    _, patients, y_test, p_test = _test_table(predictions, labels)
    table, fits = calibration.calibration_table(
        y_val,
        p_val,
        y_test,
        p_test,
        patients,
        n_bins=bins["n_bins"],
        binning=bins["binning"],
        min_positives=cfg["min_positives"],
        **cfg["bootstrap"],
    )
    return metrics.to_jsonable(
        {
            "method": calibration.METHOD,
            "split": "val",
            "evaluated_on": "test",
            "binning": bins["binning"],
            "n_bins": bins["n_bins"],
            "temperatures": {f: fit.temperature for f, fit in fits.items()},
            "per_finding": table.to_dict(orient="records"),
        }
    )


def build_calibration_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`calibration.csv`: model x finding (and macro) from inputs named `<model>__calibration`."""
    rows = [
        {"model": model, **row}
        for model, value in _by_model(inputs, "calibration").items()
        for row in value["per_finding"]
    ]
    return pd.DataFrame(rows, columns=["model", *calibration.ROW_COLUMNS])


def plot_reliability_rare(
    labels: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    reporting: ReportingParams,
    **inputs: Any,
) -> Any:
    """Reliability diagram per rare finding (test), every model raw and calibrated; inputs
    `<model>__predictions` and `<model>__calibration`."""
    cfg = validate_reporting_params(reporting)["calibration"]
    y, scores = _test_arrays(labels, _by_model(inputs, "predictions"))
    temperatures = {
        model: [value["temperatures"].get(f) for f in FINDINGS]
        for model, value in _by_model(inputs, "calibration").items()
    }
    return figures.reliability_per_finding(
        y,
        scores,
        temperatures,
        list(rare_findings["findings"]),
        n_bins=cfg["n_bins"],
        binning=cfg["binning"],
    )


# --- underdiagnosis ---------------------------------------------------------------------------


def underdiagnosis_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: Mapping[str, Any],
    reporting: ReportingParams,
) -> dict[str, Any]:
    """The "any finding" decision's underdiagnosis rate by sex and age band (test split,
    primary seed, validation thresholds), with patient-bootstrap intervals and the gap to the
    overall rate."""
    cfg = validate_reporting_params(reporting)
    ids, _, y, s = _test_table(predictions, labels)
    meta = labels.assign(image_id=labels["image_id"].astype(str)).set_index("image_id")
    meta = meta.loc[ids, ["sex", "age", "patient_id"]].reset_index(drop=True)
    t = _seed_thresholds(thresholds, None)
    table = underdiagnosis.underdiagnosis_table(
        y,
        s,
        np.array([t[f] for f in FINDINGS]),
        meta,
        age_edges=cfg["subgroups"]["age_edges"],
        min_positives=cfg["min_positives"],
        proportion_method=cfg["proportion_interval"],
        **cfg["bootstrap"],
    )
    return metrics.to_jsonable(
        {
            "decision": "any of the 14 findings at or above its validation threshold",
            "rate": "sick films (>= 1 positive label) predicted with no finding / sick films",
            "rows": table.to_dict(orient="records"),
        }
    )


def build_underdiagnosis_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`underdiagnosis.csv`: model x subgroup, from inputs named `<model>__underdiagnosis`."""
    rows = [
        {"model": model, **row}
        for model, value in _by_model(inputs, "underdiagnosis").items()
        for row in value["rows"]
    ]
    return pd.DataFrame(rows, columns=["model", *underdiagnosis.COLUMNS])


# --- long-tail ranking ------------------------------------------------------------------------


def build_long_tail_ranking(
    labels: pd.DataFrame, reporting: ReportingParams, **inputs: Any
) -> pd.DataFrame:
    """`long_tail_ranking.csv`: models ranked by tail mAP and tail AUROC, each against the
    leader by the paired patient bootstrap of the tail mean (seed s with seed s, as the paired
    comparison). Inputs `<model>__long_tail`, `<model>__predictions`, `<model>__thresholds`."""
    cfg = validate_reporting_params(reporting)
    tables = {
        model: pd.DataFrame(value["groups"])
        for model, value in _by_model(inputs, "long_tail").items()
    }
    preds, cuts = _by_model(inputs, "predictions"), _by_model(inputs, "thresholds")
    group = "tail"
    members = {
        model: np.array(
            [row["group"] == group for row in sorted(value["per_finding"], key=_finding_order)]
        )
        for model, value in _by_model(inputs, "long_tail").items()
    }

    def paired_delta(model: str, leader: str, metric: str) -> dict[str, Any]:
        seeds_m = metrics.prediction_seeds(preds[model])
        seeds_l = metrics.prediction_seeds(preds[leader])
        common = [s for s in seeds_m if s in seeds_l] if None not in seeds_m + seeds_l else [None]
        if not common:
            return {}
        ids, patients, y, scores_m, t_m = _seed_arrays(preds[model], cuts[model], labels, common)
        ids_l, _, _, scores_l, t_l = _seed_arrays(preds[leader], cuts[leader], labels, common)
        if not np.array_equal(ids, ids_l):
            raise ValueError(
                f"{model} and {leader} were tested on different images; the ranking's paired "
                "test needs the same test patients (same image cache)"
            )
        result = paired.paired_bootstrap_macro(
            y,
            scores_m,
            scores_l,
            t_m,
            t_l,
            patients,
            metrics=(metric,),
            findings=members[model],
            **cfg["bootstrap"],
        )[metric]
        return {**result, "seeds": len(common)}

    return longtail.group_ranking(
        tables, paired_delta, group=group, confidence=cfg["bootstrap"]["confidence"]
    )


def _finding_order(row: Mapping[str, Any]) -> int:
    return FINDINGS.index(str(row["finding"]))


# --- report sections --------------------------------------------------------------------------


def ranking_section(table: pd.DataFrame | None) -> list[tuple[str, str, pd.DataFrame]]:
    if table is None or not len(table):
        return []
    return [
        (
            "Long tail: ranking by tail mAP and tail AUROC",
            "The CXR-LT challenges rank entries by mAP (the mean over findings of the average "
            "precision, AUPRC); here the models are ranked by the mean over the TAIL findings "
            "of the AUPRC (mAP) and of the AUROC, best first. A rank is not a finding: each "
            "model is compared with the leader (rank 1) by the paired patient bootstrap of the "
            "tail mean (same test patients and resamples for both; seed s paired with seed s, "
            "seeds = how many), Holm-adjusted across the models (p_holm); "
            "differs_from_leader = p_holm < 1 - confidence. Models whose difference is not "
            "significant share the lead in all but name. value and its interval are the "
            "primary seed's (long_tail.csv); resamples_dropped counts resamples that drew no "
            "positive patient of a tail finding.",
            table.round(3),
        )
    ]


def calibration_section(
    table: pd.DataFrame | None, min_positives: int
) -> list[tuple[str, str, pd.DataFrame]]:
    if table is None or not len(table):
        return []
    shown = table[
        [
            "model",
            "finding",
            "test_positive_patients",
            "reliable",
            "temperature",
            "ece_raw",
            "ece_raw_ci_low",
            "ece_raw_ci_high",
            "ece_calibrated",
            "ece_calibrated_ci_low",
            "ece_calibrated_ci_high",
            "ece_delta",
            "ece_delta_ci_low",
            "ece_delta_ci_high",
            "test_nll_raw",
            "test_nll_calibrated",
        ]
    ]
    return [
        (
            "Calibration: raw and temperature-scaled probabilities",
            "Expected calibration error (ECE) per finding on test: the images in bins by "
            "predicted probability (reporting.calibration: 15 equal-mass bins by default), "
            "ECE = sum over bins of (share of images) x |observed positive rate - mean "
            "probability|; 0 = a probability means what it says. Raw: the model's scores. "
            "Calibrated: sigmoid(logit(p) / T) with one temperature T per finding fitted on "
            "the VALIDATION split (minimum negative log-likelihood; T > 1 softens "
            "overconfident scores; empty T: no validation positive, the calibrated score is "
            "the raw one). Temperature scaling keeps the order of the scores: AUROC, AUPRC and "
            "the decisions are unchanged. Intervals: the patient bootstrap (ece_delta = "
            "calibrated - raw, paired in each resample); ECE is biased upwards, and for a "
            "well-calibrated finding its interval can lie above the estimate. reliable: at "
            f"least {min_positives} positive test patients. The model bundle carries the "
            "temperatures: inference writes <finding>_calibrated next to each raw probability.",
            shown.round(4),
        )
    ]


def underdiagnosis_section(table: pd.DataFrame | None) -> list[tuple[str, str, pd.DataFrame]]:
    if table is None or not len(table):
        return []
    return [
        (
            "Underdiagnosis by sex and age (the 'any finding' decision)",
            "Seyyed-Kalantari et al. (Nat Med 2021) found chest X-ray classifiers predict "
            "'no finding' for sick patients of some groups more often. Here: a film is called "
            "abnormal when any of the 14 findings is at or above its validation threshold; "
            "underdiagnosis_rate = sick films (at least one positive label) called normal / "
            "sick films, per subgroup (reporting.subgroups: sex as recorded, age bands; "
            "'unknown' = missing or implausible) and overall (all); gap = subgroup - overall "
            "(positive: underdiagnosed more often). Intervals: the patient bootstrap over all "
            "test patients, the subgroup's and the overall rate computed in the same resample "
            "(so the gap's interval is paired); where the rate's bootstrap degenerates (0, 1, "
            "or few sick patients) the interval column names the binomial interval used. "
            "reliable: at least reporting.min_positives sick patients in the subgroup.",
            table.round(3),
        )
    ]
