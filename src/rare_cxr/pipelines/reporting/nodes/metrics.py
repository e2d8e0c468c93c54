"""Metrics and thresholds: the rare block's findings, the data summary, validation thresholds,
test metrics with patient-bootstrap intervals, cost, and the study's summary tables
(adapters over `rare_cxr.evaluation.metrics`, `.bootstrap`, `.cost` and `.tables`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from rare_cxr.evaluation import bootstrap, cost, metrics, tables
from rare_cxr.evaluation.localisation import parse_bbox_list
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.nodes.common import load_model, resolve_device
from rare_cxr.pipelines.reporting.nodes.lineage import check_verified
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _seed_thresholds

logger = logging.getLogger(__name__)

# what the report and the model card show of a checkpoint's metadata
CARD_KEYS = (
    "model_spec",
    "train_params",
    "epoch",
    "metric",
    "metric_name",
    "scales",
    "checkpoint_version",
    "training_id",
    "pos_weight",  # the class weights trained with (the report shows the cap's effect)
)


def select_rare_findings(
    labels: pd.DataFrame, splits: pd.DataFrame, reporting: ReportingParams
) -> dict[str, Any]:
    """Which findings form the rare block, decided on the *training* split's prevalence."""
    cfg = reporting_params(reporting).rare_findings
    prevalence = metrics.split_prevalence(labels, splits, "train")
    chosen = metrics.rare_findings(prevalence, cfg.n_rarest, cfg.max_prevalence)
    rule = (
        f"findings with training prevalence below {cfg.max_prevalence:.2%}"
        if cfg.max_prevalence is not None
        else f"the {cfg.n_rarest} rarest findings in the training split"
    )
    return metrics.to_jsonable({"rule": rule, "findings": chosen, "train_prevalence": prevalence})


def summarise_data(
    labels: pd.DataFrame,
    splits: pd.DataFrame,
    raw_bbox_list: str,
    reporting: ReportingParams,
) -> dict[str, Any]:
    """Source, images/patients per split, positives per finding and split, and whether
    bounding boxes exist (the report 'Data' section)."""
    source = reporting_params(reporting).data_source
    boxes = parse_bbox_list(raw_bbox_list)
    merged = (
        splits[["image_id", "split"]]
        .astype({"image_id": str})
        .merge(labels.astype({"image_id": str}), on="image_id", how="left")
    )
    rows, positives = [], []
    for name, part in merged.groupby("split", sort=False):
        rows.append(
            {
                "split": str(name),
                "images": int(len(part)),
                "patients": int(part["patient_id"].nunique()),
                "no_finding_images": int((part[list(FINDINGS)].sum(axis=1) == 0).sum()),
            }
        )
        positives.append(
            {"split": str(name), **{f: int(part[f].fillna(0).sum()) for f in FINDINGS}}
        )
    return {
        "source": source,
        "splits": rows,
        "positives": positives,
        "bounding_boxes": {
            "present": bool(len(boxes)),
            "boxes": int(len(boxes)),
            "images": int(boxes["image_id"].nunique()) if len(boxes) else 0,
            "note": (
                ""
                if len(boxes)
                else "no BBox_List_2017.csv in the data root (it is optional): Grad-CAM "
                "figures are drawn without boxes"
            ),
        },
    }


def select_thresholds(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    lineage: Mapping[str, Any],
    reporting: ReportingParams,
) -> dict[str, Any]:
    """Decision thresholds per finding from the validation rows only (with the lineage of the
    predictions they were tuned on)."""
    method = reporting_params(reporting).threshold_method
    seeds = metrics.prediction_seeds(predictions)
    per_seed = {
        str(seed): metrics.select_thresholds(predictions, labels, method, seed) for seed in seeds
    }
    thresholds = per_seed[str(seeds[0])]  # the primary seed's: what Grad-CAM and inference use
    undefined = [f for f, t in thresholds.items() if math.isnan(t)]
    if undefined:
        logger.warning(
            "no validation threshold for %s (no positives in val): their threshold "
            "metrics are reported as undefined",
            ", ".join(undefined),
        )
    return metrics.to_jsonable(
        {
            "method": method,
            "split": "val",
            "thresholds": thresholds,
            "per_seed": per_seed,
            "lineage": dict(lineage),
        }
    )


def evaluate_model(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: Mapping[str, Any],
    reporting: ReportingParams,
) -> dict[str, Any]:
    """Test metrics at the validation thresholds, with patient-bootstrap intervals.

    The top level describes the primary seed (intervals included). With several seeds,
    `per_seed` holds each seed's test macro/paper metrics (at that seed's own validation
    thresholds) and `seed_summary` their mean, sd and count: what Table 1 shows then.
    """
    cfg = reporting_params(reporting)
    seeds = metrics.prediction_seeds(predictions)
    per_seed = {str(seed): _seed_metrics(predictions, labels, thresholds, seed) for seed in seeds}
    t = _seed_thresholds(thresholds, seeds[0])
    _, patients, y, s = metrics.split_arrays(predictions, labels, "test")
    if len(y) == 0:
        raise ValueError("predictions: no 'test' rows; the report is computed on test")
    test = metrics.evaluate_split(y, s, t, patients)
    _, _, yv, sv = metrics.split_arrays(predictions, labels, "val")
    val = metrics.evaluate_split(yv, sv, t)
    model = str((thresholds.get("lineage") or {}).get("model", "model"))
    intervals = bootstrap.bootstrap_intervals(
        y,
        s,
        np.array([t[f] for f in FINDINGS]),
        patients,
        **cfg.bootstrap.model_dump(),
        min_positive_patients=cfg.min_positives,
        proportion_method=cfg.proportion_interval,
        progress_desc=f"{model} bootstrap",
    )
    return metrics.to_jsonable(
        {
            "threshold_method": thresholds.get("method"),
            "lineage": thresholds.get("lineage"),
            "n_test_patients": int(pd.Series(patients).nunique()),
            "test": test,
            "val": {
                "note": "thresholds were tuned on this split: optimistic, for reference only",
                **{k: val[k] for k in ("n_images", "macro", "paper")},
            },
            "intervals": intervals,
            "seeds": seeds,
            "per_seed": per_seed,
            "seed_summary": tables.seed_summary(per_seed),
        }
    )


def _seed_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: Mapping[str, Any],
    seed: int | None,
) -> dict[str, Any]:
    """One seed's test macro/paper metrics at that seed's own validation thresholds."""
    ts = _seed_thresholds(thresholds, seed)
    _, ps, ys, ss = metrics.split_arrays(predictions, labels, "test", seed)
    result = metrics.evaluate_split(ys, ss, ts, ps)
    return {k: result[k] for k in ("macro", "paper", "subset_accuracy")}


def measure_cost(
    checkpoint: Mapping[str, Any], lineage: Mapping[str, Any], reporting: ReportingParams
) -> dict[str, Any]:
    """Parameters, GFLOPs/image at the input size, measured img/s; plus the checkpoint's card
    (which names the verified checkpoint version)."""
    cfg = reporting_params(reporting).cost
    settings = {**cfg.model_dump(), "device": resolve_device(cfg.device)}
    model = load_model(checkpoint)
    meta = checkpoint.get("metadata", {})
    size = int(meta.get("input_size") or max(getattr(model, "scales", [224])))
    with torch.no_grad():
        block = cost.model_cost(model, size, **settings)
    card = {k: meta.get(k) for k in CARD_KEYS}
    check_verified("measure_cost", card["checkpoint_version"], lineage)
    return metrics.to_jsonable({**block, "checkpoint": card})


def combine_metrics(**inputs: Any) -> dict[str, Any]:
    """`{model: {"metrics": ..., "cost": ...}}` from inputs named `<model>__metrics|cost`."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in inputs.items():
        model, kind = key.rsplit("__", 1)
        out.setdefault(model, {})[kind] = value
    return out


def build_table1(all_metrics: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """The paper's Table 1, extended (`rare_cxr.evaluation.tables.table1_row` says what each
    cell holds), and the same table as Markdown."""
    table = tables.table1(all_metrics)
    return table, tables.markdown_table(table)


def build_per_finding_auroc(all_metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Models x findings test AUROC (CheXNet layout); empty cell = undefined."""
    return tables.per_finding_auroc(all_metrics)


def build_rare_findings_table(
    all_metrics: Mapping[str, Any],
    rare_findings: Mapping[str, Any],
    reporting: ReportingParams | None = None,
) -> pd.DataFrame:
    """Rare block: AUROC/AUPRC/F1 (and recall, precision) with intervals per rare finding and
    model; a cell of a finding with fewer than `reporting.min_positives` positive test
    PATIENTS ends in † (unreliable)."""
    min_positives = reporting_params(reporting).min_positives
    return tables.rare_findings_table(all_metrics, rare_findings, min_positives)
