"""The long tail (NIH-CXR-LT's view): head/medium/tail groups by training prevalence, per-finding
balanced accuracy and sensitivity at fixed specificity, and the models ranked by tail mAP /
tail AUROC, and each model against its reference on what a long-tail method changes (adapters
over `rare_cxr.evaluation.longtail` and `.method_comparison`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation import longtail, method_comparison, metrics, paired, tables
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.nodes.common import by_model
from rare_cxr.pipelines.reporting.nodes.paired import common_seeds
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _seed_arrays, _seed_thresholds, _test_table


def long_tail_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    splits: pd.DataFrame,
    thresholds: Mapping[str, Any],
    reporting: ReportingParams,
) -> dict[str, Any]:
    """NIH-CXR-LT's view of one model: head/medium/tail groups by training prevalence (with
    patient-bootstrap intervals of the group means), balanced accuracy, specificity and
    sensitivity at fixed specificities per finding, and a reliability flag per finding."""
    cfg = reporting_params(reporting)
    lt = cfg.long_tail
    train_ids = set(splits.loc[splits["split"].astype(str) == "train", "image_id"].astype(str))
    train = labels[labels["image_id"].astype(str).isin(train_ids)]
    n_train = max(len(train), 1)
    train_positives = {f: int(train[f].sum()) for f in FINDINGS}
    # prevalence cut-offs as counts: count >= ceil(p * n)  <=>  count / n >= p for integers
    head_min = math.ceil(lt.head_min * n_train)
    tail_max = min(math.ceil(lt.tail_max * n_train), head_min - 1)
    _, patients, y, s = _test_table(predictions, labels)
    t = _seed_thresholds(thresholds, None)
    per_finding, groups = longtail.long_tail_tables(
        y,
        s,
        t,
        train_positives,
        patients,
        head_min=head_min,
        tail_max=max(tail_max, 0),
        min_positives=cfg.min_positives,
        specificities=lt.specificities,
        **cfg.bootstrap.model_dump(),
    )
    return metrics.to_jsonable(
        {
            "cutoffs": {
                "head_min_prevalence": lt.head_min,
                "tail_max_prevalence": lt.tail_max,
                "train_images": n_train,
            },
            "per_finding": per_finding.to_dict(orient="records"),
            "groups": groups.to_dict(orient="records"),
        }
    )


def build_long_tail_tables(**inputs: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`long_tail.csv`: model x group means with intervals, `long_tail_findings.csv`: model x
    finding: group, balanced accuracy, specificity, sensitivity at fixed specificities,
    reliable) from the per-model inputs named `<model>__long_tail`."""
    return tables.rows_by_model(inputs, "groups"), tables.rows_by_model(inputs, "per_finding")


def build_long_tail_ranking(
    labels: pd.DataFrame, reporting: ReportingParams, **inputs: Any
) -> pd.DataFrame:
    """`long_tail_ranking.csv`: models ranked by tail mAP and tail AUROC, each against the
    leader by the paired patient bootstrap of the tail mean (seed s with seed s, as the paired
    comparison). Inputs `<model>__long_tail`, `<model>__predictions`, `<model>__thresholds`."""
    cfg = reporting_params(reporting)
    long_tail = by_model(inputs, "long_tail")
    tables_by_model = {model: pd.DataFrame(value["groups"]) for model, value in long_tail.items()}
    preds, cuts = by_model(inputs, "predictions"), by_model(inputs, "thresholds")
    group = "tail"
    members = {
        model: np.array(
            [row["group"] == group for row in sorted(value["per_finding"], key=_finding_order)]
        )
        for model, value in long_tail.items()
    }

    def paired_delta(model: str, leader: str, metric: str) -> dict[str, Any]:
        arrays = pair_arrays(preds, cuts, labels, model, leader)
        if arrays is None:
            return {}
        y, patients, scores_m, scores_l, t_m, t_l, seeds = arrays
        result = paired.paired_bootstrap_macro(
            y,
            scores_m,
            scores_l,
            t_m,
            t_l,
            patients,
            metrics=(metric,),
            findings=members[model],
            **cfg.bootstrap.model_dump(),
        )[metric]
        return {**result, "seeds": seeds}

    return longtail.group_ranking(
        tables_by_model, paired_delta, group=group, confidence=cfg.bootstrap.confidence
    )


def _finding_order(row: Mapping[str, Any]) -> int:
    return FINDINGS.index(str(row["finding"]))


def pair_arrays(
    preds: Mapping[str, pd.DataFrame],
    cuts: Mapping[str, Mapping[str, Any]],
    labels: pd.DataFrame,
    model: str,
    reference: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(y, patients, scores_model [S,N,F], scores_ref, thresholds_model [S,F], thresholds_ref,
    S) on the seeds both models have (seed s paired with seed s); None: no common seed."""
    common = common_seeds(preds[model], preds[reference])
    if not common:
        return None
    ids, patients, y, scores_m, t_m = _seed_arrays(preds[model], cuts[model], labels, common)
    ids_r, _, _, scores_r, t_r = _seed_arrays(preds[reference], cuts[reference], labels, common)
    if not np.array_equal(ids, ids_r):
        raise ValueError(
            f"{model} and {reference} were tested on different images; a paired test needs "
            "the same test patients (same image cache)"
        )
    return y, patients, scores_m, scores_r, t_m, t_r, len(common)


def build_method_comparison(
    labels: pd.DataFrame,
    reporting: ReportingParams,
    *,
    pairs: Sequence[tuple[str, str]] = (),
    **inputs: Any,
) -> pd.DataFrame:
    """`method_comparison.csv`: each model against its reference (the roster's pairs) on mAP
    (all findings), tail mAP, tail AUROC and macro ECE, by the paired patient bootstrap
    (`rare_cxr.evaluation.method_comparison`). Inputs `<model>__predictions`,
    `<model>__thresholds`, `<model>__long_tail` (the tail findings: the training split's
    frequency groups, the same for every model)."""
    cfg = reporting_params(reporting)
    preds, cuts = by_model(inputs, "predictions"), by_model(inputs, "thresholds")
    groups = {
        str(row["finding"]): row["group"]
        for value in by_model(inputs, "long_tail").values()
        for row in value["per_finding"]
    }
    tail = np.array([groups.get(f) == "tail" for f in FINDINGS])
    return method_comparison.method_comparison(
        pairs,
        lambda model, reference: pair_arrays(preds, cuts, labels, model, reference),
        tail,
        n_bins=cfg.calibration.n_bins,
        binning=cfg.calibration.binning,
        **cfg.bootstrap.model_dump(),
    )
