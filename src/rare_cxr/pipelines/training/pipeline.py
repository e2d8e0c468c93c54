"""Pipeline `training`: one base pipeline, instantiated per model through a Kedro namespace.

`create_model_pipeline("densenet121")` gives nodes `densenet121.train_model` and
`densenet121.predict`, reading the shared `image_cache`, `augmentation_policy` and
`params:training`, the model's own `params:densenet121.model` and `densenet121.training_state`
(resume / reuse folder), and writing
`densenet121.checkpoint`, `.history` and `.predictions` (dataset factories in
`conf/base/catalog_training.yml`). The `baselines` pipeline is this function called per model;
which models exist comes from the parameters (`rare_cxr.models.roster`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kedro.pipeline import Node, Pipeline

from rare_cxr.pipelines.training.nodes import predict, train_model

if TYPE_CHECKING:
    from rare_cxr.models.roster import Roster

SHARED_INPUTS = {"image_cache", "augmentation_policy"}


def _base() -> Pipeline:
    return Pipeline(
        [
            Node(
                train_model,
                inputs=[
                    "image_cache",
                    "augmentation_policy",
                    "params:model",
                    "params:training",
                    "training_state",
                ],
                outputs=["checkpoint", "history"],
                name="train_model",
                tags=["training"],
            ),
            Node(
                predict,
                inputs=["checkpoint", "image_cache", "params:training"],
                outputs="predictions",
                name="predict",
                tags=["training", "prediction"],
            ),
        ]
    )


def create_model_pipeline(model_name: str) -> Pipeline:
    """The training pipeline for one model (namespace = model name = parameter block)."""
    return Pipeline(
        _base(),
        namespace=model_name,
        inputs=SHARED_INPUTS,
        parameters={
            "params:training": "params:training",
            "params:model": f"params:{model_name}.model",
        },
    )


def create_pipeline(roster: Roster, **kwargs: object) -> Pipeline:
    """Pipeline `training`: the main model (the model block with `role: main`) of `roster`,
    which `rare_cxr.pipeline_registry` reads from the run's parameters."""
    return create_model_pipeline(roster.main)
