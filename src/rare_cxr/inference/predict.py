"""Batched prediction on a folder of new images, with Grad-CAM overlays for positive decisions.

`run_inference(bundle, params)` returns the predictions table (one row per file, see
`prediction_columns`) and the overlays `{relative name: PNG bytes}`. Reading runs in a few
threads (Pillow and pydicom's numpy work release the GIL) while the model predicts batch by
batch on the chosen device, with a tqdm progress bar over files.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import Field, field_validator

from rare_cxr.evaluation.calibration import apply_temperature, rescale_to_threshold
from rare_cxr.findings import FINDINGS
from rare_cxr.imaging import DEFAULT_MAX_IMAGE_PIXELS
from rare_cxr.inference.bundle import bundle_temperatures, bundle_thresholds, load_bundle_model
from rare_cxr.inference.dicom import WITHOUT_VOI_MODES
from rare_cxr.inference.images import ReadResult, read_for_model, scan_folder
from rare_cxr.inference.table import (
    CALIBRATED_SUFFIX,
    DECISION_SUFFIX,
    RESCALED_SUFFIX,
    column_types,
    prediction_columns,
    printable,
)
from rare_cxr.parameters import Params, check

__all__ = [
    "CALIBRATED_SUFFIX",
    "DECISION_SUFFIX",
    "RESCALED_SUFFIX",
    "InferenceParams",
    "overlay_name",
    "prediction_columns",
    "row_overlays",
    "run_inference",
]

logger = logging.getLogger(__name__)


class DicomParams(Params):
    # a DICOM without VOI LUT or window: full_range (stored-value range) or min_max
    without_voi: Literal[WITHOUT_VOI_MODES] = "full_range"  # type: ignore[valid-type]


class GradcamParams(Params):
    enabled: bool = True
    max_findings_per_image: int = Field(3, ge=0)
    alpha: float = Field(0.5, gt=0.0, le=1.0)


class ReportParams(Params):
    max_images: int = Field(200, ge=0)
    thumbnail_size: int = Field(192, ge=16)
    top_findings: int = Field(5, ge=1, le=len(FINDINGS))


class OnnxParams(Params):
    # >= 18: the first opset whose Resize has `antialias` (the models' down-scaling)
    opset: int = Field(18, ge=18)
    tolerance: float = Field(1.0e-4, gt=0.0)
    check_images: int = Field(4, ge=2)


class InferenceParams(Params):
    """`params:inference` (conf/base/parameters_inference.yml documents every key)."""

    input_dir: str | None = None
    bundle: str | None = None
    model: str = "multiscale_resnet"
    device: str = "auto"
    amp: Literal["auto"] | bool = "auto"
    batch_size: int = Field(32, ge=1)
    loader_threads: int = Field(2, ge=0)
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # add `<finding>_rescaled` columns: 0.5 = the finding's validation-tuned threshold
    rescale_to_threshold: bool = False
    progress_bar: bool = True
    dicom: DicomParams = Field(default_factory=DicomParams)
    gradcam: GradcamParams = Field(default_factory=GradcamParams)
    report: ReportParams = Field(default_factory=ReportParams)
    onnx: OnnxParams = Field(default_factory=OnnxParams)

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str) -> str:
        if name in ("auto", "cpu", "mps", "cuda") or name.startswith("cuda:"):
            return name
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {name!r}")


def validate_inference_params(params: Mapping[str, Any] | InferenceParams | None) -> dict:
    """`params:inference` (a mapping, or the model Kedro built) checked, with defaults filled,
    as a plain dict; errors name the key (`inference.gradcam.alpha: ...`) before any work."""
    return check(InferenceParams, params, "inference").model_dump()


def resolve_inference_device(name: str) -> torch.device:
    """`auto` = cuda, then mps, then cpu; an explicit device that is absent is an error."""
    from rare_cxr.training.engine import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"inference.device: {name} requested but no CUDA device is available; "
            "use --params inference.device=cpu"
        )
    return resolve_device(name) if name in ("auto", "cuda") else torch.device(name)


def _overlay_png(grey: np.ndarray, cam: np.ndarray, alpha: float) -> bytes:
    """The grey input with the CAM as a colour map on top, opacity growing with the map."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3]
    base = np.repeat(grey[..., None].astype(np.float64) / 255.0, 3, axis=2)
    weight = alpha * np.clip(cam, 0.0, 1.0)[..., None]
    out = (1.0 - weight) * base + weight * heat
    buffer = io.BytesIO()
    Image.fromarray(np.rint(out * 255.0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# Side of the CAMs kept in memory until the overlays are saved. A Grad-CAM map is the bilinear
# upsampling of the last feature map (input / 32 px: 14 px at 448), so 64 px loses nothing
# visible, and a run over thousands of images keeps ~4 KB per map instead of a rendered PNG.
CAM_KEPT_PX = 64


class LazyOverlay:
    """One overlay PNG, rendered when the catalog saves it (`PngFolderDataset` calls it).

    Why lazy: rendered eagerly, a folder of thousands of images at 448 px would hold gigabytes
    of PNGs in memory until the end of the node. This keeps the CAM (uint8, <= 64 px) and
    re-reads the input file through `read_for_model` when rendering (the same pixels: the
    decoding is deterministic); the last image read is reused for its other overlays.
    """

    def __init__(
        self, entry: Any, read: Any, cam: np.ndarray, alpha: float, last: dict[str, Any]
    ) -> None:
        self.entry, self.read, self.alpha, self.last = entry, read, alpha, last
        side = min(CAM_KEPT_PX, cam.shape[-1])
        small = Image.fromarray(cam.astype(np.float32)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        self.cam = np.rint(np.clip(np.asarray(small), 0.0, 1.0) * 255.0).astype(np.uint8)

    def __call__(self) -> bytes:
        if self.last.get("path") == self.entry.path:
            pixels = self.last["pixels"]
        else:
            result = self.read(self.entry)
            if result.pixels is None:
                raise RuntimeError(
                    f"{self.entry.relpath} could not be read again to draw its Grad-CAM "
                    f"overlay ({result.status}: {result.reason}); was it changed during the run?"
                )
            pixels = result.pixels
            self.last.update(path=self.entry.path, pixels=pixels)  # for its other overlays
        size = pixels.shape[-1]
        cam = Image.fromarray(self.cam).resize((size, size), Image.Resampling.BILINEAR)
        return _overlay_png(pixels, np.asarray(cam, dtype=np.float64) / 255.0, self.alpha)


# Characters kept from an input's name in its overlay's file name (everything else -> "_").
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_CHARS = 60


def _safe(text: str, limit: int) -> str:
    return _UNSAFE.sub("_", text).strip("._")[:limit] or "x"


def overlay_name(row: int, relpath: str, finding: str, layer: str) -> str:
    """The overlay file of one table row, finding and CAM layer:
    `000012_x.dcm__Mass__scale_448.png` (row number from 1, then the input's file name with
    anything but letters, digits, `.`, `_` and `-` replaced).

    Why not the input's own relative path: the overlays would mirror the input folder, so a
    folder named like an overlay file, or two inputs whose names reduce to the same safe text,
    would collide. The row number makes every name unique, and a flat folder of names made
    of safe characters only cannot hold a path that clashes with another (predictions.csv's
    `overlays` column lists each row's files)."""
    stem = _safe(relpath.rsplit("/", 1)[-1], _STEM_CHARS)
    return f"{row:06d}_{stem}__{_safe(finding, 40)}__{_safe(layer, 40)}.png"


def _row(result: ReadResult, relpath: str) -> dict[str, Any]:
    """The text columns of one file's row, every one `printable` (see rare_cxr.inference.table)."""
    return {
        "path": printable(relpath),
        "image_id": printable(result.image_id),
        "format": result.format,
        "status": result.status,
        "reason": printable(result.reason),
        "flags": "|".join(result.flags),
        "view_position": printable(result.view_position),
        "width": result.width,
        "height": result.height,
    }


def run_inference(
    bundle: Mapping[str, Any], params: Mapping[str, Any] | InferenceParams
) -> tuple[pd.DataFrame, dict[str, LazyOverlay]]:
    """Predict every image under `params["input_dir"]` with the bundle's model.

    Returns (predictions, overlays: `{name: LazyOverlay}`, each called for its PNG bytes).
    Files that cannot be predicted get a row with their
    status and reason and empty probabilities; the run goes on. A missing input folder is an
    error naming it.
    """
    from tqdm.auto import tqdm

    from rare_cxr.evaluation.cam import grad_cam
    from rare_cxr.training.engine import amp_dtype, predict_probabilities

    cfg = validate_inference_params(params)
    if not cfg["input_dir"]:
        raise ValueError(
            "inference.input_dir is not set: name the folder of images with "
            "`kedro run --pipelines inference --params input_dir=/path/to/images`"
        )
    files = scan_folder(cfg["input_dir"])
    meta = bundle["metadata"]
    size = int(meta["input_size"])
    thresholds = bundle_thresholds(bundle)
    cutoffs = np.array([thresholds[f] for f in FINDINGS])
    temperatures = bundle_temperatures(bundle)
    if temperatures is None:
        logger.warning(
            "inference: the bundle has no temperatures (written before rare-cxr had them): "
            "the <finding>%s columns stay empty; rerun `kedro run --pipelines reporting` for "
            "a bundle with them",
            CALIBRATED_SUFFIX,
        )
    rescale = bool(cfg["rescale_to_threshold"])
    device = resolve_inference_device(cfg["device"])
    dtype = amp_dtype({"amp": cfg["amp"]}, device)
    tta = bool(meta["preprocessing"].get("tta_hflip", False))
    model = load_bundle_model(bundle).to(device)
    cam_cfg = cfg["gradcam"]
    rows: list[dict[str, Any]] = []
    overlays: dict[str, LazyOverlay] = {}
    cam_jobs: list[tuple[int, Any, np.ndarray, str]] = []  # (row number, entry, pixels, finding)
    last_read: dict[str, Any] = {}  # the image the overlays being rendered belong to
    logger.info(
        "inference: %d file(s) under %s with %s (bundle %s) on %s",
        len(files),
        cfg["input_dir"],
        meta["model"],
        meta.get("bundle_version", "?"),
        device,
    )

    def read(entry):
        return read_for_model(entry, size, cfg["max_image_pixels"], cfg["dicom"]["without_voi"])

    batch = cfg["batch_size"]
    pool = ThreadPoolExecutor(cfg["loader_threads"]) if cfg["loader_threads"] > 0 else None
    bar = tqdm(total=len(files), unit="img", desc="inference", disable=not cfg["progress_bar"])
    try:
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            results = list(pool.map(read, chunk) if pool else map(read, chunk))
            ok = [i for i, r in enumerate(results) if r.status == "ok"]
            probs = np.zeros((0, len(FINDINGS)), np.float32)
            if ok:
                images = np.stack([results[i].pixels for i in ok])
                probs, _ = predict_probabilities(
                    model, images, device, batch_size=len(ok), dtype=dtype, tta_hflip=tta
                )
            probability = dict(zip(ok, probs, strict=True))
            for i, (entry, result) in enumerate(zip(chunk, results, strict=True)):
                row = _row(result, entry.relpath)
                p = probability.get(i)
                positives: list[str] = []
                for k, f in enumerate(FINDINGS):
                    row[f] = float(p[k]) if p is not None else math.nan
                for k, f in enumerate(FINDINGS):
                    t = thresholds[f]
                    if p is None or math.isnan(t):
                        row[f + DECISION_SUFFIX] = pd.NA
                    else:
                        row[f + DECISION_SUFFIX] = int(p[k] >= t)
                        if p[k] >= t:
                            positives.append(f)
                positives.sort(key=lambda f: -row[f])
                row["positive_findings"] = "|".join(positives)
                row["overlays"] = ""
                row["model"] = printable(str(meta["model"]))
                row["bundle_version"] = printable(str(meta.get("bundle_version", "unversioned")))
                row.update(_calibrated_columns(p, temperatures, cutoffs, rescale))
                rows.append(row)
                if p is not None and cam_cfg["enabled"]:
                    cam_jobs += [
                        (len(rows), entry, result.pixels, f)
                        for f in positives[: cam_cfg["max_findings_per_image"]]
                    ]
            # Grad-CAM of every (image, positive finding) pair of the chunk, batched
            for first in range(0, len(cam_jobs), batch):
                jobs = cam_jobs[first : first + batch]
                x = torch.from_numpy(np.stack([j[2] for j in jobs]).astype(np.float32) / 255.0)
                maps = grad_cam(model, x[:, None].to(device), [FINDINGS.index(j[3]) for j in jobs])
                for layer, cams in maps.items():
                    for (number, job_entry, _, finding), cam in zip(jobs, cams, strict=True):
                        name = overlay_name(number, job_entry.relpath, finding, layer)
                        row = rows[number - 1]
                        row["overlays"] = "|".join(filter(None, [row["overlays"], name]))
                        overlays[name] = LazyOverlay(
                            job_entry, read, cam.float().cpu().numpy(), cam_cfg["alpha"], last_read
                        )
            cam_jobs.clear()
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    columns = prediction_columns(rescaled=rescale)
    types = column_types()
    table = pd.DataFrame(rows, columns=columns).astype({c: types[c] for c in columns})
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    logger.info("inference: statuses %s; %d overlay(s)", counts, len(overlays))
    if not len(table):
        logger.warning("inference: the input folder %s holds no files", cfg["input_dir"])
    return table, overlays


def _calibrated_columns(
    p: np.ndarray | None,
    temperatures: Mapping[str, float] | None,
    cutoffs: np.ndarray,
    rescale: bool,
) -> dict[str, float]:
    """One row's `<finding>_calibrated` (the bundle's validation temperatures; NaN without
    them or without a prediction) and, with `rescale`, `<finding>_rescaled` (torchxrayvision's
    threshold rescaling of the RAW probability, so that >= 0.5 is exactly the decision)."""
    out: dict[str, float] = {}
    if p is None or temperatures is None:
        calibrated = np.full(len(FINDINGS), math.nan)
    else:
        calibrated = apply_temperature(p, np.array([temperatures[f] for f in FINDINGS]))
    out.update({f + CALIBRATED_SUFFIX: float(v) for f, v in zip(FINDINGS, calibrated, strict=True)})
    if rescale:
        scores = np.full(len(FINDINGS), math.nan) if p is None else rescale_to_threshold(p, cutoffs)
        out.update({f + RESCALED_SUFFIX: float(v) for f, v in zip(FINDINGS, scores, strict=True)})
    return out


def row_overlays(overlays: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """The overlays of one predictions row (its `overlays` column): `{file name: value}`;
    files absent from `overlays` are left out."""
    names = str(row.get("overlays") or "").split("|")
    return {name: overlays[name] for name in names if name in overlays}
