"""Several `kedro run`s on one environment at once (docs/user-guide-nih.md, "Several GPUs").

Runs that train different models hold only their model's lock (and the data folder's, shared),
so they proceed side by side -- one per GPU, or one per task of a SLURM job array -- and give
exactly what two consecutive runs give. Two runs of one model, and a run that rewrites the
shared stages, still wait. The documented SLURM script is what runs here (on CPU, two tasks),
and the documented multi-node torchrun launch runs with two "nodes" over localhost (gloo).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEDRO = str(Path(sys.executable).with_name("kedro"))
TINY: dict[str, Any] = {
    "phantom.n_patients": 40,
    "phantom.image_size": 64,
    "image_cache.size": 32,
    "image_cache.workers": 1,
    "augmentation_preview.scales": [16, 32],
    "multiscale_resnet.model.scales": [16, 32],
    "resnet_single_scale.model.scales": [32],
    "training.epochs": 3,
    "training.patience": 3,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.deterministic": True,
    "training.loader_threads": 0,
    "training.progress_bar": False,
}
ENV = {
    "KEDRO_DISABLE_TELEMETRY": "1",
    "COLUMNS": "400",
    "RARE_CXR_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
MODELS = ("multiscale_resnet", "resnet_single_scale")


def _start(project, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        list(args),
        cwd=project.path,
        env={**os.environ, **ENV, **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _slurm_task(project, task: int) -> subprocess.Popen:
    """The documented job-array script, as SLURM would start task `task` of it."""
    return _start(
        project,
        "bash",
        str(ROOT / "scripts" / "slurm-train-array.sh"),
        extra_env={
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_SUBMIT_DIR": str(project.path),
            "RARE_CXR_ENV": "",  # the default environment (conf/local holds the tiny settings)
            "RARE_CXR_MODELS": " ".join(MODELS),
            "RARE_CXR_KEDRO": KEDRO,
            "RARE_CXR_PARAMS": "training.reuse_finished=false",
        },
    )


def _documented_launcher(n_models: int) -> str:
    """The guide's one-line launcher for N GPUs, for `n_models` models (and tiny settings)."""
    guide = (ROOT / "docs" / "user-guide-nih.md").read_text()
    (line,) = [x for x in guide.splitlines() if x.startswith("export RARE_CXR_PARAMS=")]
    assert "for i in 0 1 2 3 4 5;" in line and "data_root=/data/nih" in line
    line = line.replace("0 1 2 3 4 5", " ".join(map(str, range(n_models))))
    return line.replace("data_root=/data/nih", "training.reuse_finished=false")


def _finish(process: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-5000:]
    return out


def _manifests(project) -> list[dict[str, Any]]:
    folder = project.data("runs")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _latest_weights(project, model: str) -> dict[str, torch.Tensor]:
    folder = project.data("06_models", model, "checkpoint.pt")
    return torch.load(sorted(folder.iterdir())[-1] / "checkpoint.pt", weights_only=True)[
        "state_dict"
    ]


def _wait_for_running(project, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while sum(m["status"] == "running" for m in _manifests(project)) < count:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)


def test_two_models_train_side_by_side_and_match_consecutive_runs(kedro_project):
    project = kedro_project
    project.write_local_params(TINY)
    project.cli("run", "--pipelines", "phantom,data_processing,augmentation", env=ENV)
    for task in range(len(MODELS)):  # consecutive: the reference
        _finish(_slurm_task(project, task))
    reference = {m: _latest_weights(project, m) for m in MODELS}
    before = len(_manifests(project))

    # side by side: the guide's launcher line, one process per model (and GPU)
    (project.path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "slurm-train-array.sh", project.path / "scripts")
    launcher = _start(
        project,
        "bash",
        "-c",
        _documented_launcher(len(MODELS)),
        extra_env={
            "RARE_CXR_ENV": "",
            "RARE_CXR_MODELS": " ".join(MODELS),
            "RARE_CXR_KEDRO": KEDRO,
        },
    )
    _finish(launcher)
    logs = [(project.path / f"train-{i}.log").read_text() for i in range(len(MODELS))]
    for model, log in zip(MODELS, logs, strict=True):
        assert f"training {model}" in log and f"{model} epoch 1 " in log
        assert "another kedro run is using" not in log, log[-3000:]  # nobody waited
    runs = _manifests(project)[before:]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    starts = [datetime.fromisoformat(r["started"]) for r in runs]
    ends = [datetime.fromisoformat(r["finished"]) for r in runs]
    assert max(starts) < min(ends), "the two trainings did not overlap in time"
    for model in MODELS:  # bit for bit what the consecutive runs gave (deterministic mode)
        got = _latest_weights(project, model)
        for key, value in reference[model].items():
            assert torch.equal(got[key], value), f"{model}.{key}"
    # each run saved only its own model's outputs
    saved_by_run = [{name.split(".")[0] for name in run["saved"]} for run in runs]
    assert sorted(map(sorted, saved_by_run)) == [[m] for m in sorted(MODELS)]

    # reporting after the array job: both models, nothing to wait for
    done = project.cli("run", "--pipelines", "reporting", env=ENV)
    assert "another kedro run is using" not in done.stdout + done.stderr


def test_same_model_and_shared_stages_still_wait(kedro_project):
    project = kedro_project
    project.write_local_params({**TINY, "training.epochs": 6, "training.patience": 6})
    project.cli("run", "--pipelines", "phantom,data_processing,augmentation", env=ENV)
    train = (KEDRO, "run", "--pipelines", "training", "--params", "training.reuse_finished=false")

    first = _start(project, *train)
    _wait_for_running(project, 1)
    same_model = _start(project, *train)
    stages = _start(project, KEDRO, "run", "--pipelines", "augmentation")
    other_model = _start(
        project, KEDRO, "run", "--pipelines", "baselines", "--namespaces", "resnet_single_scale"
    )
    runs_started = {"first": first, "same": same_model, "stages": stages, "other": other_model}
    logs = {name: _finish(process) for name, process in runs_started.items()}
    assert "another kedro run is using" in logs["same"]
    assert "for multiscale_resnet" in logs["same"]  # it waited for that model's lock
    assert "another kedro run is using" in logs["stages"]  # the shared stages wait for trainers
    runs = {r["run_id"]: r for r in _manifests(project)}
    # the same-model run drew its id after the first ended: its outputs are the newer ones
    by_pid = {r["pid"]: r for r in runs.values()}
    first_run, second_run = by_pid[first.pid], by_pid[same_model.pid]
    assert second_run["run_id"] > first_run["run_id"]
    assert datetime.fromisoformat(second_run["started"]) >= datetime.fromisoformat(
        first_run["finished"]
    )
    assert all(r["status"] == "completed" for r in runs.values())


def test_one_model_ddp_over_two_nodes_with_c10d_rendezvous(kedro_project):
    """The documented multi-node launch, two agents on one machine as two "nodes" sharing the
    project folder, gloo on CPU: rank 0 alone writes one version; the model saw 2 processes."""
    from rare_cxr.training.distributed import free_port

    project = kedro_project
    one_epoch = {"training.epochs": 1, "training.deterministic": False}
    project.write_local_params({**TINY, **one_epoch, "augmentation.enabled": False})
    project.cli("run", "--pipelines", "phantom,data_processing,augmentation", env=ENV)
    endpoint = f"127.0.0.1:{free_port()}"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    agents = [
        _start(
            project,
            torchrun,
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=rare-cxr-test",
            "-m",
            "rare_cxr",
            "--pipelines",
            "training",
        )
        for _ in range(2)
    ]
    logs = [_finish(agent, timeout=600) for agent in agents]
    assert sum("Pipeline execution completed successfully" in log for log in logs) == 1
    folder = project.data("06_models", "multiscale_resnet", "checkpoint.pt")
    (version,) = list(folder.iterdir())
    checkpoint = torch.load(version / "checkpoint.pt", weights_only=True)
    assert checkpoint["metadata"]["world_size"] == 2
    (run,) = [r for r in _manifests(project) if r["pipelines"] == ["training"]]
    assert run["status"] == "completed" and run["run_id"] == version.name
