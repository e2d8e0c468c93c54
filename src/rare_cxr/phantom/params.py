"""Validated phantom parameters.

The node receives `params:phantom` as a `PhantomConfig` (pydantic, unknown keys rejected);
everything downstream works on the frozen `PhantomParams` dataclass, so that a typo or a bad
value stops the run *before* anything is written, with an error naming the offending
`phantom.<key>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from rare_cxr.parameters import Params, check

# A prevalence of more than one half would turn a "rare finding" into the majority class and
# make every film a collage of lesions; the scale is capped there (documented in the YAML).
MAX_PREVALENCE = 0.5
# Above this the uint8 grid is finer than any lesion the generator plants and the default run
# would take far longer than the demo budget; 1024 is NIH's own size.
MAX_IMAGE_SIZE = 2048
MIN_IMAGE_SIZE = 32
MAX_PATIENTS = 99_999_999  # 8-digit NIH patient ids
MAX_FOLLOW_UPS = 1000  # 3-digit NIH follow-up numbers


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
    # at most this many films keep their lesion boxes in BBox_List (None: every film)
    boxed_images: int | None = None


class PhantomConfig(Params):
    """`params:phantom` as written in the YAML (conf/base/parameters_phantom.yml documents it)."""

    enabled: bool = True
    n_patients: int = Field(160, ge=1, le=MAX_PATIENTS)
    # an integer (the maximum; the minimum is 1) or a [min, max] pair
    images_per_patient: Any = Field(default_factory=lambda: [1, 3])
    image_size: int = Field(256, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    seed: int = Field(42, ge=0)
    prevalence_scale: float = Field(2.0, gt=0.0)
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    min_patients_per_finding: int = Field(4, ge=0)
    boxed_images: int | None = Field(None, ge=0)

    @field_validator("images_per_patient")
    @classmethod
    def _follow_ups(cls, value: Any) -> list[int]:
        # hand-written: pydantic's error for the union `int | list[int]` is one entry per
        # member of the union, none of which says what the key accepts
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if is_int(value):
            low, high = 1, value
        elif isinstance(value, list | tuple) and len(value) == 2 and all(map(is_int, value)):
            low, high = value
        else:
            raise ValueError(
                "expected a positive integer (the maximum) or a [min, max] pair of positive "
                f"integers, got {value!r}"
            )
        if not 1 <= low <= high <= MAX_FOLLOW_UPS:
            raise ValueError(f"expected 1 <= min <= max <= {MAX_FOLLOW_UPS}, got {value!r}")
        return [int(low), int(high)]


def validate_params(raw: Mapping[str, Any] | PhantomConfig | None) -> PhantomParams:
    """Turn the `phantom` parameter block into PhantomParams or raise naming the key."""
    config = check(PhantomConfig, raw, "phantom")
    low, high = config.images_per_patient
    return PhantomParams(
        enabled=config.enabled,
        n_patients=config.n_patients,
        min_images=low,
        max_images=high,
        image_size=config.image_size,
        seed=config.seed,
        prevalence_scale=float(config.prevalence_scale),
        label_noise=float(config.label_noise),
        test_fraction=float(config.test_fraction),
        min_patients_per_finding=config.min_patients_per_finding,
        boxed_images=config.boxed_images,
    )
