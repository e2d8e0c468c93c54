"""Project pipelines.

Every folder under `pipelines/` is found by `find_pipelines()` and registered under its own
name (`phantom`, `data_processing`, `augmentation`, `training`, `baselines`, `reporting`).
Two compositions are added:

* `__default__` — the demo: generate the phantom, then every stage for the multi-scale model,
  including its report. This is what a plain `kedro run` does on a fresh clone.
* `nih` — the study on real data: every stage *except* the phantom generator (which would
  otherwise write into your download), for all six models:
  `kedro run --env nih --pipelines nih`.
* `all_models` — the same composition under a data-neutral name; `kedro run --namespaces X`
  without `--pipelines` selects model X's nodes from it (see `rare_cxr.cli`).
"""

from __future__ import annotations

import importlib
import warnings

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

ALL_MODELS_PIPELINE = "all_models"
STAGES = ("data_processing", "augmentation", "training")


def _stage(name: str, **kwargs: object) -> Pipeline:
    return importlib.import_module(f"rare_cxr.pipelines.{name}").create_pipeline(**kwargs)


def register_pipelines() -> dict[str, Pipeline]:
    # Kedro 1.7 loads pipelines lazily: under `kedro run --pipelines nih`, find_pipelines()
    # returns only the *folders* named on the command line -- none, for a composition. So the
    # compositions are built from the pipeline modules directly, never from find_pipelines()'s
    # (possibly partial) result; otherwise `--pipelines nih` would silently be empty.
    with warnings.catch_warnings():
        # ...and warns that "module rare_cxr.pipelines.nih" failed to import: not an error here
        for name in ("nih", ALL_MODELS_PIPELINE):
            warnings.filterwarnings("ignore", message=rf".*'rare_cxr\.pipelines\.{name}' module")
        pipelines = find_pipelines()
    study = sum((_stage(name) for name in STAGES), Pipeline([]))
    pipelines["__default__"] = (
        _stage("phantom") + study + _stage("reporting", models=["multiscale_resnet"])
    )
    full = study + _stage("baselines") + _stage("reporting")
    pipelines["nih"] = full
    pipelines[ALL_MODELS_PIPELINE] = full
    return pipelines
