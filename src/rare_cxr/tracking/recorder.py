"""`MlflowRecorder`: one Kedro run written to an MLflow store (see `rare_cxr.tracking`).

Only imported when tracking is on (it imports mlflow). Written on MLflow's client API
(`MlflowClient`) rather than the fluent `mlflow.start_run`: the runs of several models are open
at once (the SequentialRunner interleaves their nodes), and the fluent API keeps one active-run
stack per thread. Nesting is MLflow's own: a child run carries the tag `mlflow.parentRunId`,
exactly what `mlflow.start_run(nested=True)` sets, so `mlflow ui` shows the models under the
pipeline run.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from rare_cxr.tracking.store import ARTIFACTS, DATABASE, relocate_store
from rare_cxr.training import listeners

logger = logging.getLogger(__name__)

# Catalog entries whose saved file becomes an artefact of the pipeline run...
RUN_ARTIFACTS = ("report_html", "table1", "table1_markdown")
# ...and of each model's run (`<model>.<entry>`).
MODEL_ARTIFACTS = ("metrics", "history")
# History columns that are not metrics (the epoch is the step).
NOT_METRICS = {"epoch", "seed", "stage", "training_id"}
_BAD_KEY_CHARACTERS = re.compile(r"[^/\w.\- :]")


def store_uri(store: Path) -> str:
    """The tracking URI of the store folder: its SQLite database (MLflow 3 refuses the plain
    `mlruns/` file store unless MLFLOW_ALLOW_FILE_STORE is set)."""
    return f"sqlite:///{Path(store).resolve() / DATABASE}"


def metric_key(*parts: Any) -> str:
    """A valid MLflow metric/param name from a key path (characters MLflow refuses become `_`)."""
    key = _BAD_KEY_CHARACTERS.sub("_", ".".join(str(p) for p in parts))
    return key[:MAX_ENTITY_KEY_LENGTH]


def flatten(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(key path, value) for parameters: nested dicts by key; a list of plain values stays one
    value (`scales: [64, 128, 256]`), a list of blocks is indexed."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten(item, (*prefix, key))
    elif isinstance(value, list | tuple) and any(isinstance(v, Mapping | list) for v in value):
        for i, item in enumerate(value):
            yield from flatten(item, (*prefix, i))
    else:
        yield prefix, value


def numeric_leaves(value: Any) -> dict[str, float]:
    """Every number in a JSON-like document, by dotted key path (lists by index); booleans and
    None (an undefined metric) are left out."""
    out: dict[str, float] = {}
    for path, leaf in _all_leaves(value):
        if isinstance(leaf, int | float) and not isinstance(leaf, bool):
            out[metric_key(*path)] = float(leaf)
    return out


def _all_leaves(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(key path, leaf) for every leaf of nested dicts and lists (list items by index)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _all_leaves(item, (*prefix, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _all_leaves(item, (*prefix, i))
    else:
        yield prefix, value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowRecorder:
    """The MLflow runs of one Kedro run: the pipeline run and one nested run per model."""

    def __init__(
        self,
        store: Path,
        *,
        experiment: str,
        run_params: Mapping[str, Any],
        pipeline: Any,
        catalog: Any,
        params: Mapping[str, Any],
    ) -> None:
        store.mkdir(parents=True, exist_ok=True)
        relocate_store(store)  # a store made elsewhere (the Docker image) finds its artefacts
        self.client = MlflowClient(tracking_uri=store_uri(store))
        self.catalog = catalog
        self.run_id = str(run_params["run_id"])
        self.experiment_id = self._experiment(experiment, store / ARTIFACTS)
        self._warned: set[str] = set()
        self._logged_epochs: dict[str, set[tuple[int, int]]] = {}
        self._listeners: dict[str, Any] = {}
        self._seeds: dict[str, int] = {}

        tags = {
            "kedro.run_id": self.run_id,
            "kedro.env": str(run_params.get("env") or "local (default)"),
            "kedro.pipelines": ",".join(run_params.get("pipeline_names") or ["__default__"]),
            "kedro.command": " ".join(sys.argv)[:5000],
            "rare_cxr.manifest": f"runs/{self.run_id}.json",
        }
        self.parent = self.client.create_run(
            self.experiment_id, run_name=self.run_id, tags=tags
        ).info.run_id
        blocks = sorted(
            {
                name.removeprefix("params:").split(".")[0]
                for name in pipeline.inputs()
                if name.startswith("params:")
            }
        )
        self._log_params(self.parent, {b: params[b] for b in blocks if b in params})

        # one run per model namespace (a namespace whose parameter block has a `model:`),
        # nested under the pipeline run
        self.children: dict[str, str] = {}
        namespaces = {n.namespace.split(".")[0] for n in pipeline.nodes if n.namespace}
        for model in sorted(namespaces):
            block = params.get(model)
            if not isinstance(block, Mapping) or not isinstance(block.get("model"), Mapping):
                continue
            run = self.client.create_run(
                self.experiment_id,
                run_name=model,
                tags={**tags, MLFLOW_PARENT_RUN_ID: self.parent, "rare_cxr.model": model},
            )
            self.children[model] = run.info.run_id
            self._log_params(run.info.run_id, self._model_params(model, params))
        logger.info(
            "tracking: MLflow run %s (%d model run(s)) in %s",
            self.parent,
            len(self.children),
            store_uri(store),
        )

    # ---------------------------------------------------------------------------- set-up

    def _experiment(self, name: str, artifacts: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return self.client.create_experiment(name, artifact_location=artifacts.as_uri())
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _model_params(self, model: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The model block and the training protocol it really uses (its own overrides merged,
        as `train_model` merges them)."""
        block = params[model]
        from rare_cxr.pipelines.training.nodes import split_training_overrides

        spec, training = split_training_overrides(block["model"], params.get("training") or {})
        self._seeds[model] = int(training.get("n_seeds", 1) or 1)
        return {"model": spec, "training": training}

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        entries = []
        for path, value in flatten(params):
            text = str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                logger.warning("tracking: parameter %s truncated for MLflow", ".".join(path))
                text = text[:MAX_PARAM_VAL_LENGTH]
            entries.append(Param(metric_key(*path), text))
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    # ---------------------------------------------------------------------------- logging

    def _safely(self, what: str, action: Any, *args: Any) -> None:
        """Run a logging action; a failure is a warning (once per kind), never the run's end."""
        try:
            action(*args)
        except Exception as error:
            if what not in self._warned:
                self._warned.add(what)
                logger.warning("tracking: could not log %s to MLflow: %s", what, error)

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def _epoch_metrics(self, model: str, seed: int, epoch: int, row: Mapping[str, Any]) -> None:
        seen = self._logged_epochs.setdefault(model, set())
        if (seed, epoch) in seen or model not in self.children:
            return
        prefix = (f"seed{seed}",) if self._seeds.get(model, 1) > 1 else ()
        stamp = _now_ms()
        metrics = []
        for key, value in row.items():
            number = _number(value)
            if key in NOT_METRICS or number is None:
                continue
            metrics.append(Metric(metric_key(*prefix, key), number, stamp, epoch))
        self._log_metrics(self.children[model], metrics)
        seen.add((seed, epoch))

    def node_started(self, node: Any) -> None:
        from rare_cxr.pipelines.training.nodes import train_model

        if getattr(node, "func", None) is not train_model or not node.namespace:
            return
        model = node.namespace.split(".")[0]

        def on_epoch(_name: str, seed: int, epoch: int, row: Mapping[str, Any]) -> None:
            self._safely(
                f"{model} epoch metrics", self._epoch_metrics, model, seed, int(epoch), row
            )

        self._listeners[model] = on_epoch
        listeners.add_listener(on_epoch)

    def node_finished(self, node: Any, outputs: Mapping[str, Any]) -> None:
        model = (node.namespace or "").split(".")[0]
        listener = self._listeners.pop(model, None)
        if listener is None:
            return
        listeners.remove_listener(listener)
        # epochs no listener saw: a finished training reused, epochs trained before a resume,
        # spawned DDP workers (`training.devices: N`)
        history = outputs.get(f"{node.namespace}.history")
        if history is not None:
            self._safely("history", self._backfill, model, history)

    def _backfill(self, model: str, history: Any) -> None:
        for row in history.to_dict(orient="records"):
            seed = int(row["seed"]) if _number(row.get("seed")) is not None else 0
            self._epoch_metrics(model, seed, int(row["epoch"]), row)

    def dataset_saved(self, name: str, data: Any) -> None:
        model, _, entry = name.rpartition(".")
        if name in RUN_ARTIFACTS:
            self._safely(name, self._artifact, self.parent, name)
        elif model in self.children and entry in MODEL_ARTIFACTS:
            self._safely(name, self._artifact, self.children[model], name)
            if entry == "metrics":
                self._safely(name, self._final_metrics, self.children[model], data)

    def _final_metrics(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        stamp = _now_ms()
        self._log_metrics(
            run_id,
            [Metric(k, v, stamp, 0) for k, v in numeric_leaves(metrics).items()],
        )

    def _artifact(self, run_id: str, name: str) -> None:
        path = saved_file(self.catalog.get(name))
        self.client.log_artifact(run_id, str(path))

    def finish(self, error: BaseException | None = None) -> None:
        for listener in self._listeners.values():
            listeners.remove_listener(listener)
        self._listeners.clear()
        status = RunStatus.to_string(RunStatus.FAILED if error else RunStatus.FINISHED)
        if error is not None:
            self._safely("error", self.client.set_tag, self.parent, "error", repr(error)[:5000])
        for run_id in [*self.children.values(), self.parent]:
            self._safely("run status", self.client.set_terminated, run_id, status)


def saved_file(dataset: Any) -> Path:
    """The file a catalog dataset just wrote (the run's version of a versioned one).

    Kedro has no public accessor for a dataset's path; `_get_versioned_path` and `_filepath`
    are the ones `AbstractVersionedDataset` and kedro-datasets' file datasets use themselves.
    """
    filepath = getattr(dataset, "_filepath", None)
    if filepath is None:
        raise ValueError(f"{type(dataset).__name__} has no file path to log")
    version = dataset.resolve_save_version() if hasattr(dataset, "resolve_save_version") else None
    path = Path(str(dataset._get_versioned_path(version) if version else filepath))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: saved file not found")
    return path
