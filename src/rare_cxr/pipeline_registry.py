"""Project pipelines, built from the parameters.

The models are not listed in code: every top-level parameter block whose `model:` key is a
spec is a model (`rare_cxr.models.roster`), with a role (`main`: the study's model; `baseline`: the
others) and a paired-comparison `reference`. Every folder under `pipelines/` is registered
under its own name (`phantom`, `data_processing`, `augmentation`, `training` = the main model,
`baselines` = every other model, `reporting`, `inference`, `onnx_export`); this module reads the
configuration and gives each `create_pipeline` what it needs (the roster, the models to report,
the bundle). Compositions:

* `__default__` — the demo: generate the phantom, then every stage for the main model and its
  reference (the multi-scale model and its ablation, the single-scale ResNet: same trunk, same
  protocol), reported side by side. This is what a plain `kedro run` does on a fresh clone.
* `nih` — the study on real data: every stage *except* the phantom generator (which would
  otherwise write into your download), for every configured model:
  `kedro run --env nih --pipelines nih`.
* `all_models` — the same composition under a data-neutral name; `kedro run --namespaces X`
  without `--pipelines` selects model X's nodes from it (see `rare_cxr.cli`).
* `inference` and `onnx_export` — on demand only, in no composition: predict a folder of new
  images with a model bundle, or export it to ONNX; the bundle is `inference.model`'s or the
  file named by `--params bundle=...` (docs/inference.md).

`reporting` alone reports the models named by the parameter `reporting.models`: `trained`
(default) = those with a checkpoint in the environment's data folder. Kedro's documented way to
build pipelines from configuration is to read it in `register_pipelines`; the environment and
its parameters come from the context of the current run (`use_context`, called by the project
hook when Kedro creates the context, before it asks for the pipelines). Without a context
(`register_pipelines()` called directly), the project's default environment is read.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedro.pipeline import Pipeline

if TYPE_CHECKING:
    from rare_cxr.models.roster import Roster

ALL_MODELS_PIPELINE = "all_models"
STAGES = ("data_processing", "augmentation", "training")


# The run's data folder and raw parameters, set by `use_context` (empty: no context yet).
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
    # the raw parameters (with --params), not `context.params`: reading that makes Kedro build
    # its typed parameter models for every pipeline, i.e. call this registry, which needs these
    params = _ACTIVE["parameters"] = context.config_loader["parameters"]
    _ACTIVE["inference"] = dict(params.get("inference") or {})
    if PACKAGE_NAME:
        pipelines.configure(f"{PACKAGE_NAME}.pipeline_registry")


def forget_context() -> None:
    """Drop what `use_context` recorded (its parameters were refused)."""
    _ACTIVE.clear()


def project_parameters(
    project_path: str | Path | None = None, env: str | None = None
) -> dict[str, Any]:
    """A project's raw parameters for `env` (None: `KEDRO_ENV`, else `local` over `base`), read
    by Kedro's own config loader with the project's settings, as `kedro run --env` does.
    Default project: the one around the working directory, else this checkout."""
    import os

    from kedro.framework.project import PACKAGE_NAME, settings
    from kedro.utils import find_kedro_project

    if not PACKAGE_NAME:  # no project configured yet (a plain import): this project's settings
        from rare_cxr import config_loader as settings
    project = Path(
        project_path or find_kedro_project(Path.cwd()) or Path(__file__).resolve().parents[2]
    )
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(project / getattr(settings, "CONF_SOURCE", "conf")),
        env=env or os.environ.get("KEDRO_ENV"),
        **settings.CONFIG_LOADER_ARGS,
    )
    return loader["parameters"]


def current_parameters() -> dict[str, Any]:
    """The raw parameters of the run being set up (or of the default environment)."""
    if "parameters" not in _ACTIVE:
        _ACTIVE["parameters"] = project_parameters()
    return _ACTIVE["parameters"]


def current_roster() -> Roster:
    """The configured models and their roles (`rare_cxr.models.roster`)."""
    if "roster" not in _ACTIVE:
        from rare_cxr.models.roster import roster_from_parameters

        _ACTIVE["roster"] = roster_from_parameters(current_parameters())
    return _ACTIVE["roster"]


def reporting_models() -> list[str]:
    """The models of the stand-alone `reporting` pipeline for the current environment."""
    from rare_cxr.pipelines.reporting.pipeline import select_models

    setting = (current_parameters().get("reporting") or {}).get("models", "trained")
    return select_models(setting, _ACTIVE.get("data_dir"), current_roster())


def inference_bundle_choice() -> dict[str, Any]:
    """Which bundle `inference`/`onnx_export` read: `inference.model`'s, or the file named by
    `--params bundle=...` (see rare_cxr.pipelines.inference.pipeline)."""
    chosen = _ACTIVE.get("inference") or {}
    return {"model": chosen.get("model"), "external_bundle": bool(chosen.get("bundle"))}


def _stage(name: str, **kwargs: object) -> Pipeline:
    return importlib.import_module(f"rare_cxr.pipelines.{name}").create_pipeline(**kwargs)


# The pipeline folders that need no configuration to be built (Kedro's `create_pipeline()`).
PLAIN_PIPELINES = ("phantom", "data_processing", "augmentation")


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline, built from the run's parameters: this registry is the one place that reads
    the configuration (the roster of models, `reporting.models`, the inference bundle) and hands
    it to the pipelines' `create_pipeline(...)`, which never look it up themselves.

    Why not `find_pipelines()`: the pipelines of the models take the roster as an argument, which
    a no-argument discovery cannot give, and Kedro 1.7's lazy loading makes `find_pipelines()`
    return only the folders named on the command line -- none for a composition such as `nih`.
    """
    roster = current_roster()
    pipelines = {name: _stage(name) for name in PLAIN_PIPELINES}
    pipelines["training"] = _stage("training", roster=roster)
    pipelines["baselines"] = _stage("baselines", roster=roster)
    pipelines["reporting"] = _stage("reporting", roster=roster, models=reporting_models())
    # the demo: the main model and its reference (the ablation pair: the same trunk and
    # protocol with one scale and with the pyramid)
    from rare_cxr.pipelines.training.pipeline import create_model_pipeline

    study = sum((pipelines[name] for name in STAGES), Pipeline([]))  # `training`: the main model
    pipelines["__default__"] = (
        pipelines["phantom"]
        + study
        + sum(
            (create_model_pipeline(m) for m in roster.default_models if m != roster.main),
            Pipeline([]),
        )
        + _stage("reporting", roster=roster, models=roster.default_models)
    )
    full = study + pipelines["baselines"] + _stage("reporting", roster=roster)
    pipelines["nih"] = full
    pipelines[ALL_MODELS_PIPELINE] = full
    # on demand only, in no composition: new images through a model bundle, and its ONNX export
    from rare_cxr.pipelines.inference import create_onnx_pipeline

    pipelines["inference"] = _stage("inference", **inference_bundle_choice())
    pipelines["onnx_export"] = create_onnx_pipeline(**inference_bundle_choice())
    return pipelines
