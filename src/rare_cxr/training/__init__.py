"""The one training loop every model uses (multi-scale ResNet and baselines alike).

`engine.fit` is the loop; `config.validate_training_params` checks `params:training` before any
work; `losses`, `schedule`, `metrics`, `checkpointing` and `distributed` are its parts.
"""

from typing import Any

from rare_cxr.training.config import validate_training_params

_ENGINE = ("FitResult", "TrainingCallbacks", "fit", "predict_probabilities")


def __getattr__(name: str) -> Any:
    # The engine is imported on first use, not with the package: `rare_cxr.models` reads
    # `training.config` (a model's `training:` overrides), and the engine reads `rare_cxr.models`,
    # so an eager import here would make `import rare_cxr.models` circular.
    if name in _ENGINE:
        from rare_cxr.training import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FitResult",
    "TrainingCallbacks",
    "fit",
    "predict_probabilities",
    "validate_training_params",
]
