"""Decoupling: classifier re-training (cRT, Kang et al., ICLR 2020) after the main training.

Kang et al. train the representation with plain instance-balanced sampling, then freeze it and
re-train only the classifier -- re-initialised -- with class-balanced sampling. Here that is the
last stage of the same training (`training.crt.epochs` > 0, the engine's stage `crt`): the trunk
is frozen exactly as in a frozen-trunk epoch (eval mode, no gradients, learning rate 0), the
head is re-initialised from the seed, and the epoch's images are drawn by `class_aware_weights`.
The loss of the cRT stage is plain, unweighted BCE (Kang et al. use plain cross-entropy: the
sampler does the balancing, a re-weighted loss on top would count the imbalance twice).

What the stage changes about fingerprints and reuse is in the engine (`_main_training`,
`_finished_main`): the main stages do not depend on the cRT settings, so a finished main
training is kept under the fingerprint of the same configuration without cRT, and a cRT run
whose main training already finished starts at the cRT stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

CRT_STAGE = "crt"

if TYPE_CHECKING:
    from rare_cxr.training.config import TrainingParams


def class_aware_weights(labels: np.ndarray) -> np.ndarray:
    """Each image's probability of being drawn, `[N]`, summing to 1: multi-label class-aware
    sampling (Shen et al., ECCV 2016), the sampler Kang et al. call class-balanced.

    Kang et al. draw a class uniformly, then an image of that class uniformly. With several
    labels per image, "an image of class k" is an image positive for finding k, and images
    without any finding form one more class ("No Finding", 54 % of NIH: without it the head
    would never see a healthy film). An image's probability is then exactly

        p_i = (1 / C) * (sum over its findings k of 1 / n_k   [or 1 / n_none if it has none])

    with C the number of classes that have an image. Every finding is the drawn class equally
    often; images with several findings are drawn once per finding's draw (a common finding
    co-occurring with a rare one rides along, which Wu et al., ECCV 2020, point out). We keep
    the two-step procedure's exact marginal rather than an ad-hoc mean over findings, so the
    sampler is Kang et al.'s on single-label data.
    """
    labels = np.asarray(labels, dtype=np.float64)
    n = labels.sum(axis=0)
    none = labels.sum(axis=1) == 0
    n_none = float(none.sum())
    classes = int((n > 0).sum()) + int(n_none > 0)
    weights = (labels / np.maximum(n, 1.0)).sum(axis=1) + none / max(n_none, 1.0)
    return weights / max(classes, 1)


def reinit_head(model: nn.Module, seed: int) -> None:
    """Re-initialise every layer of `model.head()` with its own default initialisation, from a
    generator seeded by `seed`; the global RNG streams are left as they were (the epochs'
    draws, and so resume, do not depend on whether the head was re-initialised)."""
    device = next(model.head().parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.head().modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def main_training_config(cfg: TrainingParams) -> TrainingParams:
    """The configuration of the main training alone: the same, with cRT off."""
    return cfg.model_copy(update={"crt": cfg.crt.model_copy(update={"epochs": 0})})
