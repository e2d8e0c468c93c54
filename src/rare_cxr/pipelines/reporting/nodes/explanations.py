"""Explanations: the Grad-CAM figure of the best-scored test true positives of each rare finding
(adapter over `rare_cxr.evaluation.cam` and `.figures`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.evaluation import cam, figures, metrics
from rare_cxr.evaluation.localisation import parse_bbox_list
from rare_cxr.pipelines.reporting.nodes.common import load_model, model_name, resolve_device
from rare_cxr.pipelines.reporting.params import ReportingParams, reporting_params


def gradcam_examples(
    *,
    checkpoint: Mapping[str, Any],
    predictions: pd.DataFrame,
    thresholds: Mapping[str, Any],
    labels: pd.DataFrame,
    image_cache: Any,
    image_index: pd.DataFrame,
    raw_bbox_list: str,
    rare_findings: Mapping[str, Any],
    reporting: ReportingParams,
) -> Any:
    """Grad-CAM figure for the best-scored test true positives of each rare finding.

    One map per `cam_layers()` entry (one per scale for the multi-scale model), overlaid on the
    cached radiograph; the BBox_List box (rescaled from the original image size) when one exists.
    """
    cfg = reporting_params(reporting).gradcam
    device = resolve_device(cfg.device)
    model = load_model(checkpoint).to(device)
    test = image_cache.split("test")
    preds = metrics.seed_rows(predictions)  # the primary seed's model is the one loaded
    preds = preds[preds["split"].astype(str) == "test"].copy()
    preds["image_id"] = preds["image_id"].astype(str)
    selected = cam.select_examples(
        preds,
        labels,
        thresholds["thresholds"],
        findings=rare_findings["findings"],
        available=set(test.table["image_id"].astype(str)),
        per_finding=cfg.examples_per_finding,
    )
    sizes = image_index.set_index(image_index["image_id"].astype(str))
    name = model_name(checkpoint)
    rows = cam.example_rows(
        model,
        name,
        test,
        selected=selected,
        boxes=parse_bbox_list(raw_bbox_list),
        sizes=sizes,
        device=device,
    )
    return figures.gradcam_panel(name, rows)
