"""Project pipelines.

Every folder under `pipelines/` is found by `find_pipelines()` and registered under its own
name (`phantom`, `data_processing`, `augmentation`, `training`, `baselines`, `reporting`).
Two compositions are added:

* `__default__` — the demo: generate the phantom, then every stage for the multi-scale model
  and its ablation, the single-scale ResNet (same trunk, same protocol), reported side by side.
  This is what a plain `kedro run` does on a fresh clone.
* `nih` — the study on real data: every stage *except* the phantom generator (which would
  otherwise write into your download), for all six models:
  `kedro run --env nih --pipelines nih`.
* `all_models` — the same composition under a data-neutral name; `kedro run --namespaces X`
  without `--pipelines` selects model X's nodes from it (see `rare_cxr.cli`).

`reporting` alone reports the models named by the parameter `reporting.models`: `trained`
(default) = those with a checkpoint in the environment's data folder. Kedro's documented way to
build pipelines from configuration is to read it in `register_pipelines`; the environment and
its parameters come from the context of the current run (`use_context`, called by the project
hook when Kedro creates the context, before it asks for the pipelines).
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

ALL_MODELS_PIPELINE = "all_models"
# What a plain `kedro run` trains and reports: the paper's model and its ablation.
ABLATION_REFERENCE = "resnet_single_scale"
DEFAULT_MODELS = ("multiscale_resnet", ABLATION_REFERENCE)
STAGES = ("data_processing", "augmentation", "training")


# The run's data folder and reporting parameters, set by `use_context` (empty: unknown).
_ACTIVE: dict[str, Any] = {}


def use_context(context: Any) -> None:
    """Let the registry see the environment of the run being set up (see the module doc).

    Kedro caches the registered pipelines per process; they are re-registered for every new
    context, so two sessions in one process (tests, notebooks) each get their own selection.
    """
    from kedro.framework.project import PACKAGE_NAME, pipelines

    data_dir = Path(str(context.config_loader["globals"].get("data_dir", "data")))
    _ACTIVE.clear()
    _ACTIVE["data_dir"] = data_dir if data_dir.is_absolute() else context.project_path / data_dir
    _ACTIVE["reporting_models"] = (context.params.get("reporting") or {}).get("models", "trained")
    if PACKAGE_NAME:
        pipelines.configure(f"{PACKAGE_NAME}.pipeline_registry")


def reporting_models() -> list[str]:
    """The models of the stand-alone `reporting` pipeline for the current environment."""
    from rare_cxr.pipelines.reporting.pipeline import select_models

    return select_models(_ACTIVE.get("reporting_models", "trained"), _ACTIVE.get("data_dir"))


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
    # the ablation pair: the same trunk and protocol with one scale and with the pyramid
    from rare_cxr.pipelines.training.pipeline import create_model_pipeline

    pipelines["__default__"] = (
        _stage("phantom")
        + study
        + create_model_pipeline(ABLATION_REFERENCE)
        + _stage("reporting", models=list(DEFAULT_MODELS))
    )
    full = study + _stage("baselines") + _stage("reporting")
    pipelines["reporting"] = _stage("reporting", models=reporting_models())
    pipelines["nih"] = full
    pipelines[ALL_MODELS_PIPELINE] = full
    return pipelines
