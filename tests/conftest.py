"""Shared fixtures.

`kedro_project` copies the project's `conf/` and `pyproject.toml` into a temporary folder and runs
pipelines there through a real `KedroSession`, so tests exercise the catalog, the parameters and
the registry exactly as `kedro run` does, without touching the checkout's `data/`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("RARE_CXR_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")
).resolve()
NIH_META = SHARED_DATA / "nih14-meta"
NIH_SAMPLE = SHARED_DATA / "nih14-sample"

DATA_LAYERS = (
    "01_raw",
    "02_intermediate",
    "03_primary",
    "05_model_input",
    "06_models",
    "07_model_output",
    "08_reporting",
)

# conf/local file of every temporary project that switches experiment tracking off
TRACKING_OFF = "parameters_tracking_off.yml"

# Keep torch from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")


def shared_data_missing(reason: str) -> None:
    """Skip with the reason shown -- except under CI (`CI=true`), where ../shared is always
    beside the clone: there a missing folder is a broken path, so the test fails."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; under CI=true this is an error, not a skip")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nih_meta() -> Path:
    if not (NIH_META / "Data_Entry_2017_v2020.csv.gz").exists():
        shared_data_missing(f"real NIH metadata not found at {NIH_META} (set RARE_CXR_SHARED_DATA)")
    return NIH_META


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    if not (NIH_SAMPLE / "images").is_dir():
        shared_data_missing(
            f"real NIH image sample not found at {NIH_SAMPLE} (set RARE_CXR_SHARED_DATA)"
        )
    return NIH_SAMPLE


# `--params` that shrink a multi-model phantom run through the CLI to a tiny one (64 px films,
# a 32 px cache, one epoch, 20 bootstrap resamples); each test adds its models' scales.
TINY_PHANTOM_RUN = {
    "phantom.image_size": 64,
    "image_cache.size": 32,
    "image_cache.workers": 1,
    "augmentation_preview.scales": "[16,32]",
    "training.epochs": 1,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.progress_bar": False,
    "reporting.bootstrap.n_resamples": 20,
    "reporting.cost.batch_size": 2,
    "reporting.cost.n_batches": 1,
}


def cli_params(params: dict[str, Any]) -> str:
    """One `--params` value (`key=value,...`) from a dict of dotted keys."""
    return ",".join(f"{k}={v}" for k, v in params.items())


def latest_version(folder: Path) -> Path:
    """The newest version's file of a versioned catalog entry (`<name>/<version>/<name>`)."""
    return sorted(p for p in folder.iterdir() if p.is_dir())[-1] / folder.name


def nest_dotted(params: dict[str, Any]) -> dict[str, Any]:
    """`{"a.b": 1}` -> `{"a": {"b": 1}}`, as `kedro run --params a.b=1` does.

    KedroSession.create takes runtime params as given; only the CLI splits dotted keys, and a
    dotted key left flat silently changes nothing.
    """
    nested: dict[str, Any] = {}
    for key, value in params.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return nested


class KedroProject:
    """A temporary copy of the project that runs pipelines through KedroSession."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(
        self,
        pipeline: str | None = None,
        params: dict[str, Any] | None = None,
        env: str | None = None,
        **run_kwargs: Any,
    ) -> dict[str, Any]:
        from kedro.framework.session import KedroSession

        with KedroSession.create(
            project_path=self.path, env=env, runtime_params=nest_dotted(params or {})
        ) as session:
            return session.run(pipeline_name=pipeline, **run_kwargs)

    def catalog(self, params: dict[str, Any] | None = None, env: str | None = None):
        from kedro.framework.session import KedroSession

        with KedroSession.create(
            project_path=self.path, env=env, runtime_params=nest_dotted(params or {})
        ) as session:
            return session.load_context().catalog

    def data(self, *parts: str, env: str = "base") -> Path:
        """A path in the environment's data folder (`data/base`, `data/nih`)."""
        return self.path.joinpath("data", env, *parts)

    def enable_tracking(self) -> None:
        """MLflow tracking as a user gets it (conf/base), instead of the tests' default off."""
        for env in ("local", "nih", "longtail", "phantom_study"):
            (self.path / "conf" / env / TRACKING_OFF).unlink()

    def write_local_params(self, params: dict[str, Any]) -> None:
        """Overrides in conf/local, which soft-merges over conf/base like `--params` does."""
        import yaml

        (self.path / "conf" / "local" / "parameters.yml").write_text(
            yaml.safe_dump(nest_dotted(params))
        )

    def cli(
        self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run the real `kedro` command line in this project (what users type)."""
        done = subprocess.run(
            [str(Path(sys.executable).with_name("kedro")), *args],
            cwd=self.path,
            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "400", **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        return done


def make_project(project: Path) -> KedroProject:
    """A copy of the project's conf + pyproject at `project` (empty data folders)."""
    project.mkdir(parents=True)
    (project / "src").mkdir()  # bootstrap_project requires the source folder to exist
    shutil.copy(PROJECT_ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copy(PROJECT_ROOT / ".telemetry", project / ".telemetry")  # the project's opt-out
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    # Experiment tracking off (for the default run and --env nih): MLflow costs ~2-4 s to import
    # and ~7 s to create a store, in every temporary project of every test.
    # tests/test_tracking.py turns it on (`enable_tracking`).
    for env in ("local", "nih", "longtail", "phantom_study"):
        (project / "conf" / env / TRACKING_OFF).write_text("tracking:\n  enabled: false\n")
    for env in ("base", "nih"):  # each environment's data folder, with Kedro's layer folders
        for layer in DATA_LAYERS:
            (project / "data" / env / layer).mkdir(parents=True)
    return KedroProject(project)


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KedroProject:
    from kedro.framework.startup import bootstrap_project

    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project.path)
    bootstrap_project(project.path)
    return project


# The smallest complete default run: phantom -> every stage -> reporting of the ablation pair.
TINY_DEFAULT_RUN: dict[str, Any] = {
    "phantom.n_patients": 24,
    "phantom.image_size": 64,
    "image_cache.size": 64,  # every model block's scales must fit, baselines' [64] included
    "image_cache.workers": 1,
    "augmentation_preview.scales": [16, 32],
    "multiscale_resnet.model.scales": [16, 32],
    "resnet_single_scale.model.scales": [32],
    "training.epochs": 2,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.progress_bar": False,
    "reporting.bootstrap.n_resamples": 20,
    "reporting.cost.batch_size": 2,
    "reporting.cost.n_batches": 1,
}


@pytest.fixture(scope="session")
def tiny_default_run(tmp_path_factory: pytest.TempPathFactory) -> KedroProject:
    """A project after one tiny `kedro run` (the real command line, default pipeline, experiment
    tracking on as a user has it), shared read-only by the tests that look at a finished run's
    outputs: the MLflow store (test_tracking.py) and the notebook (test_notebook.py)."""
    project = make_project(tmp_path_factory.mktemp("tiny_default_run") / "project")
    project.enable_tracking()
    project.write_local_params(TINY_DEFAULT_RUN)
    project.cli("run")
    return project
