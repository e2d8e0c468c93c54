"""Experiment tracking (rare_cxr.tracking) through the real `kedro` command line.

After a tiny default `kedro run` the environment's MLflow store holds one run for the pipeline
and one nested run per model, whose metrics equal that model's metrics.json and, epoch by epoch,
its history.csv, with report.html and Table 1 as artefacts byte for byte; the documented
`mlflow ui` command serves the store; with `--params tracking.enabled=false` mlflow is not even
imported and no store is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rare_cxr.training import TrainingCallbacks
from rare_cxr.training.listeners import add_listener, remove_listener, with_listeners

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"multiscale_resnet", "resnet_single_scale"}  # the default run's ablation pair
# README.md and docs show this command, run from the project folder
MLFLOW_UI = "mlflow ui --backend-store-uri sqlite:///data/base/mlflow/mlflow.db"


def newest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert found, f"{folder}/{pattern} missing"
    return found[-1]


def leaves(value: Any, path: tuple = ()) -> dict[str, float]:
    """Every number of a JSON document by dotted path (written here, independently of the
    project's own flattening, so a renamed or dropped key fails the comparison)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in leaves(item, (*path, key)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, (*path, i)).items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {".".join(map(str, path)): float(value)}
    return {}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.slow
def test_store_holds_the_run_its_model_runs_metrics_and_artefacts(
    tiny_default_run, tmp_path
) -> None:
    from mlflow import MlflowClient

    project = tiny_default_run
    data = project.data()
    (manifest,) = (data / "runs").glob("*.json")
    run_id = json.loads(manifest.read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rare-cxr")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r is not parent}

    assert parent.info.run_name == run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["kedro.run_id"] == run_id
    assert parent.data.params["training.epochs"] == "2"
    assert parent.data.params["multiscale_resnet.model.scales"] == "[16, 32]"
    assert parent.data.params["phantom.n_patients"] == "24"
    assert set(children) == MODELS
    reports = data / "08_reporting"
    for model, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["training.epochs"] == "2"  # the protocol this model used
        assert run.data.params["model.name"] == model

        # every number of metrics.json, equal
        saved = json.loads(newest(reports, f"{model}/metrics.json/*/metrics.json").read_text())
        expected = leaves(saved)
        assert len(expected) > 100 and "test.macro.auroc" in expected
        logged = run.data.metrics
        missing = sorted(set(expected) - set(logged))
        assert not missing, missing[:10]
        wrong = [k for k, v in expected.items() if not same(v, logged[k])]
        assert not wrong, [(k, expected[k], logged[k]) for k in wrong[:10]]

        # history.csv, epoch by epoch (step = epoch)
        history = pd.read_csv(newest(reports, f"{model}/history.csv/*/history.csv"))
        assert list(history["epoch"]) == [1, 2]
        for column in ("train_loss", "val_loss", "val_macro_auroc", "lr"):
            steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, column)}
            assert sorted(steps) == [1, 2], column
            for epoch, value in zip(history["epoch"], history[column], strict=True):
                assert same(float(value), steps[int(epoch)]), (model, column, epoch)

        artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artefacts == {"metrics.json", "history.csv"}

    # report.html and Table 1, byte for byte
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "report.html",
        "table1.csv",
        "table1.md",
    }
    artefacts = Path(client.download_artifacts(parent.info.run_id, "", dst_path=str(tmp_path)))
    for name in ("report.html", "table1.csv", "table1.md"):
        assert (artefacts / name).read_bytes() == newest(reports, f"{name}/*/{name}").read_bytes()


@pytest.mark.slow
def test_a_moved_store_finds_its_artefacts_again(tiny_default_run, tmp_path) -> None:
    """A store made in one place (the Docker image's /app) opened in another (the host): MLflow
    records absolute artefact locations, so the moved store lists its runs but loses their
    artefacts until `python -m rare_cxr.tracking STORE` (also run by every `kedro run`)
    rewrites them to the store's own artifacts/ folder."""
    import shutil

    from mlflow import MlflowClient

    reports = tiny_default_run.data() / "08_reporting"
    first = tmp_path / "image" / "mlflow"  # where the store was made
    shutil.copytree(tiny_default_run.data() / "mlflow", first)
    from rare_cxr.tracking.store import relocate_store

    relocate_store(first)  # as made there: its locations point into `first`
    moved = tmp_path / "host" / "mlflow"
    moved.parent.mkdir()
    first.rename(moved)  # the place it was made is gone

    def report_artefact(store: Path) -> Path:
        client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
        (parent,) = [
            r
            for r in client.search_runs([client.get_experiment_by_name("rare-cxr").experiment_id])
            if "mlflow.parentRunId" not in r.data.tags
        ]
        return Path(client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path)))

    with pytest.raises(Exception):  # noqa: B017 - MLflow's own error for a missing folder
        report_artefact(moved)

    def relocate() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "rare_cxr.tracking", str(moved)]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    done = relocate()
    assert done.returncode == 0 and "location(s) rewritten" in done.stdout, done.stderr
    expected = newest(reports, "report.html/*/report.html").read_bytes()
    assert report_artefact(moved).read_bytes() == expected
    assert relocate().stdout.strip().endswith(": ok")  # nothing left to rewrite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_documented_mlflow_ui_serves_the_store(tiny_default_run) -> None:
    for doc in ("README.md", "docs/architecture.md"):
        assert MLFLOW_UI in (ROOT / doc).read_text(), doc
    # the NIH guide shows the same command on the nih environment's store
    guide = (ROOT / "docs" / "user-guide-nih.md").read_text()
    assert MLFLOW_UI.replace("data/base", "data/nih") in guide
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    # as documented, on a free port, with one worker instead of four (starts faster here)
    command = [str(mlflow), *MLFLOW_UI.split()[1:], "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(
        command,
        cwd=tiny_default_run.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the workers end with it
        # without mlflow's background job runner: not needed to serve runs, and it starts seven
        # more processes, each importing mlflow, on a machine whose 2 cores the suite shares
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=rare-cxr"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    body = json.loads(answer.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not answer in 180 s"
                time.sleep(0.3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:  # whatever of its group did not stop (mlflow's job consumers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
    assert body["experiment"]["name"] == "rare-cxr"
    assert body["experiment"]["artifact_location"].endswith("/data/base/mlflow/artifacts")


LAUNCH_AND_REPORT_IMPORTS = """
import sys
from kedro.framework.cli import main
sys.argv = ["kedro", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    code = done.code
print("mlflow imported:", "mlflow" in sys.modules)
sys.exit(code)
"""


@pytest.mark.slow
def test_tracking_off_imports_no_mlflow_and_writes_no_store(kedro_project) -> None:
    project = kedro_project
    project.enable_tracking()  # the user's configuration; the switch is on the command line
    project.write_local_params({"phantom.n_patients": 12, "phantom.image_size": 64})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCH_AND_REPORT_IMPORTS,
            "run",
            "--pipelines",
            "phantom",
            "--params",
            "tracking.enabled=false",
        ],
        cwd=project.path,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "mlflow imported: False" in done.stdout
    (manifest,) = project.data("runs").glob("*.json")
    assert json.loads(manifest.read_text())["status"] == "completed"
    assert not project.data("mlflow").exists()


def test_epoch_listeners_leave_callbacks_alone_unless_registered() -> None:
    own: list[tuple[int, dict]] = []
    callbacks = TrainingCallbacks(on_epoch_end=lambda epoch, row: own.append((epoch, row)))
    assert with_listeners(callbacks, "m", 0) is callbacks  # nothing registered: unchanged
    assert with_listeners(None, "m", 0) is None

    heard: list[tuple] = []

    def listener(model: str, seed: int, epoch: int, row: dict) -> None:
        heard.append((model, seed, epoch, row))
        row["train_loss"] = -1.0  # a listener cannot change what the trainer records

    add_listener(listener)
    try:
        chained = with_listeners(callbacks, "m", 7)
        row = {"epoch": 1, "train_loss": 0.5}
        chained.on_epoch_end(1, row)
    finally:
        remove_listener(listener)
    assert own == [(1, {"epoch": 1, "train_loss": 0.5})]
    assert heard == [("m", 7, 1, {"epoch": 1, "train_loss": -1.0})]
    assert row == {"epoch": 1, "train_loss": 0.5}
    assert with_listeners(callbacks, "m", 0) is callbacks


def test_an_unusable_store_stops_the_run_before_its_first_node(kedro_project, tmp_path) -> None:
    not_a_folder = tmp_path / "store"
    not_a_folder.write_text("a file where the store folder should be")
    with pytest.raises(RuntimeError, match="cannot open the MLflow store") as error:
        kedro_project.run(
            "phantom",
            params={"tracking.enabled": True, "tracking.store": str(not_a_folder)},
        )
    assert str(not_a_folder) in str(error.value)
    assert "tracking.enabled=false" in str(error.value)
    assert not list(kedro_project.data("01_raw").iterdir())  # no node ran


def test_a_logging_failure_during_the_run_is_a_warning(caplog) -> None:
    from rare_cxr.tracking.recorder import MlflowRecorder

    class FullDisk:
        def get(self, name: str) -> Any:
            raise OSError(f"no space left on device while logging {name}")

    recorder = MlflowRecorder.__new__(MlflowRecorder)  # its state, without opening a store
    recorder.catalog, recorder.parent, recorder.children = FullDisk(), "p", {"m": "c"}
    recorder._warned = set()
    with caplog.at_level("WARNING", logger="rare_cxr.tracking.recorder"):
        recorder.dataset_saved("report_html", "<html/>")
        recorder.dataset_saved("m.history", None)
        recorder.dataset_saved("m.history", None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "tracking: could not log report_html to MLflow: no space left on device while "
        "logging report_html",
        "tracking: could not log m.history to MLflow: no space left on device while "
        "logging m.history",
    ]  # once per kind, and the run goes on


class RecordingClient:
    """Stands in for MlflowClient: keeps what would be logged."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, str, float, int]] = []

    def log_batch(self, run_id: str, metrics=(), params=()) -> None:
        self.metrics += [(run_id, m.key, m.value, m.step) for m in metrics]


def test_epochs_are_logged_live_once_and_the_rest_back_filled_per_seed() -> None:
    from types import SimpleNamespace

    from rare_cxr.pipelines.training.nodes import train_model
    from rare_cxr.tracking.recorder import MlflowRecorder

    recorder = MlflowRecorder.__new__(MlflowRecorder)  # its state, without opening a store
    recorder.client, recorder.children, recorder._warned = RecordingClient(), {"m": "run-m"}, set()
    recorder._logged_epochs, recorder._listeners, recorder._seeds = {}, {}, {"m": 2}
    node = SimpleNamespace(func=train_model, namespace="m")

    recorder.node_started(node)
    # what train_model does for its first seed: the trainer calls on_epoch_end after epoch 1
    callbacks = with_listeners(None, "m", 42)
    callbacks.on_epoch_end(1, {"epoch": 1, "stage": "single", "train_loss": 0.7, "lr": 0.01})
    live = list(recorder.client.metrics)
    assert live == [("run-m", "seed42.train_loss", 0.7, 1), ("run-m", "seed42.lr", 0.01, 1)]

    # the node returns the history of both seeds: only what no listener saw is added
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 1],
            "stage": ["single"] * 3,
            "train_loss": [0.7, 0.5, 0.9],
            "lr": [0.01, 0.01, 0.01],
            "training_id": ["a", "a", "b"],
            "seed": [42, 42, 43],
        }
    )
    recorder.node_finished(node, {"m.history": history, "m.checkpoint": {}})
    assert recorder.client.metrics[len(live) :] == [
        ("run-m", "seed42.train_loss", 0.5, 2),
        ("run-m", "seed42.lr", 0.01, 2),
        ("run-m", "seed43.train_loss", 0.9, 1),
        ("run-m", "seed43.lr", 0.01, 1),
    ]
    assert with_listeners(None, "m", 42) is None  # the listener is gone with the node


def test_tracking_parameters_are_checked_with_the_key_named() -> None:
    from rare_cxr.parameters import ParameterError, check
    from rare_cxr.tracking import TrackingParams

    assert check(TrackingParams, None, "tracking").enabled is True
    with pytest.raises(ParameterError, match=r"tracking\.enabeld"):
        check(TrackingParams, {"enabeld": False}, "tracking")
    with pytest.raises(ParameterError, match=r"tracking\.enabled"):
        check(TrackingParams, {"enabled": "no"}, "tracking")
