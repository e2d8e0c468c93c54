"""The one training loop every model uses (multi-scale ResNet and baselines alike).

`engine.fit` is the loop; `config.validate_training_params` checks `params:training` before any
work; `losses`, `schedule`, `metrics`, `checkpointing` and `distributed` are its parts.
"""

from rare_cxr.training.config import validate_training_params
from rare_cxr.training.engine import FitResult, TrainingCallbacks, fit, predict_probabilities

__all__ = [
    "FitResult",
    "TrainingCallbacks",
    "fit",
    "predict_probabilities",
    "validate_training_params",
]
