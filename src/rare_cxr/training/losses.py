"""Multi-label losses over the 14 findings, with the paper's "balanced class weights".

Balanced weights are BCE's `pos_weight` = negatives / positives of each finding in the
*training* split: a Hernia positive (0.2 %) then weighs ~500x a negative instead of being drowned
out (613 on NIH's official train_val list). Capped at `pos_weight_cap` so a finding with a
handful of positives cannot dominate the gradient (conf/base: 100; conf/nih: 1000, i.e. the
paper's uncapped weights -- docs/training.md, "Class weights", gives the measurement behind
both); a capped finding is logged, and the report lists it. A finding with **zero** training
positives gets weight 1 (there is no positive term to weight, and neg/0 would be infinite).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rare_cxr.findings import FINDINGS

logger = logging.getLogger(__name__)


def balanced_pos_weight(labels: np.ndarray, cap: float) -> torch.Tensor:
    """Per-finding `negatives / positives` from a `[N, K]` 0/1 label matrix, capped at `cap`.

    Logs (INFO) every finding the cap lowers, with its balanced weight: the cap changes the
    paper's protocol, so it is never silent (the report's class-weight section says it too)."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum(axis=0)
    neg = labels.shape[0] - pos
    weight = np.where(pos > 0, neg / np.maximum(pos, 1.0), 1.0)
    capped = np.flatnonzero(weight > cap)
    if capped.size:
        names = FINDINGS if labels.shape[1] == len(FINDINGS) else None
        logger.info(
            "pos_weight capped at %g (training.loss.pos_weight_cap) for %s",
            cap,
            ", ".join(f"{names[i] if names else i} (balanced {weight[i]:.0f})" for i in capped),
        )
    return torch.as_tensor(np.clip(weight, 0.0, cap), dtype=torch.float32)


class MultiLabelLoss(nn.Module):
    """BCE-with-logits or focal loss, per-finding `pos_weight`, optional per-finding mask.

    The mask (0/1 per finding) is how two-stage transfer trains on a subset of findings: masked
    findings contribute nothing, and the mean is over the unmasked entries only.
    """

    def __init__(
        self, pos_weight: torch.Tensor | None, kind: str = "bce", gamma: float = 2.0
    ) -> None:
        super().__init__()
        self.kind = kind
        self.gamma = float(gamma)
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)
        self.register_buffer("mask", None)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None else mask.float()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        pw = self.pos_weight
        if self.kind == "bce":
            loss = F.binary_cross_entropy_with_logits(
                logits, targets, pos_weight=pw, reduction="none"
            )
        else:
            # focal loss (Lin et al.): BCE scaled by (1 - p_t)^gamma; positives x pos_weight
            bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            p_t = torch.exp(-bce)
            loss = (1.0 - p_t) ** self.gamma * bce
            if pw is not None:
                loss = loss * (1.0 + (pw - 1.0) * targets)
        if self.mask is not None:
            mask = self.mask.to(loss.device)
            return (loss * mask).sum() / (mask.sum() * loss.shape[0]).clamp_min(1.0)
        return loss.mean()
