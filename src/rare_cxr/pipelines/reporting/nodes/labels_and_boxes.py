"""Against better truth: AUROC against the Google 2019 expert labels beside NIH's text-mined
ones, and Grad-CAM localisation on every boxed test image (adapters over
`rare_cxr.evaluation.expert`, `.localisation` and `.cam`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.evaluation import cam, expert, localisation, metrics, tables
from rare_cxr.pipelines.reporting.nodes.common import load_model, model_name, resolve_device
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params


def expert_label_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    raw_expert_labels: str,
    reporting: ReportingParams,
) -> dict[str, Any]:
    """AUROC against NIH's text-mined labels and against the Google 2019 expert labels, on the
    same test images, with patient-bootstrap intervals (primary seed). The mapping of the 14
    findings to the experts' 4 is `rare_cxr.evaluation.expert.NIH_SOURCES`. Without the
    (optional) expert file: no rows, and the reason."""
    cfg = reporting_params(reporting)
    if not raw_expert_labels or not raw_expert_labels.strip():
        return {"rows": [], "note": "no expert-label file in the data root (it is optional)"}
    table = expert.expert_comparison(
        metrics.seed_rows(predictions[predictions["split"].astype(str) == "test"]),
        labels,
        expert.parse_expert_labels(raw_expert_labels),
        **cfg.bootstrap.model_dump(),
    )
    return metrics.to_jsonable({"rows": table.to_dict(orient="records"), "note": ""})


def build_expert_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`expert_labels.csv`: model x expert finding, AUROC against NIH's labels and against the
    experts' on the same images (inputs named `<model>__expert_labels`)."""
    return tables.rows_by_model(inputs, "rows")


def localisation_metrics(
    *,
    checkpoint: Mapping[str, Any],
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    image_cache: Any,
    image_index: pd.DataFrame,
    raw_bbox_list: str,
    reporting: ReportingParams,
) -> dict[str, Any]:
    """Grad-CAM on EVERY boxed test image (NIH's BBox_List, or the phantom's boxes), per box
    finding and per CAM layer (one per scale for the multi-scale model): is the map's maximum
    inside the box (pointing game), and which share of its energy lies inside. Records, one
    per (image, box, layer); `build_localisation_table` adds patient-bootstrap intervals."""
    cfg = reporting_params(reporting)
    boxes = localisation.parse_bbox_list(raw_bbox_list)
    if boxes.empty:
        return {"records": [], "note": "no bounding boxes (BBox_List_2017.csv absent)"}
    test = image_cache.split("test")
    boxes = boxes[boxes["image_id"].astype(str).isin(set(test.table["image_id"].astype(str)))]
    sizes = image_index.set_index(image_index["image_id"].astype(str))
    device = resolve_device(cfg.gradcam.device)
    model = load_model(checkpoint).to(device)
    records = cam.localisation_records(
        model, model_name(checkpoint), test, boxes=boxes, sizes=sizes, device=device
    )
    return metrics.to_jsonable({"records": records, "note": ""})


def build_localisation_table(
    reporting: ReportingParams, **inputs: Mapping[str, Any]
) -> pd.DataFrame:
    """`localisation.csv`: model x layer x finding pointing-game hit rate and in-box energy
    share, with patient-bootstrap intervals (inputs named `<model>__localisation`)."""
    cfg = reporting_params(reporting)
    records = [r for value in inputs.values() for r in value["records"]]
    if not records:
        return pd.DataFrame(columns=list(localisation.SUMMARY_COLUMNS))
    return localisation.localisation_summary(pd.DataFrame(records), **cfg.bootstrap.model_dump())
