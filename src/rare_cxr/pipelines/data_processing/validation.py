"""Parameter models of the data_processing nodes (`params:data_processing.<block>`).

Why: a typo in a YAML file should stop the run before any work, with the full dotted key in the
message (`data_processing.split.val_fraction: expected a value < 1, got 1.5`), not surface as a
confusing pandas error ten minutes into indexing 112,120 images. Every key is required (the
values are documented in conf/base/parameters_data_processing.yml), except
`images.max_image_pixels`, which older parameter files do not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from rare_cxr.imaging import DEFAULT_MAX_IMAGE_PIXELS
from rare_cxr.parameters import KeyProblem, ParameterError, Params, check

__all__ = [
    "DataProcessingParams",
    "ImageParams",
    "LabelParams",
    "ParameterError",
    "SplitParams",
    "check_image_params",
    "check_label_params",
    "check_split_params",
]

PREFIX = "data_processing"


class LabelParams(Params):
    # name of the label file, used in error messages ("<file>, row N: problem")
    source: str = Field(min_length=1)
    max_age: int = Field(ge=1)
    report_examples: int = Field(ge=0)


class ImageParams(Params):
    on_missing: Literal["drop", "error"]
    on_corrupt: Literal["drop", "error"]
    check: Literal["header", "verify", "decode"]
    workers: int = Field(ge=1)
    progress: bool
    report_examples: int = Field(ge=0)
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)


class SplitParams(Params):
    mode: Literal["official", "stratified"]
    val_fraction: float = Field(gt=0.0, lt=1.0)
    # stratified mode only (official: the test split is test_list.txt)
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    seed: int = Field(ge=0)

    @model_validator(mode="after")
    def _stratified_needs_test(self) -> SplitParams:
        if self.mode != "stratified":
            return self
        if self.test_fraction is None:
            raise KeyProblem("test_fraction", "required in stratified mode (a share in (0, 1))")
        if self.val_fraction + self.test_fraction >= 1:
            raise KeyProblem(
                "test_fraction",
                f"{{parent}}.val_fraction + {{parent}}.test_fraction must be < 1 (the rest is "
                f"train), got {self.val_fraction} + {self.test_fraction}",
            )
        return self


class DataProcessingParams(Params):
    """The whole `data_processing` block (checked at once when a run starts)."""

    labels: LabelParams
    images: ImageParams
    split: SplitParams


def check_label_params(params: Mapping[str, Any] | LabelParams) -> dict[str, Any]:
    """Validate `data_processing.labels`; return a plain dict of checked values."""
    return check(LabelParams, params, f"{PREFIX}.labels").model_dump()


def check_image_params(params: Mapping[str, Any] | ImageParams) -> dict[str, Any]:
    """Validate `data_processing.images`; return a plain dict of checked values."""
    return check(ImageParams, params, f"{PREFIX}.images").model_dump()


def check_split_params(params: Mapping[str, Any] | SplitParams) -> dict[str, Any]:
    """Validate `data_processing.split`; return a plain dict of checked values (no
    `test_fraction` in official mode, where it means nothing)."""
    checked = check(SplitParams, params, f"{PREFIX}.split").model_dump()
    if checked["mode"] != "stratified":
        checked.pop("test_fraction")
    return checked
