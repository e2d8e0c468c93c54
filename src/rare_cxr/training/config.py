"""`params:training` as a pydantic model: every key checked before any work, errors name the key.

The defaults below are the ones a direct `fit` call gets (tests, benchmarks); a Kedro run reads
the full block from conf/<env>/parameters_training.yml. `validate_training_params` returns the
plain dict the engine reads (`cfg["batch_size"]`, `cfg["optimizer"]["lr"]`, ...); its content
is part of the training fingerprint, so the keys and values are exactly the block's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rare_cxr.findings import FINDINGS
from rare_cxr.parameters import KeyProblem, Params, check


class OptimizerParams(Params):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    eps: float = Field(1e-8, gt=0.0)


class ScheduleParams(Params):
    name: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    plateau_factor: float = Field(0.5, gt=0.0, le=1.0)
    plateau_patience: int = Field(1, ge=0)


class LossParams(Params):
    """`training.loss`: the loss `name` selects and, as sibling keys, each loss's parameters
    (a loss reads only its own keys: `rare_cxr.training.losses.LOSS_KEYS`; docs/training.md,
    "Long-tail methods")."""

    name: Literal["bce", "focal", "class_balanced", "asl", "logit_adjusted", "ldam_drw"] = "bce"
    # bce, focal: the paper's balanced pos_weight
    balanced: bool = True
    pos_weight_cap: float = Field(100.0, ge=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    # class_balanced (Cui et al. 2019): effective number (1 - beta^n) / (1 - beta)
    cb_beta: float = Field(0.999, ge=0.0, lt=1.0)
    # asl (Ridnik et al. 2021): the paper's recommended gamma+ = 0, gamma- = 4, m = 0.05
    asl_gamma_pos: float = Field(0.0, ge=0.0)
    asl_gamma_neg: float = Field(4.0, ge=0.0)
    asl_clip: float = Field(0.05, ge=0.0, lt=1.0)
    # logit_adjusted (Menon et al. 2021): tau
    la_tau: float = Field(1.0, ge=0.0)
    # ldam_drw (Cao et al. 2019): largest margin, logit scale, DRW's beta and first epoch
    ldam_max_margin: float = Field(0.5, gt=0.0)
    ldam_scale: float = Field(1.0, gt=0.0)
    drw_beta: float = Field(0.9999, ge=0.0, lt=1.0)
    drw_start_epoch: int = Field(4, ge=0)


class CrtParams(Params):
    """`training.crt`: classifier re-training (Kang et al. 2020) after the main training."""

    # 0 = off; N = N epochs of head-only training with class-balanced sampling
    epochs: int = Field(0, ge=0)
    # the cRT stage's learning rate (None: training.optimizer.lr)
    lr: float | None = Field(None, gt=0.0)
    # re-initialise the head before cRT, as Kang et al. (false: fine-tune the trained head)
    reinit_head: bool = True


class OversampleParams(Params):
    enabled: bool = False
    power: float = Field(0.5, gt=0.0, le=1.0)


class TransferParams(Params):
    two_stage: bool = False
    rare_findings: list[str] = Field(
        default_factory=lambda: ["Hernia", "Pneumonia", "Fibrosis", "Edema", "Emphysema"],
        min_length=1,
    )
    stage1_epochs: int = Field(4, ge=1)
    stage2_targets: Literal["all", "rare"] = "all"
    frozen_trunk_epochs: int = Field(1, ge=0)

    @field_validator("rare_findings")
    @classmethod
    def _known_findings(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in FINDINGS]
        if unknown:
            raise ValueError(f"unknown finding(s) {unknown}; expected names from {list(FINDINGS)}")
        if len(set(names)) == len(FINDINGS):
            raise ValueError("every finding is rare, stage 1 would have nothing to learn")
        return names


def _auto_bool(value: Any) -> Any:
    # `auto` | true | false; written by hand because pydantic's error for the union
    # `Literal["auto"] | bool` is two entries (one per member) that name neither the key nor
    # the choices in one sentence
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"expected auto, true or false, got {value!r}")


class TrainingParams(Params):
    """The shared training protocol (conf/base/parameters_training.yml documents every key)."""

    # A model's `training:` overrides are validated with this class's subclass below: on its
    # own, an override need not be consistent with the defaults (only once merged).
    overrides_only: ClassVar[bool] = False

    seed: int = Field(42, ge=0)
    # Train every model n_seeds times, with seeds seed, seed+1, ... (see docs/training.md).
    n_seeds: int = Field(1, ge=1)
    device: str = "auto"
    devices: int = Field(1, ge=1)
    epochs: int = Field(8, ge=1)
    # At most this many optimiser steps per epoch (None = the whole training split): for
    # benchmarks that time the other stages at full size (conf/rehearsal), never for a study.
    max_steps_per_epoch: int | None = Field(None, ge=1)
    patience: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    # Split every global batch into this many micro-batches and step the optimiser once per
    # global batch (gradient accumulation for small GPUs; see docs/training.md).
    accumulation_steps: int = Field(1, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    optimizer: OptimizerParams = Field(default_factory=OptimizerParams)
    schedule: ScheduleParams = Field(default_factory=ScheduleParams)
    loss: LossParams = Field(default_factory=LossParams)
    oversample_rare: OversampleParams = Field(default_factory=OversampleParams)
    transfer: TransferParams = Field(default_factory=TransferParams)
    crt: CrtParams = Field(default_factory=CrtParams)
    amp: Any = "auto"
    channels_last: Any = "auto"
    compile: bool = False
    deterministic: bool = False
    sync_batchnorm: bool = True
    loader_threads: int = Field(1, ge=0)
    resume: bool = True
    # Reuse a finished training of the same fingerprint instead of training again.
    reuse_finished: bool = True
    # Folder of training states for direct `fit` calls (tests, benchmarks). In a Kedro run the
    # folder is the catalog entry `<model>.training_state` and this key must stay unset.
    resume_dir: str | None = Field(None, min_length=1)
    tta_hflip: bool = False
    progress_bar: bool = True

    @field_validator("amp", "channels_last")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        return _auto_bool(value)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device in ("auto", "cpu", "mps", "cuda") or device.startswith("cuda:"):
            return device
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {device!r}")

    @model_validator(mode="after")
    def _micro_batches(self, info: ValidationInfo) -> TrainingParams:
        if self.overrides_only:
            return self
        if self.loss.name == "ldam_drw" and self.loss.drw_start_epoch >= self.epochs:
            raise KeyProblem(
                "loss.drw_start_epoch",
                f"{self.loss.drw_start_epoch} must be below the block's epochs ({self.epochs}): "
                "deferred re-weighting would never switch on",
            )
        accumulation, batch = self.accumulation_steps, self.batch_size
        if batch % accumulation or batch // accumulation < 2:
            raise KeyProblem(
                "accumulation_steps",
                f"{accumulation} must divide {{parent}}.batch_size ({batch}) into micro-batches "
                "of at least 2 images each (BatchNorm cannot train on one image)",
            )
        return self


class TrainingOverrides(TrainingParams):
    """A model's exceptions to the shared block (`<model>.model.training`): same keys and
    bounds; consistency is checked once they are merged over the shared block."""

    overrides_only: ClassVar[bool] = True


def merge_overrides(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, nested blocks key by key (`{optimizer: {lr: x}}` keeps the rest)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def training_params(
    params: Mapping[str, Any] | TrainingParams | None, where: str = "training"
) -> TrainingParams:
    """`params` as a `TrainingParams`: a mapping (or None: the defaults) is validated, an instance
    -- what Kedro hands a node, or what a node built -- is returned as it is (never validated
    twice). The engine reads it by attribute (`cfg.optimizer.lr`)."""
    return check(TrainingParams, params, where)


def validate_training_params(
    params: Mapping[str, Any] | TrainingParams | None, where: str = "training"
) -> dict[str, Any]:
    """Check `params` (defaults for what it leaves out) and return it as a plain dict (for
    JSON, logs and checkpoint metadata; the engine itself reads `training_params(...)`)."""
    return check(TrainingParams, params, where).model_dump()
