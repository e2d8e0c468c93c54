"""The model bundle: one file that is everything inference needs, and everything a reader of
the model needs to know.

Why a bundle and not the checkpoint: a checkpoint holds weights and how they were trained, but
not the decision thresholds (tuned on the validation split by the reporting pipeline), nor the
metrics and the data they were measured on. A model that leaves the project must carry all
three, or its decisions and its card would have to be reassembled from a data folder the
recipient does not have.

Layout (`torch.save`, loadable with `torch.load(weights_only=True)`: tensors and plain Python
only, nothing that can execute code)::

    {"state_dict": {name: tensor},          # the primary seed's weights
     "metadata": {
        "format": "rare-cxr-model-bundle", "format_version": 1,
        "model", "model_spec", "findings", "normalisation", "scales", "input_size",
        "preprocessing": {...},             # how a file becomes the model's input
        "thresholds": {finding: float | None}, "threshold_method", "threshold_split",
        "training": {...},                  # train params, best epoch, training id, versions
        "data": {...},                      # source, images/patients per split, positives
        "metrics": {...},                   # test metrics with patient-bootstrap intervals
        "rare_findings", "long_tail", "subgroups",   # where the report has them
        "lineage": {...}, "created_by": "rare-cxr <version>"}}

The reporting pipeline writes one per model (`<model>.model_bundle`, node
`<model>.build_model_bundle`) from the outputs `verify_lineage` checked belong together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from rare_cxr.findings import FINDINGS

BUNDLE_FORMAT = "rare-cxr-model-bundle"
BUNDLE_FORMAT_VERSION = 1
# Keys inference reads; a bundle without one of them is refused with the key named.
REQUIRED_METADATA = (
    "format",
    "format_version",
    "model",
    "model_spec",
    "findings",
    "normalisation",
    "scales",
    "input_size",
    "preprocessing",
    "thresholds",
)


class BundleError(ValueError):
    """A file that is not a usable rare-cxr model bundle (what is wrong is named)."""


def _plain(obj: Any) -> Any:
    """JSON-like Python (NaN -> None, numpy -> Python): what `weights_only=True` accepts and
    what the model card and JSON readers can use unchanged."""
    from rare_cxr.evaluation.metrics import to_jsonable

    return to_jsonable(obj)


def _metrics_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `<model>.metrics` a card shows: test per finding and macro, intervals."""
    test = metrics.get("test") or {}
    keep = (
        "positives",
        "prevalence",
        "threshold",
        "auroc",
        "auprc",
        "f1",
        "precision",
        "recall",
        "specificity",
        "balanced_accuracy",
        "accuracy",
    )
    per = {
        f: {k: v for k, v in (test.get("per_finding", {}).get(f) or {}).items() if k in keep}
        for f in FINDINGS
    }
    return {
        "split": "test",
        "n_images": test.get("n_images"),
        "n_test_patients": metrics.get("n_test_patients"),
        "macro": test.get("macro"),
        "per_finding": per,
        "all_negative": test.get("all_negative"),
        "subset_accuracy": test.get("subset_accuracy"),
        "intervals": metrics.get("intervals"),
        "seed_summary": metrics.get("seed_summary"),
        "seeds": metrics.get("seeds"),
    }


def make_bundle(
    *,
    checkpoint: Mapping[str, Any],
    thresholds: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
    rare_findings: Mapping[str, Any] | None = None,
    long_tail: Mapping[str, Any] | None = None,
    subgroups: Mapping[str, Any] | None = None,
    reporting: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a bundle from a checkpoint and the reporting outputs of the same model.

    The thresholds must be those of the checkpoint's primary seed (`thresholds["thresholds"]`,
    what `select_thresholds` writes) and were tuned on the validation split only.
    """
    import rare_cxr
    from rare_cxr.image_cache import RESAMPLE_NAME

    meta = checkpoint["metadata"]
    if list(meta.get("findings", [])) != list(FINDINGS):
        raise BundleError("checkpoint findings differ from rare_cxr.findings.FINDINGS")
    chosen = thresholds.get("thresholds") or {}
    missing = [f for f in FINDINGS if f not in chosen]
    if missing:
        raise BundleError(f"thresholds lack the finding(s) {missing}")
    train_params = dict(meta.get("train_params") or {})
    spec = dict(meta["model_spec"])
    groups = (long_tail or {}).get("groups") or []
    subgroup_rows = [r for r in (subgroups or {}).get("rows") or [] if r.get("finding") == "macro"]
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": str(spec.get("name")),
        "model_spec": spec,
        "findings": list(FINDINGS),
        "normalisation": dict(meta.get("normalisation") or {}),
        "scales": [int(s) for s in meta.get("scales") or spec.get("scales", [])],
        "input_size": int(meta["input_size"]),
        "preprocessing": {
            "grey": "rare_cxr.imaging.to_grayscale (8-bit as is; 16-bit scaled by 255/65535; "
            "RGB/RGBA to ITU-R 601 luminance, alpha ignored); DICOM through "
            "rare_cxr.inference.dicom (Modality LUT, VOI LUT or window, MONOCHROME1 inverted)",
            "resize": f"{RESAMPLE_NAME} to input_size x input_size (aspect ratio not kept), "
            "rare_cxr.image_cache.resize_square",
            "input": "float [B, 1, input_size, input_size] in [0, 1]; the model normalises and "
            "resizes to its scales itself",
            "tta_hflip": bool(train_params.get("tta_hflip", False)),
        },
        "thresholds": {f: chosen.get(f) for f in FINDINGS},
        "threshold_method": thresholds.get("method"),
        "threshold_split": thresholds.get("split", "val"),
        "training": {
            "train_params": train_params,
            "best_epoch": meta.get("epoch"),
            "metric": meta.get("metric"),
            "metric_name": meta.get("metric_name"),
            "training_id": meta.get("training_id"),
            "checkpoint_version": meta.get("checkpoint_version"),
            "seeds": meta.get("seeds"),
            "image_cache": meta.get("image_cache"),
        },
        "data": dict(data_summary),
        "metrics": _metrics_summary(metrics),
        "rare_findings": dict(rare_findings or {}),
        "long_tail": groups,
        "subgroups": subgroup_rows,
        "reporting": {
            k: (reporting or {}).get(k) for k in ("min_positives", "bootstrap", "threshold_method")
        },
        "lineage": dict(lineage or {}),
        "created_by": f"rare-cxr {rare_cxr.__version__}",
    }
    state = {k: v.detach().cpu() for k, v in checkpoint["state_dict"].items()}
    return {"state_dict": state, "metadata": _plain(metadata)}


def validate_bundle(obj: Any, source: str = "model bundle") -> dict[str, Any]:
    """Check that `obj` is a bundle this rare-cxr can use; errors name `source` and the key."""
    if not isinstance(obj, Mapping) or "state_dict" not in obj or "metadata" not in obj:
        raise BundleError(f"{source} is not a rare-cxr model bundle (needs state_dict, metadata)")
    meta = obj["metadata"]
    if not isinstance(meta, Mapping):
        raise BundleError(f"{source}: metadata is {type(meta).__name__}, expected a mapping")
    if meta.get("format") != BUNDLE_FORMAT:
        hint = (
            " (it is a training checkpoint: run `kedro run --pipelines reporting` to make the "
            "bundle, which adds the validation thresholds)"
            if "model_spec" in meta and "format" not in meta
            else ""
        )
        raise BundleError(
            f"{source}: metadata.format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}{hint}"
        )
    if meta.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{source}: bundle format_version {meta.get('format_version')!r}; this rare-cxr "
            f"reads version {BUNDLE_FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise BundleError(f"{source}: metadata lacks {missing}")
    if list(meta["findings"]) != list(FINDINGS):
        raise BundleError(f"{source}: findings {meta['findings']} differ from FINDINGS")
    bad = [f for f in FINDINGS if f not in meta["thresholds"]]
    if bad:
        raise BundleError(f"{source}: thresholds lack {bad}")
    state = obj["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise BundleError(f"{source}: state_dict must map names to tensors")
    return dict(obj)


def bundle_thresholds(bundle: Mapping[str, Any]) -> dict[str, float]:
    """Finding -> threshold (NaN where validation had no positive: no decision is made)."""
    out = {}
    for f in FINDINGS:
        value = bundle["metadata"]["thresholds"].get(f)
        out[f] = math.nan if value is None else float(value)
    return out


def load_bundle_model(bundle: Mapping[str, Any]) -> torch.nn.Module:
    """The model of a bundle, in eval mode, on the CPU (spec and weights from the bundle only;
    the input normalisation it was trained with is checked against this rare-cxr's)."""
    from rare_cxr.pipelines.training.nodes import load_checkpoint_model

    meta = bundle["metadata"]
    checkpoint = {
        "state_dict": bundle["state_dict"],
        "metadata": {k: meta[k] for k in ("model_spec", "findings", "normalisation")},
    }
    return load_checkpoint_model(checkpoint).eval()
