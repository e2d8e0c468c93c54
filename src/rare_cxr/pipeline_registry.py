"""Project pipelines.

Every folder under `pipelines/` is found by `find_pipelines()` and registered under its own
name (`phantom`, `data_processing`, `augmentation`, `training`, `baselines`, `reporting`).
Two compositions are added:

* `__default__` — the demo: generate the phantom, then every stage for the multi-scale model,
  including its report. This is what a plain `kedro run` does on a fresh clone.
* `nih` — the study on real data: every stage *except* the phantom generator (which would
  otherwise write into your download), for all six models. Use `kedro run --env nih --pipeline nih`.
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines()
    stages = ["data_processing", "augmentation", "training"]
    study = sum((pipelines[name] for name in stages if name in pipelines), Pipeline([]))

    default = pipelines.get("phantom", Pipeline([])) + study
    if "reporting" in pipelines:
        from rare_cxr.pipelines.reporting import create_pipeline as create_reporting

        default += create_reporting(models=["multiscale_resnet"])
    pipelines["__default__"] = default

    full = (
        study + pipelines.get("baselines", Pipeline([])) + pipelines.get("reporting", Pipeline([]))
    )
    pipelines["nih"] = full
    return pipelines
