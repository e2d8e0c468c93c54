"""Calibration: one temperature per finding fitted on validation (what the model bundle
carries), and the test ECE raw and calibrated (adapter over `rare_cxr.evaluation.calibration`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.evaluation import calibration, metrics
from rare_cxr.pipelines.reporting.nodes.common import by_model
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _test_table


def calibration_metrics(
    predictions: pd.DataFrame, labels: pd.DataFrame, reporting: ReportingParams
) -> dict[str, Any]:
    """One temperature per finding fitted on the VALIDATION rows (what the model bundle
    carries), then the test ECE raw and calibrated with patient-bootstrap intervals (primary
    seed: the bundle's weights)."""
    cfg = reporting_params(reporting)
    bins = cfg.calibration
    _, _, y_val, p_val = metrics.split_arrays(predictions, labels, "val")
    _, patients, y_test, p_test = _test_table(predictions, labels)
    table, fits = calibration.calibration_table(
        y_val,
        p_val,
        y_test,
        p_test,
        patients,
        n_bins=bins.n_bins,
        binning=bins.binning,
        min_positives=cfg.min_positives,
        **cfg.bootstrap.model_dump(),
    )
    return metrics.to_jsonable(
        {
            "method": calibration.METHOD,
            "split": "val",
            "evaluated_on": "test",
            "binning": bins.binning,
            "n_bins": bins.n_bins,
            "temperatures": {f: fit.temperature for f, fit in fits.items()},
            "per_finding": table.to_dict(orient="records"),
        }
    )


def build_calibration_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`calibration.csv`: model x finding (and macro) from inputs named `<model>__calibration`."""
    rows = [
        {"model": model, **row}
        for model, value in by_model(inputs, "calibration").items()
        for row in value["per_finding"]
    ]
    return pd.DataFrame(rows, columns=["model", *calibration.ROW_COLUMNS])
