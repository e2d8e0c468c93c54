"""Project hooks: keep torch polite on small machines, and keep every run safe and traceable.

`RunSafetyHooks` is where the data-safety rules of docs/architecture.md are enforced for every
run, however it is started (`kedro run`, `python -m rare_cxr`, a `KedroSession` in a notebook):

* the environment's data folder (`data_dir`) is claimed for that environment, and a run that
  resolves to another environment's folder stops (`rare_cxr.ownership`);
* one run at a time per data folder (`rare_cxr.runs.RunLock`; the CLI takes it even earlier);
* temporaries left by an interrupted write of a dead process are removed;
* the run's manifest `<data_dir>/runs/<run id>.json` records the command, parameters, and every
  dataset loaded (with its version) and saved;
* every parameter block is validated when the context is created (`check_parameters`), so a
  typo fails in seconds with its key path, whatever pipeline is run.

Only rank 0 of a `torchrun` launch does any of this: the other ranks run the same session and
must neither wait on rank 0's lock nor write a second manifest. Before any of it, every rank of
a torchrun launch checks that the launch trains exactly one model (`refuse_unsupported_torchrun`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractVersionedDataset

from rare_cxr.atomic import sweep_leftovers
from rare_cxr.ownership import claim_data_dir, claim_linked_layers, phantom_marker
from rare_cxr.runs import RunLock, RunLocks, RunManifest, distributed_rank, later_runs, plan_locks

logger = logging.getLogger(__name__)


class ProjectHooks:
    @hook_impl
    def after_context_created(self, context) -> None:
        # torch spawns one thread per core by default; RARE_CXR_THREADS lets a shared
        # machine (CI, a laptop) cap it without editing configuration.
        threads = os.environ.get("RARE_CXR_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        logger.debug("rare-cxr context created for env %r", context.env)


TRAIN_NODE_FUNC = ("rare_cxr.pipelines.training.nodes", "train_model")


def _one_model_commands(world: str) -> str:
    launch = f"torchrun --nproc_per_node={world} -m rare_cxr"
    return (
        f"  {launch} --pipelines training   (the multi-scale model), or\n"
        f"  {launch} --pipelines baselines --namespaces densenet121   (one baseline)\n"
        "(plus your --env and --params)"
    )


def _is_train_node(node) -> bool:
    func = getattr(node, "func", None)
    return (getattr(func, "__module__", None), getattr(func, "__name__", None)) == TRAIN_NODE_FUNC


def refuse_unsupported_torchrun(pipeline) -> None:
    """Under torchrun, refuse (on every rank, before anything runs) a pipeline that is not one
    model's training, i.e. exactly one `train_model` node with every other node downstream of it.

    Why: a torchrun launch runs the whole session on every rank, and ranks other than 0 exit
    the process at the end of `train_model` so that only rank 0 writes catalog entries. A second
    `train_model` would then wait for collectives of ranks that have exited (rank 0 hangs until
    the 30-minute process-group timeout), and a node that does not depend on `train_model` could
    run on every rank before it, each rank writing its own version of the outputs.
    """
    if "WORLD_SIZE" not in os.environ:
        return
    from rare_cxr.training.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return
    world = os.environ["WORLD_SIZE"]
    trains = [n for n in pipeline.nodes if _is_train_node(n)]
    if len(trains) > 1:
        models = ", ".join(sorted(n.namespace or n.name for n in trains))
        raise RuntimeError(
            f"torchrun launch with {world} processes refused before any training: the selected "
            f"pipeline trains {len(trains)} models ({models}), but a torchrun launch trains one "
            "(ranks other than 0 exit after it, and the next model would wait for them until the "
            "process-group timeout). Launch once per model:\n"
            + _one_model_commands(world)
            + f";\nor train them all in one run without torchrun: `kedro run` with the same "
            f"--pipelines/--namespaces and --params training.devices={world} (the node then "
            "starts the processes itself, for each model)."
        )
    if not trains:
        raise RuntimeError(
            f"torchrun launch with {world} processes refused: the selected pipeline trains no "
            "model, and under torchrun every rank would run it and write its own outputs. Run "
            "it with `kedro run`; use torchrun only to train one model:\n"
            + _one_model_commands(world)
        )
    downstream = {n.name for n in pipeline.from_nodes(trains[0].name).nodes}
    others = sorted(n.name for n in pipeline.nodes if n.name not in downstream)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise RuntimeError(
            f"torchrun launch with {world} processes refused before any training: nodes that "
            f"do not depend on {trains[0].name} ({shown}) could run on every rank, each writing "
            "its own outputs. Run the other stages with `kedro run` first, then train one model "
            "per launch:\n" + _one_model_commands(world)
        )


class ConfigurationMismatchError(RuntimeError):
    """The environment's configuration does not fit the data the run would train on."""


def check_demo_configuration(
    pipeline, data_root: Path, configuration: str, allowed: bool, env: str | None
) -> None:
    """Stop a run of the CPU demo configuration that would train on data rare-cxr did not
    generate (say `kedro run --pipelines nih --params data_root=/data/nih`, `--env nih`
    forgotten): it would train resnet18 at 64+128 px without pretrained weights on the real
    download, into data/base, and look like a study. Nothing has run when this stops."""
    if configuration != "demo" or allowed or not any(_is_train_node(n) for n in pipeline.nodes):
        return
    if not data_root.is_dir() or phantom_marker(data_root) is not None:
        return  # the phantom (or a folder the phantom node is about to create)
    raise ConfigurationMismatchError(
        f"this run would train the CPU demo configuration (environment {env or 'local'!r}: "
        f"resnet18 at 64+128 px, no pretrained weights) on {data_root}, which is not a phantom "
        "rare-cxr generated. Nothing was run. For the study on a real download add "
        f"`--env nih`: kedro run --env nih --pipelines nih --params data_root={data_root}. "
        "To train the demo models on this data on purpose (a quick smoke test), add "
        "`--params allow_demo_on_real_data=true` (documented in conf/base/globals.yml)."
    )


def check_raw_data_location(data_root: Path, data_dir: Path) -> None:
    """A download left at the old default place (`data/nih/01_raw`, inside the derived-data
    folder) while `data_root` now points elsewhere: say how to move it, instead of the
    "file not found" that the first node would give."""
    if data_root.exists():
        return
    old = data_dir / "01_raw"
    tables = sorted(old.glob("Data_Entry_2017*")) if old.is_dir() else []
    if not tables or phantom_marker(old) is not None:
        return
    raise FileNotFoundError(
        f"data_root {data_root} does not exist, but {old} holds a download ({tables[0].name}). "
        "The raw data no longer lives inside the derived-data folder (where cleaning it could "
        f"reach it); move it: `mkdir -p {data_root} && mv {old}/* {data_root}/`, or point at "
        f"it with --params data_root=/path/to/nih. Nothing was run."
    )


def sweep_data_dir(data_dir: Path, data_root: Path) -> list[Path]:
    """Remove dead processes' temporaries in `data_dir`, including layer folders that are
    symbolic links to another disk (`os.walk` does not follow links), never inside data_root:
    a half-built image cache left by a full disk must not keep the next run's disk full."""
    root = data_root.resolve()
    removed = sweep_leftovers(data_dir, skip=(str(data_root),))
    if data_dir.is_dir():
        for entry in sorted(data_dir.iterdir()):
            if entry.is_symlink() and entry.is_dir():
                target = entry.resolve()
                if target != root and root not in target.parents and target not in root.parents:
                    removed += sweep_leftovers(target)
    return removed


def check_parameters(context) -> None:
    """Validate every parameter block of the context's configuration (all pipelines, all model
    namespaces) with `rare_cxr.configuration.validate_parameters`; raises ParameterError naming
    every bad key. Kedro itself validates only the typed blocks of the pipelines it runs."""
    from rare_cxr.configuration import validate_parameters
    from rare_cxr.pipeline_registry import current_parameters

    # the parameters `use_context` just read for this context (with --params)
    validate_parameters(current_parameters(), allowed=set(context.config_loader["globals"]))


class RunSafetyHooks:
    """Ownership check, lock, clean-up and manifest around every pipeline run."""

    def __init__(self) -> None:
        self._context: Any = None
        self._reset()

    def _reset(self) -> None:
        self._catalog: Any = None
        self._lock: RunLocks | None = None
        self._manifest: RunManifest | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        # first of every hook: the registry needs the parameters before anything asks for the
        # pipelines, and a bad parameter must fail here, in seconds, naming its key -- before
        # Kedro builds its typed parameters (its error is pydantic's raw dump), before any node
        from rare_cxr.pipeline_registry import forget_context, use_context

        self._context = context
        use_context(context)
        try:
            check_parameters(context)
        except Exception:
            forget_context()  # later sessions in this process must not see these parameters
            raise

    def _data_dir(self, project_path: Path) -> Path:
        configured = Path(str(self._context.config_loader["globals"].get("data_dir", "data")))
        return configured if configured.is_absolute() else project_path / configured

    def _globals(self) -> dict[str, Any]:
        return dict(self._context.config_loader["globals"]) if self._context is not None else {}

    def _data_root(self, project_path: Path, run_params: dict[str, Any]) -> Path:
        runtime = run_params.get("runtime_params") or {}
        configured = Path(str(runtime.get("data_root") or self._globals().get("data_root", "")))
        return configured if configured.is_absolute() else project_path / configured

    @hook_impl(wrapper=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog):
        """Checks, lock, claim, sweep and manifest, then every other hook's start (MLflow...).

        A hook wrapper: the other `before_pipeline_run` hooks run at the `yield`, so a failure in
        any of them (an unusable MLflow store, say) reaches this code, which marks the manifest
        failed and releases the lock. Kedro calls neither `on_pipeline_error` nor
        `after_pipeline_run` for a failure at run start.
        """
        self._start(run_params, pipeline, catalog)
        try:
            return (yield)
        except BaseException as error:
            try:
                if self._manifest is not None:
                    self._manifest.finish(error)
            finally:
                self._release()
            raise

    def _start(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._reset()
        # first, on every rank: nothing is locked, written or trained yet (the CLI's lock, taken
        # by rank 0 before the session, is released as the error leaves the `kedro run` command)
        refuse_unsupported_torchrun(pipeline)
        if distributed_rank() != 0 or self._context is None:
            return
        project_path = Path(run_params["project_path"])
        data_dir = self._data_dir(project_path)
        data_root = self._data_root(project_path, run_params)
        settings = self._globals()
        runtime = run_params.get("runtime_params") or {}
        allowed = runtime.get("allow_demo_on_real_data", settings.get("allow_demo_on_real_data"))
        check_raw_data_location(data_root, data_dir)
        check_demo_configuration(
            pipeline,
            data_root,
            str(settings.get("configuration", "study")),
            str(allowed).strip().lower() in ("true", "1", "yes"),
            run_params.get("env"),
        )
        run_id = str(run_params["run_id"])
        if RunLock.held(data_dir) is None:
            # started without the project CLI (KedroSession, notebook): lock now, and refuse if
            # a run that started later wrote what this run reads or writes first (its newer
            # versions would be loaded as "latest" by this run's nodes)
            from rare_cxr.pipeline_registry import current_roster

            lock = RunLocks(data_dir, plan_locks(pipeline, current_roster().models))
            lock.acquire()
            touched = {n for node in pipeline.nodes for n in (*node.inputs, *node.outputs)}
            newer = later_runs(data_dir, run_id, None if lock.plan.exclusive else touched)
            if newer:
                lock.release()
                raise RuntimeError(
                    f"run {run_id} waited for {data_dir} while run {newer[-1]}, started later, "
                    "used it; this run's outputs would be older than what it loads. Nothing was "
                    "run: start it again."
                )
            self._lock = lock
        try:
            claim_data_dir(data_dir, run_params.get("env"))
            claim_linked_layers(data_dir, run_params.get("env"))
            sweep_data_dir(data_dir, data_root)
            self._manifest = RunManifest(data_dir, run_params)
            self._manifest.write()
        except BaseException:
            self._release()
            raise
        self._catalog = catalog
        logger.info("run %s: outputs in %s (manifest %s)", run_id, data_dir, self._manifest.path)

    def _version(self, dataset_name: str, kind: str) -> str | None:
        if self._catalog is None:
            return None
        try:
            dataset = self._catalog.get(dataset_name)
        except Exception:  # a dataset the catalog cannot describe is recorded unversioned
            return None
        if not isinstance(dataset, AbstractVersionedDataset):
            return None
        try:
            return (
                dataset.resolve_load_version()
                if kind == "loaded"
                else dataset.resolve_save_version()
            )
        except Exception:
            return None

    def _record(self, kind: str, dataset_name: str) -> None:
        if self._manifest is None or dataset_name.startswith(("params:", "parameters")):
            return
        self._manifest.dataset(kind, dataset_name, self._version(dataset_name, kind))

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str) -> None:
        self._record("loaded", dataset_name)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        self._record("saved", dataset_name)

    @hook_impl
    def after_node_run(self) -> None:
        if self._manifest is not None:
            self._manifest.write()  # a killed run's manifest still lists what it did

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
        self._reset()

    @hook_impl
    def after_pipeline_run(self) -> None:
        try:
            if self._manifest is not None:
                self._manifest.finish()
        finally:
            self._release()

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        try:
            if self._manifest is not None:
                self._manifest.finish(error)
        finally:
            self._release()
