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
        "calibration": {"temperatures": {finding: float | None}, ...} | None,   # issue 20;
        "underdiagnosis": [...],            # optional: bundles before it have neither
        "lineage": {...}, "created_by": "rare-cxr <version>"}}

The reporting pipeline writes one per model (`<model>.model_bundle`, node
`<model>.build_model_bundle`) from the outputs `verify_lineage` checked belong together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from rare_cxr.findings import FINDINGS
from rare_cxr.models.factory import MIN_INPUT
from rare_cxr.parameters import KeyProblem

BUNDLE_FORMAT = "rare-cxr-model-bundle"
BUNDLE_FORMAT_VERSION = 1


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
    calibration: Mapping[str, Any] | None = None,
    underdiagnosis: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a bundle from a checkpoint and the reporting outputs of the same model.

    The thresholds must be those of the checkpoint's primary seed (`thresholds["thresholds"]`,
    what `select_thresholds` writes) and were tuned on the validation split only; so were the
    temperatures of `calibration` (`<model>.calibration`, `calibration_metrics`), which
    inference applies to write the calibrated probabilities.
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
        "calibration": _calibration_summary(calibration),
        "underdiagnosis": list((underdiagnosis or {}).get("rows") or []),
        "reporting": {
            k: (reporting or {}).get(k) for k in ("min_positives", "bootstrap", "threshold_method")
        },
        "lineage": dict(lineage or {}),
        "created_by": f"rare-cxr {rare_cxr.__version__}",
    }
    state = {k: v.detach().cpu() for k, v in checkpoint["state_dict"].items()}
    return {"state_dict": state, "metadata": _plain(metadata)}


def _calibration_summary(calibration: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What inference and the card need of `<model>.calibration`: the temperatures (fitted on
    validation), how they were fitted, and each finding's test ECE raw and calibrated."""
    if not calibration:
        return None
    temperatures = calibration.get("temperatures") or {}
    missing = [f for f in FINDINGS if f not in temperatures]
    if missing:
        raise BundleError(f"calibration lacks the temperature of {missing}")
    rows = {r.get("finding"): r for r in calibration.get("per_finding") or []}
    return {
        "method": calibration.get("method"),
        "split": calibration.get("split", "val"),
        "temperatures": {f: temperatures[f] for f in FINDINGS},
        "binning": calibration.get("binning"),
        "n_bins": calibration.get("n_bins"),
        "test_ece": {
            f: {k: (rows.get(f) or {}).get(f"ece_{k}") for k in ("raw", "calibrated")}
            for f in (*FINDINGS, "macro")
        },
    }


# Largest input_size and scale a bundle may ask for: inference resizes every image to
# input_size x input_size, so a hostile bundle could otherwise make each image gigapixels.
# 4096 is 4x the NIH films' side and above every configured model (<= 512).
MAX_INPUT_SIZE = 4096


class _Normalisation(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    mean: StrictFloat
    std: StrictFloat = Field(gt=0.0)


class _Preprocessing(BaseModel):
    model_config = ConfigDict(extra="allow")
    tta_hflip: StrictBool = False


class _Calibration(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    # one per finding: sigmoid(logit(p) / T) at inference; None = no temperature (identity)
    temperatures: dict[str, Annotated[StrictFloat, Field(gt=0.0)] | None]

    @field_validator("temperatures")
    @classmethod
    def _one_per_finding(cls, value: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in FINDINGS if f not in value]
        unknown = [k for k in value if k not in FINDINGS]
        if missing or unknown:
            raise ValueError(
                f"expected one temperature per finding; missing {missing}, unknown {unknown}"
            )
        return value


class BundleMetadata(BaseModel):
    """What inference reads from a bundle's metadata, key by key (other keys are kept as they
    are: the card shows them, and escapes them). Validated with `rare_cxr.parameters.check`,
    so each problem is one sentence naming the file and the key."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: StrictStr = Field(min_length=1)
    model_spec: dict[str, Any]
    findings: list[StrictStr]
    normalisation: _Normalisation
    scales: list[Annotated[StrictInt, Field(ge=1, le=MAX_INPUT_SIZE)]] = Field(min_length=1)
    input_size: StrictInt = Field(ge=1, le=MAX_INPUT_SIZE)
    preprocessing: _Preprocessing
    thresholds: dict[str, Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None]
    # temperature scaling (issue 20); absent or null in older bundles: no calibrated output
    calibration: _Calibration | None = None

    @field_validator("findings")
    @classmethod
    def _same_findings(cls, value: list[str]) -> list[str]:
        if value != list(FINDINGS):
            raise ValueError(f"{value} differ from rare_cxr.findings.FINDINGS {list(FINDINGS)}")
        return value

    @field_validator("thresholds")
    @classmethod
    def _one_per_finding(cls, value: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in FINDINGS if f not in value]
        unknown = [k for k in value if k not in FINDINGS]
        if missing or unknown:
            raise ValueError(
                f"expected one threshold per finding; missing {missing}, unknown {unknown}"
            )
        return value

    @model_validator(mode="after")
    def _scales_fit(self) -> BundleMetadata:
        # Training allows one exception (`check_scales_fit_cache`): a scale at the architecture's
        # minimum input (Inception-v3's 75 px) above a small image cache, upsampled in the model.
        # A bundle trained that way must load; any other scale above input_size is refused.
        minimum = MIN_INPUT.get(str(self.model_spec.get("architecture")), 0)
        if any(s > self.input_size and s > minimum for s in self.scales):
            raise KeyProblem(
                "scales", f"{self.scales} exceed input_size {self.input_size} (the model input)"
            )
        return self


def _check_format(meta: Mapping[str, Any], source: str) -> None:
    """format and format_version first: a checkpoint or a future bundle is told apart."""
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
            f"{source}: metadata.format_version is {meta.get('format_version')!r}; this "
            f"rare-cxr reads version {BUNDLE_FORMAT_VERSION}"
        )


def _check_weights(obj: Mapping[str, Any], source: str) -> None:
    """The state_dict against the architecture its model_spec builds: every parameter and
    buffer present, none extra, each of the model's shape; the input normalisation it was
    trained with equal to this rare-cxr's for that architecture."""
    from rare_cxr.models import build_model
    from rare_cxr.models.factory import validate_model_spec

    meta = obj["metadata"]
    spec = validate_model_spec(meta["model_spec"])  # with its defaults (backbone...)
    model = build_model(spec, load_weights=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = obj["state_dict"]
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing {len(missing)} key(s) {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s) {_few(unexpected)}")
    shapes = [
        f"{k}: {list(state[k].shape)} in the bundle, {list(v)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != v
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_few(shapes)}")
    if problems:
        raise BundleError(
            f"{source}: state_dict does not fit metadata.model_spec (architecture "
            f"{spec.get('architecture')!r}, backbone {spec.get('backbone')!r}, scales "
            f"{spec.get('scales')}): " + "; ".join(problems)
        )
    now = getattr(model, "normalisation", None) or {}
    for key in ("mean", "std"):
        if key in now and float(meta["normalisation"][key]) != float(now[key]):
            raise BundleError(
                f"{source}: metadata.normalisation.{key} is {meta['normalisation'][key]}, but "
                f"this rare-cxr feeds {key}={now[key]} to a {spec['architecture']}: its "
                "predictions would be wrong; retrain the model with this version"
            )


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(repr(i) for i in items[:n]) + (", ..." if len(items) > n else "")


def validate_bundle(
    obj: Any, source: str = "model bundle", check_weights: bool = True
) -> dict[str, Any]:
    """Check that `obj` is a bundle this rare-cxr can use, key by key; every error names
    `source` (the file) and the key (`metadata.input_size`, `metadata.thresholds.Mass`,
    `state_dict`...). `check_weights` builds the architecture (no pretrained download) and
    compares the state_dict's keys and shapes with it (`_check_weights`)."""
    from rare_cxr.models.factory import ModelSpec
    from rare_cxr.parameters import ParameterError, check

    if not isinstance(obj, Mapping) or "state_dict" not in obj or "metadata" not in obj:
        raise BundleError(f"{source} is not a rare-cxr model bundle (needs state_dict, metadata)")
    meta = obj["metadata"]
    if not isinstance(meta, Mapping):
        raise BundleError(f"{source}: metadata is {type(meta).__name__}, expected a mapping")
    _check_format(meta, source)
    try:
        check(BundleMetadata, meta, f"{source}: metadata")
        check(ModelSpec, meta["model_spec"], f"{source}: metadata.model_spec")
    except ParameterError as exc:
        raise BundleError(str(exc)) from None
    state = obj["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise BundleError(f"{source}: state_dict must map parameter names to tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BundleError(f"{source}: state_dict values of {_few(bad)} are not tensors")
    if check_weights:
        _check_weights(obj, source)
    return dict(obj)


def bundle_thresholds(bundle: Mapping[str, Any]) -> dict[str, float]:
    """Finding -> threshold (NaN where validation had no positive: no decision is made)."""
    out = {}
    for f in FINDINGS:
        value = bundle["metadata"]["thresholds"].get(f)
        out[f] = math.nan if value is None else float(value)
    return out


def bundle_temperatures(bundle: Mapping[str, Any]) -> dict[str, float] | None:
    """Finding -> temperature (NaN: none fitted, the calibrated probability is the raw one);
    None for a bundle without calibration (written before issue 20)."""
    calibration = bundle["metadata"].get("calibration")
    if not calibration:
        return None
    values = calibration["temperatures"]
    return {f: math.nan if values.get(f) is None else float(values[f]) for f in FINDINGS}


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
