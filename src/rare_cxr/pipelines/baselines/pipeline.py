"""Pipeline `baselines`: the training pipeline once per non-main model, through namespaces.

No training code here on purpose (DESIGN: "a model is a parameter block, not a code branch"):
every top-level parameter block with a `model:` key and no `role: main` is a baseline
(`rare_cxr.models.roster`; conf/<env>/parameters_baselines.yml holds the five of the study).
Each is `training.create_model_pipeline(<name>)`, reading `params:<name>.model` and the shared
`params:training`, and writing `<name>.checkpoint`, `<name>.history`, `<name>.predictions`.
`kedro run --pipelines baselines` trains them all; `kedro run --namespaces densenet121` one.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from rare_cxr.pipelines.training.pipeline import create_model_pipeline


def create_pipeline(**kwargs: object) -> Pipeline:
    """Every baseline's train/predict nodes, one namespace each."""
    from rare_cxr.pipeline_registry import current_roster

    return Pipeline(
        sum((create_model_pipeline(name) for name in current_roster().baselines), Pipeline([])),
        tags=["baselines"],
    )
