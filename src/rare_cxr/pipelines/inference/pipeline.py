"""Pipelines `inference` and `onnx_export`.

`inference`: `predict_folder` (bundle + `params:inference` -> `inference_predictions`,
`inference_overlays`) -> `render_inference_report` (-> `inference_report`).
`onnx_export`: `export_onnx` (bundle -> `onnx_model`, `onnx_parity`).

The bundle input is chosen when the pipeline is registered (`rare_cxr.pipeline_registry`
reads `params:inference` of the run): `<inference.model>.model_bundle`, the latest bundle the
reporting pipeline wrote for that model in this environment (`--load-versions` picks another),
or `model_bundle_file` when `--params bundle=/path/to/model_bundle.pt` names a file. Neither
pipeline is part of `__default__`, `nih` or `all_models`: inference runs on demand.
"""

from __future__ import annotations

import re
import warnings

from kedro.pipeline import Node, Pipeline

# the module, not through the package (whose __init__ imports this module): no import cycle
import rare_cxr.pipelines.inference.nodes as nodes  # noqa: PLR0402
from rare_cxr.runs import DOWNSTREAM_TAG

DEFAULT_MODEL = "multiscale_resnet"
EXTERNAL_BUNDLE = "model_bundle_file"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def bundle_dataset(model: str | None = None, external_bundle: bool = False) -> str:
    """The catalog entry the pipelines read the bundle from."""
    if external_bundle:
        return EXTERNAL_BUNDLE
    model = model or DEFAULT_MODEL
    if not isinstance(model, str) or not _NAME.match(model):
        raise ValueError(
            f"inference.model: expected a model name such as {DEFAULT_MODEL!r}, got {model!r}"
        )
    return f"{model}.model_bundle"


def _build(nodes_: list[Node]) -> Pipeline:
    with warnings.catch_warnings():
        # `<model>.model_bundle` is read by its full dotted name on purpose (no namespace)
        warnings.filterwarnings("ignore", message="One or more dataset names contain")
        # `downstream`: reads a model's bundle, writes its own outputs: it runs beside
        # trainings of other models (rare_cxr.runs.plan_locks)
        return Pipeline(nodes_, tags=["inference", DOWNSTREAM_TAG])


def create_pipeline(
    model: str | None = None, external_bundle: bool = False, **kwargs: object
) -> Pipeline:
    """Predict a folder of images with one bundle (see the module doc)."""
    bundle = bundle_dataset(model, external_bundle)
    return _build(
        [
            Node(
                nodes.predict_folder,
                [bundle, "params:inference"],
                ["inference_predictions", "inference_overlays"],
                name="predict_folder",
            ),
            Node(
                nodes.render_report,
                ["inference_predictions", "inference_overlays", bundle, "params:inference"],
                "inference_report",
                name="render_inference_report",
            ),
        ]
    )


def create_onnx_pipeline(model: str | None = None, external_bundle: bool = False) -> Pipeline:
    """Export one bundle's model to ONNX, checked with onnxruntime (see the module doc)."""
    bundle = bundle_dataset(model, external_bundle)
    return _build(
        [
            Node(
                nodes.export_model_onnx,
                [bundle, "params:inference"],
                ["onnx_model", "onnx_parity"],
                name="export_onnx",
                tags=["onnx"],
            )
        ]
    )
