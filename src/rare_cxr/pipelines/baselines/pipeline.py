"""Pipeline `baselines`: the training pipeline once per baseline model, through namespaces.

No training code here on purpose (DESIGN: "a model is a parameter block, not a code branch"):
each baseline is `training.create_model_pipeline(<name>)`, reading `params:<name>.model`
(conf/base/parameters_baselines.yml) and the shared `params:training`, and writing
`<name>.checkpoint`, `<name>.history`, `<name>.predictions`.
`kedro run --pipelines baselines` trains all five; `kedro run --namespaces densenet121` one.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from rare_cxr.pipelines.training.pipeline import create_model_pipeline

BASELINES: tuple[str, ...] = (
    "resnet_single_scale",
    "vgg16",
    "inception_v3",
    "densenet121",
    "efficientnet_b0",
)


def create_pipeline(**kwargs: object) -> Pipeline:
    """The five baselines' train/predict nodes, one namespace each."""
    return Pipeline(
        sum((create_model_pipeline(name) for name in BASELINES), Pipeline([])),
        tags=["baselines"],
    )
