"""ΔAUROC by planted lesion size: each model against its reference on the localised findings,
split by the size of the lesion's box (adapter over `rare_cxr.evaluation.lesion_size`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation import lesion_size, localisation
from rare_cxr.pipelines.reporting.nodes.common import by_model
from rare_cxr.pipelines.reporting.nodes.paired import common_seeds
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params
from rare_cxr.pipelines.reporting.test_arrays import _seed_arrays

logger = logging.getLogger(__name__)


def lesion_size_delta(
    labels: pd.DataFrame,
    raw_bbox_list: str,
    reporting: ReportingParams,
    *,
    pairs: Sequence[tuple[str, str]] = (),
    **inputs: Any,
) -> pd.DataFrame:
    """`lesion_size_delta.csv`: per (model, reference) pair, localised finding and lesion-size
    tercile, the AUROC of that bin's positive test images against every negative one for both
    models and their paired difference with a patient-bootstrap interval (seed s with seed s).

    Empty (with its columns) when the data root has no box list: NIH's is optional, the
    phantom always writes one. Inputs are named `<model>__predictions` and
    `<model>__thresholds` (the thresholds only align the seeds, as in `paired_comparison`).
    """
    cfg = reporting_params(reporting)
    boxes = localisation.parse_bbox_list(raw_bbox_list)
    if boxes.empty:
        return pd.DataFrame(columns=list(lesion_size.COLUMNS))
    preds, cuts = by_model(inputs, "predictions"), by_model(inputs, "thresholds")
    frames = []
    for model, reference in pairs:
        common = common_seeds(preds[model], preds[reference])
        if not common:
            logger.warning("lesion size: %s vs %s skipped, no common seed", model, reference)
            continue
        ids, patients, y, s_m, _ = _seed_arrays(preds[model], cuts[model], labels, common)
        ids_r, _, _, s_r, _ = _seed_arrays(preds[reference], cuts[reference], labels, common)
        if not np.array_equal(ids, ids_r):
            raise ValueError(f"{model} and {reference} were tested on different images")
        frames.append(
            lesion_size.lesion_size_rows(
                model, reference, ids, patients, y, s_m, s_r, boxes, **cfg.bootstrap.model_dump()
            )
        )
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(lesion_size.COLUMNS))
    return pd.concat(frames, ignore_index=True)
