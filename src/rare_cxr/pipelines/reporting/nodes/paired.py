"""The paired comparison: each model against its reference on the same test patients and the
same bootstrap resamples (adapter over `rare_cxr.evaluation.paired`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation import metrics, paired
from rare_cxr.evaluation.tables import reliable
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.nodes.common import by_model
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _seed_arrays

logger = logging.getLogger(__name__)

# paired_comparison.csv: issue 10's columns, then the reliability of each per-finding row,
# then issue 18's additions (paired.ROW_COLUMNS after `method`).
_ROW_BASE = paired.ROW_COLUMNS[2 : paired.ROW_COLUMNS.index("method") + 1]
PAIRED_COLUMNS = (
    "model",
    "reference",
    "seeds",
    *_ROW_BASE,
    "test_positives",
    "test_positive_patients",
    "reliable",
    *paired.ROW_COLUMNS[paired.ROW_COLUMNS.index("method") + 1 :],
)


def common_seeds(model: pd.DataFrame, reference: pd.DataFrame) -> list[int | None]:
    """The training seeds both prediction tables have (seed s is paired with seed s); [None]
    when either has no seed column."""
    seeds_m = metrics.prediction_seeds(model)
    seeds_r = metrics.prediction_seeds(reference)
    return [s for s in seeds_m if s in seeds_r] if None not in seeds_m + seeds_r else [None]


def paired_comparison(
    labels: pd.DataFrame,
    reporting: ReportingParams,
    *,
    pairs: Sequence[tuple[str, str]] = (),
    **inputs: Any,
) -> pd.DataFrame:
    """`paired_comparison.csv`: each model against its reference on the same test patients
    and the same bootstrap resamples, seed by seed (seed s of one with seed s of the other),
    combined over seeds: macro ΔAUROC/ΔAUPRC/ΔF1 by paired patient bootstrap, per-finding
    ΔAUROC by paired DeLong with a Holm correction across findings.

    `pairs` are the (model, reference) comparisons: each model block's `reference`
    (`rare_cxr.models.roster`), among the models reported; the pipeline binds them.
    Inputs are named `<model>__predictions` and `<model>__thresholds`. Why paired: two marginal
    intervals can overlap while the paired difference excludes 0 (and the reverse), because the
    models err on the same hard images; only the paired test answers "is A better than B".
    """
    cfg = reporting_params(reporting)
    preds, cuts = by_model(inputs, "predictions"), by_model(inputs, "thresholds")
    absent = sorted({m for pair in pairs for m in pair} - set(preds))
    if absent:
        raise ValueError(
            f"paired comparison: no predictions for {absent} (inputs: {sorted(preds)})"
        )
    frames = []
    for model, reference in pairs:
        common = common_seeds(preds[model], preds[reference])
        if not common:
            logger.warning(
                "paired comparison %s vs %s skipped: no common training seed (%s vs %s)",
                model,
                reference,
                metrics.prediction_seeds(preds[model]),
                metrics.prediction_seeds(preds[reference]),
            )
            continue
        frames.append(
            _compare(
                model, reference, preds=preds, cuts=cuts, labels=labels, common=common, cfg=cfg
            )
        )
    if not frames:
        return pd.DataFrame(columns=[*PAIRED_COLUMNS])
    return pd.concat(frames, ignore_index=True)[list(PAIRED_COLUMNS)]


def _compare(
    model: str,
    reference: str,
    *,
    preds: Mapping[str, pd.DataFrame],
    cuts: Mapping[str, Any],
    labels: pd.DataFrame,
    common: list[int | None],
    cfg: ReportingParams,
) -> pd.DataFrame:
    """The rows of one comparison, with the positives behind each finding's row."""
    ids_m, patients, y, scores_m, t_m = _seed_arrays(preds[model], cuts[model], labels, common)
    ids_r, _, _, scores_r, t_r = _seed_arrays(preds[reference], cuts[reference], labels, common)
    if not np.array_equal(ids_m, ids_r):
        raise ValueError(
            f"{model} and {reference} were tested on different images; a paired "
            "comparison needs the same test patients (same image cache)"
        )
    rows = paired.paired_comparison_rows(
        model,
        reference,
        y,
        scores_m,
        scores_r,
        t_m,
        t_r,
        patients,
        **cfg.bootstrap.model_dump(),
        progress_desc=f"{model} vs {reference} paired bootstrap",
    )
    rows.insert(2, "seeds", len(common))
    # DeLong's normal approximation with a handful of positive patients prints tiny
    # p-values that mean nothing (2 Hernia films gave p_holm 1e-5 on the phantom): say so
    # on the row, as the rare table's dagger does. The unit is the patient (the test is
    # patient-clustered), and one positive patient leaves its variance undefined, so such
    # a row is never reliable. Holm itself stays over every defined test (conservative).
    films = dict(zip(FINDINGS, y.sum(axis=0).astype(int).tolist(), strict=True))
    people = dict(zip(FINDINGS, metrics.positive_patients(y, patients).tolist(), strict=True))
    rows["test_positives"] = [films.get(f, pd.NA) for f in rows["finding"]]
    rows["test_positive_patients"] = [people.get(f, pd.NA) for f in rows["finding"]]
    rows["reliable"] = [
        f == "macro" or reliable(people[f], cfg.min_positives) for f in rows["finding"]
    ]
    return rows
