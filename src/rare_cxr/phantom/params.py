"""Validated phantom parameters.

The node receives `params:phantom` as a plain dict; everything downstream works on this frozen
dataclass so that a typo or a bad value stops the run *before* anything is written, with an
error naming the offending `phantom.<key>`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A prevalence of more than one half would turn a "rare finding" into the majority class and
# make every film a collage of lesions; the scale is capped there (documented in the YAML).
MAX_PREVALENCE = 0.5
# Above this the uint8 grid is finer than any lesion the generator plants and the default run
# would take far longer than the demo budget; 1024 is NIH's own size.
MAX_IMAGE_SIZE = 2048
MIN_IMAGE_SIZE = 32
MAX_PATIENTS = 99_999_999  # 8-digit NIH patient ids
MAX_FOLLOW_UPS = 1000  # 3-digit NIH follow-up numbers

KNOWN_KEYS = frozenset(
    {
        "enabled",
        "n_patients",
        "images_per_patient",
        "image_size",
        "seed",
        "prevalence_scale",
        "label_noise",
        "test_fraction",
        "min_patients_per_finding",
    }
)


@dataclass(frozen=True)
class PhantomParams:
    """Every knob of the generator, validated (see conf/base/parameters_phantom.yml)."""

    enabled: bool = True
    n_patients: int = 160
    min_images: int = 1
    max_images: int = 3
    image_size: int = 256
    seed: int = 42
    prevalence_scale: float = 2.0
    label_noise: float = 0.0
    test_fraction: float = 0.2
    min_patients_per_finding: int = 4


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _positive_int(raw: Mapping[str, Any], key: str, upper: int | None = None) -> int:
    value = raw[key]
    if not _is_int(value) or value < 1:
        raise ValueError(f"phantom.{key} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"phantom.{key} must be at most {upper}, got {value!r}")
    return int(value)


def _fraction(raw: Mapping[str, Any], key: str, upper_inclusive: bool) -> float:
    value = raw[key]
    closing = "]" if upper_inclusive else ")"
    if not _is_number(value) or value < 0 or value > 1 or (value == 1 and not upper_inclusive):
        raise ValueError(f"phantom.{key} must be a number in [0, 1{closing}, got {value!r}")
    return float(value)


def validate_params(raw: Mapping[str, Any] | None) -> PhantomParams:
    """Turn the `phantom` parameter block into PhantomParams or raise naming the key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"parameters 'phantom' must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"unknown phantom parameter(s): {', '.join('phantom.' + k for k in unknown)}; "
            f"expected some of: {', '.join(sorted(KNOWN_KEYS))}"
        )
    defaults = PhantomParams()
    merged: dict[str, Any] = {
        "enabled": defaults.enabled,
        "n_patients": defaults.n_patients,
        "images_per_patient": [defaults.min_images, defaults.max_images],
        "image_size": defaults.image_size,
        "seed": defaults.seed,
        "prevalence_scale": defaults.prevalence_scale,
        "label_noise": defaults.label_noise,
        "test_fraction": defaults.test_fraction,
        "min_patients_per_finding": defaults.min_patients_per_finding,
    }
    merged.update(raw)

    if not isinstance(merged["enabled"], bool):
        raise ValueError(f"phantom.enabled must be true or false, got {merged['enabled']!r}")
    n_patients = _positive_int(merged, "n_patients", MAX_PATIENTS)

    ipp = merged["images_per_patient"]
    if _is_int(ipp):
        low, high = 1, ipp
    elif isinstance(ipp, list | tuple) and len(ipp) == 2 and all(_is_int(v) for v in ipp):
        low, high = int(ipp[0]), int(ipp[1])
    else:
        raise ValueError(
            "phantom.images_per_patient must be a positive integer (the maximum) or a "
            f"[min, max] pair of positive integers, got {ipp!r}"
        )
    if not 1 <= low <= high <= MAX_FOLLOW_UPS:
        raise ValueError(
            f"phantom.images_per_patient must satisfy 1 <= min <= max <= {MAX_FOLLOW_UPS}, "
            f"got {ipp!r}"
        )

    size = merged["image_size"]
    if not _is_int(size) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"phantom.image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
            f"got {size!r}"
        )
    seed = merged["seed"]
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"phantom.seed must be a non-negative integer, got {seed!r}")
    scale = merged["prevalence_scale"]
    if not _is_number(scale) or scale <= 0:
        raise ValueError(f"phantom.prevalence_scale must be a positive number, got {scale!r}")

    minimum = merged["min_patients_per_finding"]
    if not _is_int(minimum) or minimum < 0:
        raise ValueError(
            f"phantom.min_patients_per_finding must be a non-negative integer, got {minimum!r}"
        )

    return PhantomParams(
        enabled=merged["enabled"],
        n_patients=n_patients,
        min_images=low,
        max_images=high,
        image_size=int(size),
        seed=int(seed),
        prevalence_scale=float(scale),
        label_noise=_fraction(merged, "label_noise", upper_inclusive=False),
        test_fraction=_fraction(merged, "test_fraction", upper_inclusive=False),
        min_patients_per_finding=int(minimum),
    )
