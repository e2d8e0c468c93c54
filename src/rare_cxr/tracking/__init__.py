"""Experiment tracking: every `kedro run` recorded in a local MLflow store.

What is logged (`rare_cxr.tracking.recorder.MlflowRecorder`): one MLflow run per Kedro run
(named by the run id, the version of every output), holding the parameters the pipeline reads,
report.html and Table 1; nested under it, one run per model namespace (`multiscale_resnet`,
`resnet_single_scale`, ...) holding that model's parameters (its `training` block with its own
overrides merged), one metric per history column per epoch (step = epoch), logged live while
the model trains, and every number of its metrics.json, with metrics.json and history.csv as
artefacts. The store is `tracking.store` (default `data/<env>/mlflow`: `mlflow.db`, a SQLite
database, and `artifacts/`); `mlflow ui --backend-store-uri sqlite:///data/base/mlflow/mlflow.db`
opens it.

Why a project hook and not the kedro-mlflow plugin (2.0.3, which declares Kedro >=1,<2 and ran
here with Kedro 1.7): (1) installed, it is loaded through entry points by *every* `kedro`
command, which then imports mlflow (about 3 s here) and prints an mlflow UserWarning, even with
tracking off; (2) its hook creates the store whenever a context is created (notebooks,
`kedro viz`), before this project's run lock and data-folder claim, so a store inside
`data/<env>` made the first run of a fresh folder fail the claim; (3) its only off switch is a
list of pipeline names, and it still creates the store. Here one parameter,
`tracking.enabled: false`, means mlflow is never imported and nothing is written; and the
nested run per model, live epoch metrics and metrics.json numbers need project knowledge
anyway. `settings.DISABLE_HOOKS_FOR_PLUGINS` keeps kedro-mlflow's hook off if it is installed.

Failures: the store is opened before the first node (an unusable store stops the run there,
naming it and the switch); an error while logging during the run is a warning, never the end
of a training. Only rank 0 of a torchrun launch logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from pydantic import Field

from rare_cxr.parameters import Params, check, plain
from rare_cxr.runs import distributed_rank


class TrackingParams(Params):
    """The `tracking` parameter block (conf/base/parameters_tracking.yml)."""

    enabled: bool = True
    # folder of the store (mlflow.db + artifacts/); relative paths are under the project
    store: str = Field(default="data/base/mlflow", min_length=1)
    experiment: str = Field(default="rare-cxr", min_length=1)


class TrackingHooks:
    """Drives `MlflowRecorder` around a run when `tracking.enabled` is true; inert otherwise."""

    def __init__(self) -> None:
        self._settings: TrackingParams | None = None
        self._project_path: Path | None = None
        self._params: dict[str, Any] = {}
        self._recorder: Any = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._settings = check(TrackingParams, context.params.get("tracking"), "tracking")
        self._project_path = Path(context.project_path)
        # plain dicts: Kedro hands validated blocks over as pydantic models
        self._params = {key: plain(value) for key, value in context.params.items()}

    # trylast: after RunSafetyHooks has taken the run lock and claimed the data folder, so the
    # store is only ever written by the run that owns the folder
    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._recorder = None
        settings = self._settings
        if settings is None or not settings.enabled or distributed_rank() != 0:
            return
        store = Path(settings.store)
        if not store.is_absolute():
            store = (self._project_path or Path(run_params["project_path"])) / store
        from rare_cxr.tracking.recorder import MlflowRecorder  # imports mlflow

        try:
            self._recorder = MlflowRecorder(
                store,
                experiment=settings.experiment,
                run_params=run_params,
                pipeline=pipeline,
                catalog=catalog,
                params=self._params,
            )
        except Exception as error:
            raise RuntimeError(
                f"experiment tracking: cannot open the MLflow store {store} ({error}). "
                "Fix or move it (tracking.store), or run without tracking: "
                "--params tracking.enabled=false"
            ) from error

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        if self._recorder is not None:
            self._recorder.node_started(node)

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        if self._recorder is not None:
            self._recorder.node_finished(node, outputs)

    @hook_impl
    def on_node_error(self, node: Any) -> None:
        if self._recorder is not None:
            self._recorder.node_finished(node, {})

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if self._recorder is not None:
            self._recorder.dataset_saved(dataset_name, data)

    # tryfirst: the store is finished while the run still holds the data folder's lock
    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.finish()

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error: Exception) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.finish(error)
