"""Parameter checks for the data_processing nodes.

Why: a typo in a YAML file should stop the run before any work, with the full dotted key in the
message (`data_processing.split.val_fraction must be in (0, 1)`), not surface as a confusing
pandas error ten minutes into indexing 112,120 images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rare_cxr.imaging import DEFAULT_MAX_IMAGE_PIXELS

PREFIX = "data_processing"


class ParameterError(ValueError):
    """A data_processing parameter is missing or has a wrong value."""


def _block(params: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise ParameterError(f"{key} must be a mapping, got {type(params).__name__}")
    return params


def _get(params: Mapping[str, Any], block: str, name: str) -> Any:
    if name not in params:
        raise ParameterError(f"{PREFIX}.{block}.{name} is missing")
    return params[name]


def _unknown(params: Mapping[str, Any], block: str, allowed: Iterable[str]) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ParameterError(
            f"{PREFIX}.{block} has unknown key(s) {extra}; expected {sorted(allowed)}"
        )


def _choice(params: Mapping[str, Any], block: str, name: str, options: Iterable[str]) -> str:
    value = _get(params, block, name)
    options = tuple(options)
    if value not in options:
        raise ParameterError(f"{PREFIX}.{block}.{name} must be one of {options}, got {value!r}")
    return value


def _int(params: Mapping[str, Any], block: str, name: str, minimum: int) -> int:
    value = _get(params, block, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(
            f"{PREFIX}.{block}.{name} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def _fraction(params: Mapping[str, Any], block: str, name: str) -> float:
    value = _get(params, block, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ParameterError(f"{PREFIX}.{block}.{name} must be in (0, 1), got {value!r}")
    return float(value)


def _bool(params: Mapping[str, Any], block: str, name: str) -> bool:
    value = _get(params, block, name)
    if not isinstance(value, bool):
        raise ParameterError(f"{PREFIX}.{block}.{name} must be true or false, got {value!r}")
    return value


def _text(params: Mapping[str, Any], block: str, name: str) -> str:
    value = _get(params, block, name)
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{PREFIX}.{block}.{name} must be a non-empty string, got {value!r}")
    return value


LABEL_KEYS = ("source", "max_age", "report_examples")


def check_label_params(params: Any) -> dict[str, Any]:
    """Validate `data_processing.labels`; return a plain dict of checked values."""
    block = "labels"
    params = _block(params, f"{PREFIX}.{block}")
    _unknown(params, block, LABEL_KEYS)
    return {
        "source": _text(params, block, "source"),
        "max_age": _int(params, block, "max_age", 1),
        "report_examples": _int(params, block, "report_examples", 0),
    }


IMAGE_KEYS = (
    "on_missing",
    "on_corrupt",
    "check",
    "workers",
    "progress",
    "report_examples",
    "max_image_pixels",
)


def check_image_params(params: Any) -> dict[str, Any]:
    """Validate `data_processing.images`; return a plain dict of checked values."""
    block = "images"
    params = _block(params, f"{PREFIX}.{block}")
    _unknown(params, block, IMAGE_KEYS)
    return {
        "on_missing": _choice(params, block, "on_missing", ("drop", "error")),
        "on_corrupt": _choice(params, block, "on_corrupt", ("drop", "error")),
        "check": _choice(params, block, "check", ("header", "verify", "decode")),
        "workers": _int(params, block, "workers", 1),
        "progress": _bool(params, block, "progress"),
        "report_examples": _int(params, block, "report_examples", 0),
        # optional (a parameter file written before the limit existed keeps working), but
        # checked like the others when given
        "max_image_pixels": _int(params, block, "max_image_pixels", 1)
        if "max_image_pixels" in params
        else DEFAULT_MAX_IMAGE_PIXELS,
    }


SPLIT_KEYS = ("mode", "val_fraction", "test_fraction", "seed")


def check_split_params(params: Any) -> dict[str, Any]:
    """Validate `data_processing.split`; return a plain dict of checked values."""
    block = "split"
    params = _block(params, f"{PREFIX}.{block}")
    _unknown(params, block, SPLIT_KEYS)
    mode = _choice(params, block, "mode", ("official", "stratified"))
    checked: dict[str, Any] = {
        "mode": mode,
        "val_fraction": _fraction(params, block, "val_fraction"),
        "seed": _int(params, block, "seed", 0),
    }
    if mode == "stratified":
        checked["test_fraction"] = _fraction(params, block, "test_fraction")
        if checked["val_fraction"] + checked["test_fraction"] >= 1:
            raise ParameterError(
                f"{PREFIX}.{block}.val_fraction + {PREFIX}.{block}.test_fraction must be < 1 "
                f"(the rest is train), got {checked['val_fraction']} + {checked['test_fraction']}"
            )
    return checked
