"""Pipeline `baselines`: the training pipeline once per non-main model, through namespaces.

No training code here on purpose (DESIGN: "a model is a parameter block, not a code branch"):
every top-level parameter block with a `model:` key and no `role: main` is a baseline
(`rare_cxr.models.roster`; conf/<env>/parameters_baselines.yml holds the five of the study).
Each is `training.create_model_pipeline(<name>)`, reading `params:<name>.model` and the shared
`params:training`, and writing `<name>.checkpoint`, `<name>.history`, `<name>.predictions`.
`kedro run --pipelines baselines` trains them all; `kedro run --namespaces densenet121` one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kedro.pipeline import Pipeline

from rare_cxr.pipelines.training.pipeline import create_model_pipeline

if TYPE_CHECKING:
    from rare_cxr.models.roster import Roster


def create_pipeline(roster: Roster, **kwargs: object) -> Pipeline:
    """Every baseline's train/predict nodes of `roster` (read by `rare_cxr.pipeline_registry`
    from the run's parameters), one namespace each."""
    return Pipeline(
        sum((create_model_pipeline(name) for name in roster.baselines), Pipeline([])),
        tags=["baselines"],
    )
