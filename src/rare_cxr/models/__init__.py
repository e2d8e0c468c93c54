"""Models: one factory for the multi-scale ResNet and every baseline.

Every model built here takes float `[B, 1, H, W]` in `[0, 1]` at the image-cache size, normalises
and resizes internally to its own scale(s), and returns logits `[B, 14]` in `FINDINGS` order, so
the training and prediction code never branch on the architecture (DESIGN: "a model is a
parameter block, not a code branch").
"""

from rare_cxr.models.factory import (
    ARCHITECTURE_NORMALISATION,
    ARCHITECTURES,
    BACKBONES,
    FUSIONS,
    MIN_INPUT,
    NORMALISATION,
    ModelSpec,
    SingleScaleNet,
    build_model,
    normalisation_for,
    validate_model_spec,
)
from rare_cxr.models.multiscale import BATCHNORM_MODES, MultiScaleResNet
from rare_cxr.models.transfer import LoadReport, load_pretrained, load_state_dict_into

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NORMALISATION",
    "BACKBONES",
    "BATCHNORM_MODES",
    "FUSIONS",
    "MIN_INPUT",
    "NORMALISATION",
    "LoadReport",
    "ModelSpec",
    "MultiScaleResNet",
    "SingleScaleNet",
    "build_model",
    "load_pretrained",
    "load_state_dict_into",
    "normalisation_for",
    "validate_model_spec",
]
