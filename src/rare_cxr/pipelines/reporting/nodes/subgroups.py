"""Subgroups: AUROC by sex, view and age band, and the underdiagnosis rate of the "any
finding" decision by sex and age (adapters over `rare_cxr.evaluation.subgroups` and
`.underdiagnosis`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation import metrics, subgroups, tables, underdiagnosis
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.nodes.common import by_model
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _seed_thresholds, _test_table


def _test_meta(labels: pd.DataFrame, ids: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """`columns` of the labels table for the test image ids `ids`, in their order."""
    meta = labels.assign(image_id=labels["image_id"].astype(str)).set_index("image_id")
    return meta.loc[ids, columns].reset_index(drop=True)


def subgroup_metrics(
    predictions: pd.DataFrame, labels: pd.DataFrame, reporting: ReportingParams
) -> dict[str, Any]:
    """AUROC per finding and macro by sex, view and age band, with patient-bootstrap intervals
    computed within each subgroup (test split, primary seed)."""
    cfg = reporting_params(reporting)
    ids, _, y, s = _test_table(predictions, labels)
    meta = _test_meta(labels, ids, ["sex", "age", "view", "patient_id"])
    table = subgroups.subgroup_aurocs(
        y, s, meta, age_edges=cfg.subgroups.age_edges, **cfg.bootstrap.model_dump()
    )
    return metrics.to_jsonable({"rows": table.to_dict(orient="records")})


def build_subgroup_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`subgroups.csv`: model x attribute x subgroup x finding AUROC with intervals."""
    return tables.rows_by_model(inputs, "rows")


def underdiagnosis_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: Mapping[str, Any],
    reporting: ReportingParams,
) -> dict[str, Any]:
    """The "any finding" decision's underdiagnosis rate by sex and age band (test split,
    primary seed, validation thresholds), with patient-bootstrap intervals and the gap to the
    overall rate."""
    cfg = reporting_params(reporting)
    ids, _, y, s = _test_table(predictions, labels)
    meta = _test_meta(labels, ids, ["sex", "age", "patient_id"])
    t = _seed_thresholds(thresholds, None)
    table = underdiagnosis.underdiagnosis_table(
        y,
        s,
        np.array([t[f] for f in FINDINGS]),
        meta,
        age_edges=cfg.subgroups.age_edges,
        min_positives=cfg.min_positives,
        proportion_method=cfg.proportion_interval,
        **cfg.bootstrap.model_dump(),
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
        for model, value in by_model(inputs, "underdiagnosis").items()
        for row in value["rows"]
    ]
    return pd.DataFrame(rows, columns=["model", *underdiagnosis.COLUMNS])
