"""Figures of every model together (adapters over `rare_cxr.evaluation.figures`); the catalog
decides where the PNGs go and `render_report` embeds them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.evaluation import figures
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.nodes.common import by_model
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _test_arrays


def _primary_seed(history: pd.DataFrame) -> pd.DataFrame:
    """The history of the primary (first) seed: the curves are one training's epochs."""
    if "seed" not in history.columns or history.empty:
        return history
    return history[history["seed"] == history["seed"].iloc[0]]


def plot_validation_curves(**histories: pd.DataFrame) -> Any:
    """Figure 2: validation ACC and AUROC per epoch, all models (primary seed)."""
    return figures.validation_curves({m: _primary_seed(h) for m, h in histories.items()})


def plot_training_loss(**histories: pd.DataFrame) -> Any:
    """Training/validation loss per epoch, all models (primary seed)."""
    return figures.training_loss_curves({m: _primary_seed(h) for m, h in histories.items()})


def plot_seed_spread(all_metrics: Mapping[str, Any]) -> Any:
    """Each model's test macro AUROC / balanced ACC per training seed."""
    return figures.seed_spread({m: b["metrics"] for m, b in all_metrics.items()})


def plot_roc_curves(labels: pd.DataFrame, **predictions: pd.DataFrame) -> Any:
    """ROC per finding with every model overlaid."""
    return figures.roc_curves(*_test_arrays(labels, predictions))


def plot_pr_curves(labels: pd.DataFrame, **predictions: pd.DataFrame) -> Any:
    """Precision-recall per finding with every model overlaid."""
    return figures.pr_curves(*_test_arrays(labels, predictions))


def plot_reliability(
    labels: pd.DataFrame, reporting: ReportingParams, **predictions: pd.DataFrame
) -> Any:
    """Reliability diagram (calibration), all models."""
    bins = reporting_params(reporting).reliability_bins
    y, scores = _test_arrays(labels, predictions)
    return figures.reliability_diagram(y, scores, bins)


def plot_reliability_rare(
    labels: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    reporting: ReportingParams,
    **inputs: Any,
) -> Any:
    """Reliability diagram per rare finding (test), every model raw and calibrated; inputs
    `<model>__predictions` and `<model>__calibration`."""
    cfg = reporting_params(reporting).calibration
    y, scores = _test_arrays(labels, by_model(inputs, "predictions"))
    temperatures = {
        model: [value["temperatures"].get(f) for f in FINDINGS]
        for model, value in by_model(inputs, "calibration").items()
    }
    return figures.reliability_per_finding(
        y,
        scores,
        temperatures,
        list(rare_findings["findings"]),
        n_bins=cfg.n_bins,
        binning=cfg.binning,
    )


def plot_auroc_intervals(all_metrics: Mapping[str, Any]) -> Any:
    """Per-finding AUROC with bootstrap interval bars."""
    return figures.auroc_intervals({m: b["metrics"] for m, b in all_metrics.items()})


def plot_paired_forest(paired_comparison: pd.DataFrame) -> Any:
    """Forest plot of the paired differences (one panel per comparison)."""
    return figures.paired_forest(paired_comparison)
