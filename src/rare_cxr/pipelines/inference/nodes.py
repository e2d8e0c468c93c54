"""Nodes of the `inference` and `onnx_export` pipelines: thin wrappers of `rare_cxr.inference`.

Every node reads the model bundle and `params:inference` only: no image cache, label or
training parameter is needed, so a user holding a bundle and a folder of images can run them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.inference.onnx_export import export_onnx
from rare_cxr.inference.predict import (
    InferenceParams,
    run_inference,
    validate_inference_params,
)
from rare_cxr.inference.report import render_inference_report


def predict_folder(
    model_bundle: Mapping[str, Any], inference: InferenceParams
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """predictions.csv (one row per file under `inference.input_dir`, with its status) and
    the Grad-CAM overlays of the positive decisions (rendered lazily as the catalog saves them)."""
    return run_inference(model_bundle, inference)


def render_report(
    predictions: pd.DataFrame,
    overlays: Mapping[str, Any],
    model_bundle: Mapping[str, Any],
    inference: InferenceParams,
) -> str:
    """inference_report.html: thumbnails, top findings, CAMs, skipped files, model card."""
    cfg = validate_inference_params(inference)
    return render_inference_report(
        predictions=predictions,
        overlays=overlays,
        bundle=model_bundle,
        cfg=cfg,
        input_root=str(cfg["input_dir"]),
    )


def export_model_onnx(
    model_bundle: Mapping[str, Any], inference: InferenceParams
) -> tuple[bytes, dict[str, Any]]:
    """The bundle's model as ONNX, kept only if onnxruntime matches PyTorch (the record)."""
    onnx_cfg = validate_inference_params(inference)["onnx"]
    return export_onnx(model_bundle, **onnx_cfg)
