"""Learning-rate schedules with a plain, resumable state.

Written here rather than chained torch schedulers because the loop needs three things at once:
per-step cosine with linear warm-up, per-epoch reduce-on-plateau, and a per-parameter-group
multiplier (0 for the trunk during a frozen-trunk warm-up; the engine also turns the trunk's
gradients off and runs those head-only steps outside DDP, see `engine.set_trunk_frozen`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from rare_cxr.parameters import check
from rare_cxr.training.config import ScheduleParams


class LRSchedule:
    """`factor(step)` times the base lr; state is a plain dict for the resume checkpoint."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        cfg: ScheduleParams | Mapping[str, Any],
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        cfg = check(ScheduleParams, cfg, "training.schedule")  # an instance passes through
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.name = cfg.name
        self.warmup_steps = int(cfg.warmup_epochs) * steps_per_epoch
        self.total_steps = max(1, epochs * steps_per_epoch)
        self.min_ratio = float(cfg.min_lr_ratio)
        self.plateau_factor = float(cfg.plateau_factor)
        self.plateau_patience = int(cfg.plateau_patience)
        self.step_count = 0
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad = 0
        self.apply()

    def factor(self) -> float:
        s = self.step_count
        warm = (s + 1) / self.warmup_steps if self.warmup_steps and s < self.warmup_steps else 1.0
        if self.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (s - self.warmup_steps) / span))
            decay = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return warm * decay
        if self.name == "plateau":
            return warm * self.plateau_scale
        return warm

    @property
    def lr(self) -> float:
        return self.base_lr * self.factor()

    def apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)

    def step(self) -> None:
        """After every optimiser step."""
        self.step_count += 1
        self.apply()

    def epoch_end(self, metric: float) -> None:
        """After validation: reduce-on-plateau watches the validation metric (higher is better)."""
        if self.name != "plateau" or math.isnan(metric):
            return
        if metric > self.plateau_best:
            self.plateau_best, self.plateau_bad = metric, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.plateau_bad = 0
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "plateau_scale": self.plateau_scale,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
        self.apply()
