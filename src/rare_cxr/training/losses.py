"""Multi-label losses over the findings: the paper's balanced BCE and the long-tail methods.

Every loss here is a `MaskedLoss`: an element-wise loss `[B, K]` over the K findings, averaged
over the unmasked entries. The mask (0/1 per finding) is how two-stage transfer trains on a
subset of findings. `build_loss` makes the loss `training.loss.name` selects from the training
split's label counts; docs/training.md ("Long-tail methods") gives each method's paper, its
parameters and how it was adapted to 14 independent sigmoid outputs.

* `bce` -- the paper's "balanced class weights": BCE's `pos_weight` = negatives / positives of
  each finding in the *training* split, so a Hernia positive (0.2 %) weighs ~500x a negative
  instead of being drowned out (613 on NIH's official train_val list). Capped at
  `pos_weight_cap` so a finding with a handful of positives cannot dominate the gradient
  (conf/base: 100; conf/nih: 1000, i.e. the paper's uncapped weights -- docs/training.md,
  "Class weights", gives the measurement behind both); a capped finding is logged, and the
  report lists it. A finding with **zero** training positives gets weight 1 (there is no
  positive term to weight, and neg/0 would be infinite).
* `focal` -- Lin et al. (ICCV 2017), with the same `pos_weight`.
* `class_balanced` -- Cui et al. (CVPR 2019), effective-number weights per (finding, class).
* `asl` -- the asymmetric loss of Ridnik et al. (ICCV 2021).
* `logit_adjusted` -- Menon et al. (ICLR 2021): a per-finding prior offset on the logit, in the
  loss only (predictions use the raw logit).
* `ldam_drw` -- Cao et al. (NeurIPS 2019): per-(finding, class) margins on the logit, with
  deferred re-weighting.

Everything a loss needs is computed once from the training labels and kept in buffers; the one
piece of per-epoch state (DRW on or off) is set from the epoch's index in its stage
(`start_epoch`), so a resumed run computes the same loss as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.parameters import check
from rare_cxr.training.config import LossParams

logger = logging.getLogger(__name__)

LOSSES = ("bce", "focal", "class_balanced", "asl", "logit_adjusted", "ldam_drw")

# The keys of `training.loss` each loss reads. Only these enter the training fingerprint, so
# changing, say, `asl_gamma_neg` while `bce` is selected retrains nothing. bce and focal keep the
# four keys they were fingerprinted with before the long-tail losses existed (focal_gamma
# included, though bce ignores it), so trainings finished before then are still reused.
LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "bce": ("balanced", "pos_weight_cap", "focal_gamma"),
    "focal": ("balanced", "pos_weight_cap", "focal_gamma"),
    "class_balanced": ("cb_beta",),
    "asl": ("asl_gamma_pos", "asl_gamma_neg", "asl_clip"),
    "logit_adjusted": ("la_tau",),
    "ldam_drw": ("ldam_max_margin", "ldam_scale", "drw_beta", "drw_start_epoch"),
}


def loss_settings(loss: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `training.loss` that changes what is learned: the name and its loss's keys."""
    return {"name": loss["name"], **{k: loss[k] for k in LOSS_KEYS[loss["name"]]}}


# ------------------------------------------------------------------------ per-finding constants


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per finding of a `[N, K]` 0/1 label matrix, as float64."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum(axis=0)
    return pos, labels.shape[0] - pos


def balanced_pos_weight(labels: np.ndarray, cap: float) -> torch.Tensor:
    """Per-finding `negatives / positives` from a `[N, K]` 0/1 label matrix, capped at `cap`.

    Logs (INFO) every finding the cap lowers, with its balanced weight: the cap changes the
    paper's protocol, so it is never silent (the report's class-weight section says it too)."""
    labels = np.asarray(labels, dtype=np.float64)
    pos, neg = label_counts(labels)
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


def class_balanced_weights(
    n_pos: np.ndarray, n_neg: np.ndarray, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cui et al.'s weights for the 2K (finding, class) cells: positive and negative weight per
    finding, `(1 - beta) / (1 - beta ** n)` of the cell's count n, normalised so that the
    weights of the cells that occur sum to their number (Cui et al.: the C class weights sum to
    C). beta = 0 gives 1 everywhere (plain BCE); beta -> 1 gives 1/n (every cell then carries
    the same total weight, balanced BCE up to a global scale). A cell with no training sample
    (a finding without positives) gets 1: it never occurs in training."""
    counts = np.concatenate([np.asarray(n_pos, np.float64), np.asarray(n_neg, np.float64)])
    present = counts > 0
    alpha = np.zeros_like(counts)
    alpha[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    weights = np.ones_like(counts)
    weights[present] = alpha[present] / alpha[present].sum() * present.sum()
    k = len(counts) // 2
    return (
        torch.as_tensor(weights[:k], dtype=torch.float32),
        torch.as_tensor(weights[k:], dtype=torch.float32),
    )


def prior_log_odds(n_pos: np.ndarray, n_neg: np.ndarray) -> torch.Tensor:
    """log(pi / (1 - pi)) per finding, pi = its training prevalence; 0 for a finding with no
    positive or no negative (its log odds are infinite: there is no prior to adjust by)."""
    n_pos, n_neg = np.asarray(n_pos, np.float64), np.asarray(n_neg, np.float64)
    defined = (n_pos > 0) & (n_neg > 0)
    odds = np.zeros_like(n_pos)
    odds[defined] = np.log(n_pos[defined] / n_neg[defined])  # pi / (1 - pi) = n_pos / n_neg
    return torch.as_tensor(odds, dtype=torch.float32)


def ldam_margins(
    n_pos: np.ndarray, n_neg: np.ndarray, max_margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDAM margins C / n^(1/4) for the 2K (finding, class) cells, C set so that the largest is
    `max_margin` (as the official code); 0 for a cell with no training sample."""
    counts = np.concatenate([np.asarray(n_pos, np.float64), np.asarray(n_neg, np.float64)])
    present = counts > 0
    margins = np.zeros_like(counts)
    margins[present] = counts[present] ** -0.25
    if present.any():
        margins *= max_margin / margins.max()
    k = len(counts) // 2
    return (
        torch.as_tensor(margins[:k], dtype=torch.float32),
        torch.as_tensor(margins[k:], dtype=torch.float32),
    )


# ------------------------------------------------------------------------ the losses


class MaskedLoss(nn.Module):
    """Mean of an element-wise multi-label loss over the unmasked (image, finding) entries.

    The mask (0/1 per finding) is how two-stage transfer trains on a subset of findings: masked
    findings contribute nothing, and the mean is over the unmasked entries only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", None)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None else mask.float()

    def start_epoch(self, epoch_in_stage: int) -> None:
        """Called before every epoch (and its validation) with the epoch's 0-based index in its
        stage; only losses with a schedule (DRW) use it."""

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def constants(self) -> dict[str, list[float]]:
        """The per-finding constants computed from the training split (checkpoint metadata)."""
        return {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.elementwise(logits.float(), targets.float())
        if self.mask is not None:
            mask = self.mask.to(loss.device)
            return (loss * mask).sum() / (mask.sum() * loss.shape[0]).clamp_min(1.0)
        return loss.mean()


class MultiLabelLoss(MaskedLoss):
    """BCE-with-logits (`kind="bce"`) or focal loss (`"focal"`), per-finding `pos_weight`."""

    def __init__(
        self, pos_weight: torch.Tensor | None, kind: str = "bce", gamma: float = 2.0
    ) -> None:
        super().__init__()
        self.kind = kind
        self.gamma = float(gamma)
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pw = self.pos_weight
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(
                logits, targets, pos_weight=pw, reduction="none"
            )
        # focal loss (Lin et al.): BCE scaled by (1 - p_t)^gamma; positives x pos_weight
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = torch.exp(-bce)
        loss = (1.0 - p_t) ** self.gamma * bce
        if pw is not None:
            loss = loss * (1.0 + (pw - 1.0) * targets)
        return loss

    def constants(self) -> dict[str, list[float]]:
        return {} if self.pos_weight is None else {"pos_weight": self.pos_weight.tolist()}


class ClassBalancedLoss(MaskedLoss):
    """BCE with Cui et al.'s effective-number weights: `w_pos[k]` on finding k's positive term,
    `w_neg[k]` on its negative term (`class_balanced_weights`). Also DRW's re-weighting."""

    def __init__(self, w_pos: torch.Tensor, w_neg: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w_pos", w_pos)
        self.register_buffer("w_neg", w_neg)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return bce * (self.w_pos * targets + self.w_neg * (1.0 - targets))

    def constants(self) -> dict[str, list[float]]:
        return {"weight_positive": self.w_pos.tolist(), "weight_negative": self.w_neg.tolist()}


class AsymmetricLoss(MaskedLoss):
    """ASL (Ridnik et al., ICCV 2021), as the official `AsymmetricLoss`:

        L+ = (1 - p)^gamma_pos * log(p)
        L- = p_m^gamma_neg * log(1 - p_m),  p_m = max(p - clip, 0)
        loss = -(y L+ + (1 - y) L-)

    The focusing weights are differentiated (the official class does not detach them). The logs
    are computed from the logit (`logsigmoid`) instead of `log(clamp(p, 1e-8))`: equal where
    p > 1e-8, finite beyond. The official code sums over the batch; we average, like every loss
    here (a constant factor).
    """

    def __init__(self, gamma_pos: float, gamma_neg: float, clip: float) -> None:
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.logsigmoid(logits)
        log_not_p = F.logsigmoid(-logits)
        # (1 - p)^gamma as exp(gamma * log(1 - p)): finite gradient even where p rounds to 1
        positive = torch.exp(self.gamma_pos * log_not_p) * log_p
        if self.clip > 0:
            p_m = (torch.sigmoid(logits) - self.clip).clamp_min(0.0)
            log_not_p_m = torch.log1p(-p_m)
            # p_m^gamma with a zero-safe base: the gradient of 0^gamma (gamma < 1) is infinite,
            # and 0 * inf would give NaN where the clip sets p_m to 0
            nonzero = p_m > 0
            at_zero = 1.0 if self.gamma_neg == 0 else 0.0  # 0^0 = 1, as torch.pow
            weight = torch.where(nonzero, torch.where(nonzero, p_m, 1.0) ** self.gamma_neg, at_zero)
        else:
            log_not_p_m = log_not_p
            weight = torch.exp(self.gamma_neg * log_p)
        negative = weight * log_not_p_m
        return -(targets * positive + (1.0 - targets) * negative)


class LogitAdjustedLoss(MaskedLoss):
    """Logit-adjusted BCE (Menon et al., ICLR 2021, for K binary problems): BCE on
    `logit + tau * log(pi_k / (1 - pi_k))`. The offset exists only inside the loss: the model's
    own logit -- what validation metrics and predictions use -- is the raw one."""

    def __init__(self, log_odds: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("offset", self.tau * log_odds)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits + self.offset, targets, reduction="none")

    def constants(self) -> dict[str, list[float]]:
        return {"logit_offset": self.offset.tolist()}


class LDAMDRWLoss(MaskedLoss):
    """LDAM with deferred re-weighting (Cao et al., NeurIPS 2019), per finding as a binary
    problem: BCE on `scale * (logit - m_pos[k])` for a positive, `scale * (logit + m_neg[k])`
    for a negative (each class of each finding must clear its own margin C / n^(1/4)). From
    epoch `drw_start` of each stage on, the entries are weighted by the class-balanced weights
    (`w_pos`, `w_neg`); before it, by 1."""

    def __init__(
        self,
        m_pos: torch.Tensor,
        m_neg: torch.Tensor,
        *,
        scale: float,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        drw_start: int,
    ) -> None:
        super().__init__()
        self.scale, self.drw_start = float(scale), int(drw_start)
        self.register_buffer("m_pos", m_pos)
        self.register_buffer("m_neg", m_neg)
        self.register_buffer("w_pos", w_pos)
        self.register_buffer("w_neg", w_neg)
        self.reweighting = False

    def start_epoch(self, epoch_in_stage: int) -> None:
        self.reweighting = epoch_in_stage >= self.drw_start

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        shifted = logits - self.m_pos * targets + self.m_neg * (1.0 - targets)
        loss = F.binary_cross_entropy_with_logits(self.scale * shifted, targets, reduction="none")
        if self.reweighting:
            loss = loss * (self.w_pos * targets + self.w_neg * (1.0 - targets))
        return loss

    def constants(self) -> dict[str, list[float]]:
        return {
            "margin_positive": self.m_pos.tolist(),
            "margin_negative": self.m_neg.tolist(),
            "drw_weight_positive": self.w_pos.tolist(),
            "drw_weight_negative": self.w_neg.tolist(),
        }


def build_loss(loss: LossParams | Mapping[str, Any], train_labels: np.ndarray) -> MaskedLoss:
    """The loss `loss.name` selects, its constants computed from the training labels `[N, K]`.
    `loss` is the validated `training.loss` block (a mapping is validated first)."""
    loss = check(LossParams, loss, "training.loss")
    name = loss.name
    n_pos, n_neg = label_counts(train_labels)
    if name in ("bce", "focal"):
        pos_weight = (
            balanced_pos_weight(train_labels, loss.pos_weight_cap) if loss.balanced else None
        )
        return MultiLabelLoss(pos_weight, name, loss.focal_gamma)
    if name == "class_balanced":
        return ClassBalancedLoss(*class_balanced_weights(n_pos, n_neg, loss.cb_beta))
    if name == "asl":
        return AsymmetricLoss(loss.asl_gamma_pos, loss.asl_gamma_neg, loss.asl_clip)
    if name == "logit_adjusted":
        return LogitAdjustedLoss(prior_log_odds(n_pos, n_neg), loss.la_tau)
    if name == "ldam_drw":
        w_pos, w_neg = class_balanced_weights(n_pos, n_neg, loss.drw_beta)
        return LDAMDRWLoss(
            *ldam_margins(n_pos, n_neg, loss.ldam_max_margin),
            scale=loss.ldam_scale,
            w_pos=w_pos,
            w_neg=w_neg,
            drw_start=loss.drw_start_epoch,
        )
    raise ValueError(f"training.loss.name: unknown loss {name!r}; expected one of {LOSSES}")
