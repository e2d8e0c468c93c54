"""ONNX export of a model bundle, checked against PyTorch with onnxruntime before it is kept.

Why a checked export: an ONNX file is used where PyTorch is not, so nobody would notice an
operator that exports with different numerics. The exported graph maps the bundle's input
(float `[B, 1, S, S]` in `[0, 1]`, S = input_size; the batch dimension is dynamic) to the 14
sigmoid probabilities in FINDINGS order; normalisation and the per-scale resizes are inside it.
`export_onnx` runs the graph with onnxruntime (CPU) on `check_images` test inputs, at two batch
sizes, and refuses to return it when any probability differs from PyTorch's by more than
`tolerance` (default 1e-4).

torch.onnx.export with the dynamo exporter (torch >= 2.9's default, which needs `onnxscript`),
opset 18: the first opset whose Resize has the `antialias` attribute that the models' internal
down-scaling uses (the TorchScript exporter cannot export `_upsample_bilinear2d_aa`).
Test-time flip averaging is not in the graph (apply it outside if the bundle says
`preprocessing.tta_hflip: true`); decisions use the thresholds stored as ONNX metadata. The
output is the RAW probability: the temperatures of the calibrated probability are stored as
metadata (`rare_cxr.temperatures`, null for a bundle without them), not applied in the graph,
so the graph and its parity check stay those of the model.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.inference.bundle import load_bundle_model

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


class OnnxParityError(RuntimeError):
    """The exported graph's probabilities differ from PyTorch's beyond the tolerance."""


class _Probabilities(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image))


def check_inputs(size: int, n: int, seed: int = 0) -> np.ndarray:
    """Deterministic test inputs `[n, 1, size, size]`: smooth random images (what a radiograph
    looks like to the first convolution) plus an all-black and an all-white one."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, max(2, size // 8), max(2, size // 8), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    noise = 0.05 * torch.randn(n, 1, size, size, generator=generator)
    images = (smooth + noise).clamp(0, 1)
    if n >= 3:
        images[-2], images[-1] = 0.0, 1.0
    return images.numpy().astype(np.float32)


def onnx_probabilities(onnx_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """Run the exported graph with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def export_onnx(
    bundle: Mapping[str, Any],
    *,
    opset: int = 18,
    tolerance: float = 1e-4,
    check_images: int = 4,
) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, parity record) for the bundle's model; raises `OnnxParityError` when the
    onnxruntime probabilities differ from PyTorch's by more than `tolerance`."""
    import onnx
    import onnxruntime

    meta = bundle["metadata"]
    size = int(meta["input_size"])
    model = _Probabilities(load_bundle_model(bundle)).eval()
    example = torch.from_numpy(check_inputs(size, 2, seed=1))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory(prefix="rare-cxr-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter, not the user's concern
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"image": {0: batch}},
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        graph = onnx.load(str(path))
    thresholds = meta["thresholds"]
    props = {
        "rare_cxr.model": str(meta["model"]),
        "rare_cxr.findings": json.dumps(list(FINDINGS)),
        "rare_cxr.thresholds": json.dumps(thresholds),
        # the graph outputs RAW probabilities; calibrated = sigmoid(logit(p) / T) per finding
        # (null: none), as `kedro run --pipelines inference` writes <finding>_calibrated
        "rare_cxr.temperatures": json.dumps((meta.get("calibration") or {}).get("temperatures")),
        "rare_cxr.input": f"float32 [batch, 1, {size}, {size}] grey in [0, 1]",
        "rare_cxr.preprocessing": json.dumps(meta["preprocessing"]),
        "rare_cxr.bundle_version": str(meta.get("bundle_version", "unversioned")),
        "rare_cxr.not_for_clinical_use": "true",
    }
    onnx.helper.set_model_props(graph, props)
    onnx.checker.check_model(graph)
    data = graph.SerializeToString()
    images = check_inputs(size, check_images)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    got = np.concatenate(
        [onnx_probabilities(data, images[:1]), onnx_probabilities(data, images[1:])]
    )
    diff = float(np.max(np.abs(got - expected))) if len(images) else 0.0
    record = {
        "model": meta["model"],
        "bundle_version": meta.get("bundle_version", "unversioned"),
        "opset": opset,
        "input": props["rare_cxr.input"],
        "output": f"{OUTPUT_NAME}: float32 [batch, {len(FINDINGS)}] sigmoid probabilities",
        "check_images": int(len(images)),
        "batch_sizes_checked": [1, int(len(images) - 1)],
        "max_abs_diff": diff,
        "tolerance": float(tolerance),
        "passed": diff <= tolerance,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "device": "cpu",
    }
    if not diff <= tolerance:
        raise OnnxParityError(
            f"ONNX export of {meta['model']}: onnxruntime probabilities differ from PyTorch's "
            f"by up to {diff:.3g} > inference.onnx.tolerance = {tolerance:g}; not saved"
        )
    logger.info("ONNX export of %s: max |Δp| = %.2g on %d images", meta["model"], diff, len(images))
    return data, record
