"""`params:reporting` as a pydantic model (conf/base/parameters_reporting.yml documents every key).

Unknown keys are rejected in every sub-block: a typo such as `gradcam.devcie` would otherwise be
silently ignored and Grad-CAM would run on the default device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rare_cxr.evaluation import subgroups
from rare_cxr.evaluation.calibration import BINNINGS
from rare_cxr.evaluation.metrics import THRESHOLD_METHODS
from rare_cxr.evaluation.proportions import PROPORTION_METHODS
from rare_cxr.findings import FINDINGS
from rare_cxr.parameters import KeyProblem, Params, check


def _device(name: str) -> str:
    if name in ("auto", "cpu", "mps", "cuda") or name.startswith("cuda:"):
        return name
    raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {name!r}")


class BootstrapParams(Params):
    n_resamples: int = Field(1000, ge=1)
    seed: int = Field(0, ge=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class RareFindingsParams(Params):
    # findings with a training prevalence below this; null = the n_rarest
    max_prevalence: float | None = Field(None, gt=0.0, le=1.0)
    n_rarest: int = Field(5, ge=1, le=len(FINDINGS))


class CostParams(Params):
    batch_size: int = Field(8, ge=1)
    n_batches: int = Field(3, ge=1)
    warmup_batches: int = Field(1, ge=0)
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str) -> str:
        return _device(name)


class GradcamParams(Params):
    examples_per_finding: int = Field(1, ge=0)
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str) -> str:
        return _device(name)


class LongTailParams(Params):
    head_min: float = Field(0.10, ge=0.0, le=1.0)
    tail_max: float = Field(0.036, ge=0.0, le=1.0)
    specificities: list[float] = Field(default_factory=lambda: [0.90, 0.95], min_length=1)

    @field_validator("specificities")
    @classmethod
    def _inside(cls, values: list[float]) -> list[float]:
        if not all(0.0 < v < 1.0 for v in values):
            raise ValueError(f"expected numbers in (0, 1), got {values!r}")
        return values

    @model_validator(mode="after")
    def _ordered(self) -> LongTailParams:
        if not self.head_min > self.tail_max:
            raise KeyProblem(
                "head_min",
                f"{self.head_min} must be greater than {{parent}}.tail_max ({self.tail_max})",
            )
        return self


class SubgroupParams(Params):
    age_edges: list[int] = Field(default_factory=lambda: [0, 18, 40, 60, 80, 200])

    @field_validator("age_edges")
    @classmethod
    def _edges(cls, edges: list[int]) -> list[int]:
        subgroups.age_band_labels(edges)  # its error names reporting.subgroups.age_edges
        return edges


class CalibrationParams(Params):
    # bins of the expected calibration error (rare_cxr.evaluation.calibration)
    n_bins: int = Field(15, ge=1)
    binning: Literal[BINNINGS] = "equal_mass"  # type: ignore[valid-type]


class ReportingParams(Params):
    # `trained` or a list of model namespaces (checked against the configured models)
    models: Any = "trained"
    title: str = "rare-cxr report"
    data_source: str = ""
    threshold_method: Literal[THRESHOLD_METHODS] = "f1"  # type: ignore[valid-type]
    bootstrap: BootstrapParams = Field(default_factory=BootstrapParams)
    rare_findings: RareFindingsParams = Field(default_factory=RareFindingsParams)
    cost: CostParams = Field(default_factory=CostParams)
    gradcam: GradcamParams = Field(default_factory=GradcamParams)
    reliability_bins: int = Field(10, ge=1)
    min_positives: int = Field(10, ge=1)
    # binomial interval of a per-finding proportion where the bootstrap degenerates
    proportion_interval: Literal[PROPORTION_METHODS] = "exact"  # type: ignore[valid-type]
    long_tail: LongTailParams = Field(default_factory=LongTailParams)
    subgroups: SubgroupParams = Field(default_factory=SubgroupParams)
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)

    @field_validator("models")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if value == "trained":
            return value
        if (
            isinstance(value, list | tuple)
            and value
            and all(isinstance(v, str) and v for v in value)
            and len(set(value)) == len(value)
        ):
            return list(value)
        raise ValueError(
            f"expected 'trained' or a non-empty list of distinct model names, got {value!r}"
        )


def validate_reporting_params(params: Mapping[str, Any] | ReportingParams) -> dict[str, Any]:
    """Check `params:reporting` (a mapping, or the model Kedro built) before any work and return
    it as a plain dict with defaults filled in; errors name the offending key."""
    return check(ReportingParams, params, "reporting").model_dump(exclude={"models"})
