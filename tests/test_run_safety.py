"""Fault injection through real `kedro run` processes: kill -9, a full disk, concurrent runs.

Every test runs the project's real command line in a temporary copy of the project with tiny
settings (conf/local), and checks what a user would check after the failure: earlier outputs
still load, nothing partial is the latest version, the rerun finishes, and finished work is not
done twice.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from rare_cxr.atomic import leftover_owner
from rare_cxr.image_cache import ImageCache

pytestmark = pytest.mark.slow

# Tiny, deterministic, single-threaded: a rerun must reproduce an uninterrupted run exactly.
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
    "reporting.bootstrap.n_resamples": 20,
    "reporting.cost.batch_size": 2,
    "reporting.cost.n_batches": 1,
}
ONE_THREAD = {"RARE_CXR_THREADS": "1", "OMP_NUM_THREADS": "1"}
TWO_MODELS = (
    "--pipelines",
    "training,baselines",
    "--namespaces",
    "multiscale_resnet,resnet_single_scale",
)

# A real `kedro run` (Kedro's own CLI entry point) with one function slowed down or paused, so
# that a kill lands inside it. Only the timing changes: the code that runs is the project's.
LAUNCHER = textwrap.dedent(
    """
    import sys, time
    {patch}
    from kedro.framework.cli import main
    sys.argv = ["kedro", *sys.argv[1:]]
    main()
    """
)
SLOW_DECODE = """
import rare_cxr.image_cache as ic
_real = ic.decode_resized
def _slow(*a, **k):
    print("DECODING", flush=True); time.sleep(0.05); return _real(*a, **k)
ic.decode_resized = _slow
"""
PAUSED_REPORT_WRITE = """
import rare_cxr.atomic as at
_real = at.AtomicWriter.write
def _write(self, data):
    if self.destination.name == "report.html":
        _real(self, data[: len(data) // 2])
        print("WRITING report.html", flush=True); time.sleep(120)
    return _real(self, data)
at.AtomicWriter.write = _write
"""


def prepare(project, **extra: Any) -> None:
    project.write_local_params({**TINY, **extra})


def start(project, *args: str, patch: str | None = None) -> subprocess.Popen:
    if patch is None:
        command = [str(Path(sys.executable).with_name("kedro")), *args]
    else:
        launcher = project.path / "launcher.py"
        launcher.write_text(LAUNCHER.format(patch=textwrap.indent(patch, "")))
        command = [sys.executable, str(launcher), *args]
    return subprocess.Popen(
        command,
        cwd=project.path,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "400", **ONE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> str:
    """SIGKILL `process` as soon as `ready()` is true; return what it printed."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the kill point:\n" + (
            process.stdout.read()[-4000:] if process.stdout else ""
        )
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return out


def wait_for_line(process: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """Read the process's output until a line holds `marker` (then it is paused there)."""
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "marker never printed"
    raise AssertionError(f"process ended without printing {marker!r}:\n{''.join(seen)[-4000:]}")


def states(project, model: str) -> list[dict[str, Any]]:
    """Every training state of `model`. Each must load: states are renamed into place whole
    (a half-written one only ever exists under a temporary name, which `*.pt` does not match),
    so an unreadable `<fingerprint>.pt`, even while the run writes, is a failure of the test."""
    folder = project.data("06_models", model, "training_state")
    return [
        torch.load(path, weights_only=True)
        for path in (sorted(folder.glob("*.pt")) if folder.is_dir() else [])
    ]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def latest(path: Path) -> Path:
    versions = sorted(v for v in path.iterdir() if (v / path.name).exists())
    assert versions, f"no complete version of {path}"
    return versions[-1] / path.name


def checkpoint_weights(project, model: str) -> dict[str, torch.Tensor]:
    path = latest(project.data("06_models", model, "checkpoint.pt"))
    return torch.load(path, weights_only=True)["state_dict"]


def manifests(project, env: str = "base") -> list[dict[str, Any]]:
    folder = project.data("runs", env=env)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def run_id_time(run_id: str) -> datetime:
    """Kedro's session id is the UTC start time, e.g. 2026-11-26T11.54.16.677Z."""
    return datetime.strptime(run_id, "%Y-%m-%dT%H.%M.%S.%fZ").replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------


def test_kill_in_second_model_then_rerun_reuses_first_resumes_second_and_matches(
    tmp_path, monkeypatch
):
    """kill -9 at a random point of the second model's training; the rerun trains no epoch of
    the first model again, resumes the second, and ends with the weights of a run that was
    never interrupted (deterministic CPU settings)."""
    from conftest import make_project, nest_dotted
    from kedro.framework.startup import bootstrap_project

    reference, interrupted = make_project(tmp_path / "ref"), make_project(tmp_path / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: the reference must match bit for bit
    try:
        for project in (reference, interrupted):
            prepare(project)
            monkeypatch.chdir(project.path)
            bootstrap_project(project.path)
            for stage in ("phantom", "data_processing", "augmentation"):
                project.run(stage, params=nest_dotted(TINY))
        monkeypatch.chdir(reference.path)
        bootstrap_project(reference.path)
        reference.run(
            pipeline_names=["training", "baselines"],
            namespaces=["multiscale_resnet", "resnet_single_scale"],
            params=nest_dotted(TINY),
        )
    finally:
        torch.set_num_threads(threads)

    models = ("multiscale_resnet", "resnet_single_scale")
    delay = random.uniform(0.0, 0.4)
    first_done_at: list[float] = []

    def second_model_mid_training() -> bool:
        done = [m for m in models if any(s.get("finished") for s in states(interrupted, m))]
        running = [m for m in models if m not in done and states(interrupted, m)]
        if done and running:
            first_done_at.append(time.monotonic())
            return time.monotonic() - first_done_at[0] >= delay
        return False

    process = start(interrupted, "run", *TWO_MODELS)
    kill_when(process, second_model_mid_training)
    first = next(m for m in models if any(s.get("finished") for s in states(interrupted, m)))
    second = next(m for m in models if m != first)
    unfinished = [s for s in states(interrupted, second) if not s.get("finished")]
    assert unfinished, "the kill must land inside the second model's training"
    epochs_done = unfinished[0]["global_epoch"]

    rerun = interrupted.cli("run", *TWO_MODELS, env=ONE_THREAD)
    log = rerun.stdout + rerun.stderr
    assert f"{first}: training already finished for this configuration" in log
    assert f"{first} epoch" not in log  # no epoch of the finished model is trained again
    assert f"{second}: resuming from" in log
    assert (
        f"{second} epoch {epochs_done + 1} " in log and f"{second} epoch {epochs_done} " not in log
    )

    for model in models:
        want, got = checkpoint_weights(reference, model), checkpoint_weights(interrupted, model)
        assert want.keys() == got.keys()
        for key, value in want.items():
            assert torch.equal(value, got[key]), f"{model}.{key} differs after kill + rerun"


def test_kill_during_report_write_and_during_cache_build_leave_earlier_outputs(kedro_project):
    project = kedro_project
    from conftest import nest_dotted

    prepare(project, **{"training.epochs": 1})
    project.run(params=nest_dotted({**TINY, "training.epochs": 1}))  # complete: report, cache
    report = project.data("08_reporting", "report.html")
    first_report = latest(report)
    first_bytes = first_report.read_bytes()

    # -- kill -9 while report.html is half written --------------------------------------------
    # the README's `kedro run --pipelines reporting`: it reports the models trained so far
    process = start(project, "run", "--pipelines", "reporting", patch=PAUSED_REPORT_WRITE)
    wait_for_line(process, "WRITING report.html")
    kill_when(process, lambda: True)
    partial = [p for p in report.rglob("*") if leftover_owner(p) is not None]
    assert partial, "the kill should leave the half-written temporary behind"
    assert latest(report) == first_report and first_report.read_bytes() == first_bytes
    project.cli("run", "--pipelines", "reporting")  # the rerun sweeps the dead temporary
    assert not [p for p in report.rglob("*") if leftover_owner(p) is not None]
    assert latest(report) != first_report and "<html" in latest(report).read_text()
    metrics_all = json.loads(latest(project.data("08_reporting", "metrics_all.json")).read_text())
    # the models trained so far: the default run's ablation pair
    assert list(metrics_all) == ["multiscale_resnet", "resnet_single_scale"]

    # -- kill -9 in the middle of rebuilding the image cache at a new size ---------------------
    cache_path = project.data("05_model_input", "image_cache")
    old_npy = (cache_path / "train.npy").read_bytes()
    prepare(project, **{"training.epochs": 1, "image_cache.size": 24})
    process = start(project, "run", "--pipelines", "augmentation", patch=SLOW_DECODE)
    wait_for_line(process, "DECODING")
    kill_when(process, lambda: True)
    staging = [p for p in cache_path.parent.iterdir() if leftover_owner(p) is not None]
    assert staging, "the kill should leave the staging folder of the unfinished build"
    intact = ImageCache(cache_path)
    assert intact.size == 32 and (cache_path / "train.npy").read_bytes() == old_npy
    project.cli("run", "--pipelines", "augmentation")
    assert ImageCache(cache_path).size == 24
    assert not [p for p in cache_path.parent.iterdir() if leftover_owner(p) is not None]


def test_full_disk_during_checkpoint_save_loses_no_training(kedro_project, monkeypatch, caplog):
    import logging

    from conftest import nest_dotted

    from rare_cxr.atomic import AtomicWriter

    project = kedro_project
    params = nest_dotted({**TINY, "training.epochs": 2})
    project.run(pipeline="phantom", params=params)
    project.run(pipeline="data_processing", params=params)
    project.run(pipeline="augmentation", params=params)

    real_write = AtomicWriter.write

    def disk_full_on_checkpoints(self, data):  # type: ignore[no-untyped-def]
        if self.destination.name == "checkpoint.pt" and self.tell() + len(data) > 1000:
            real_write(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(AtomicWriter, "write", disk_full_on_checkpoints)
    with pytest.raises(Exception, match="No space left on device"):
        project.run(pipeline="training", params=params)
    monkeypatch.undo()
    checkpoints = project.data("06_models", "multiscale_resnet", "checkpoint.pt")
    assert not list(checkpoints.glob("*/checkpoint.pt"))  # nothing partial became a version
    assert not [p for p in checkpoints.rglob("*") if leftover_owner(p) is not None]
    (finished,) = [s for s in states(project, "multiscale_resnet") if s.get("finished")]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        project.run(pipeline="training", params=params)
    assert "training already finished for this configuration" in caplog.text
    assert "multiscale_resnet epoch" not in caplog.text
    saved = torch.load(latest(checkpoints), weights_only=True)["state_dict"]
    for key, value in finished["best_state"].items():
        assert torch.equal(value, saved[key]), key


def test_two_concurrent_runs_are_serialised_and_each_is_self_consistent(kedro_project):
    project = kedro_project
    prepare(project)
    args = ("run", "--pipelines", "phantom,data_processing,augmentation")
    first, second = start(project, *args), start(project, *args)
    logs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum("another kedro run is using" in log for log in logs) == 1  # one waited, said so

    runs = manifests(project)
    assert [r["status"] for r in runs] == ["completed", "completed"]
    earlier, later = runs
    finished = datetime.fromisoformat(earlier["finished"])
    assert run_id_time(later["run_id"]) >= finished  # the second id was drawn after the first run

    # file by file: every versioned output lies in the folder of the run that wrote it, and
    # every versioned input a run loaded is its own output (no run read the other's)
    by_run: dict[str, set[str]] = {r["run_id"]: set() for r in runs}
    for path in project.data().rglob("*"):
        if path.is_file() and path.parent.name in by_run:
            by_run[path.parent.name].add(path.name)
    for run in runs:
        versioned = {k: v for k, v in run["saved"].items() if v != "unversioned"}
        assert set(versioned.values()) == {run["run_id"]}
        assert len(by_run[run["run_id"]]) == len(versioned) > 0
        loaded = {k: v for k, v in run["loaded"].items() if v != "unversioned"}
        assert loaded and set(loaded.values()) == {run["run_id"]}, loaded


def test_kill_during_the_default_parallel_cache_build_blocks_nothing(kedro_project, tmp_path):
    """kill -9 of a run while the image cache is decoded by the default process pool
    (`image_cache.workers: 0`, every core), with 05_model_input on another disk behind a link.

    Before: the forked workers inherited the run lock and outlived the run, so the next run
    waited forever on a dead pid. Now: the workers end with their parent, nothing holds the lock,
    the next run says it takes over, sweeps the staging folder behind the link, and completes."""
    from rare_cxr.runs import run_lock_holder

    project = kedro_project
    prepare(project, **{"image_cache.workers": 0, "phantom.n_patients": 60})
    project.cli("run", "--pipelines", "phantom,data_processing", env=ONE_THREAD)
    fast = tmp_path / "fast-disk"
    fast.mkdir()
    layer = project.data("05_model_input")
    layer.rmdir()
    layer.symlink_to(fast, target_is_directory=True)

    process = start(project, "run", "--pipelines", "augmentation", patch=SLOW_DECODE)
    wait_for_line(process, "DECODING")
    workers = children(process.pid)
    assert len(workers) >= 2, "the default build should decode in a pool of several processes"
    kill_when(process, lambda: True)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "decode workers outlived the killed run"
        time.sleep(0.1)
    assert run_lock_holder(project.data()) is None
    staging = [p for p in fast.iterdir() if leftover_owner(p) is not None]
    assert staging, "the kill should leave the staging folder of the unfinished build"

    rerun = project.cli("run", "--pipelines", "augmentation", env=ONE_THREAD, timeout=300)
    log = rerun.stdout + rerun.stderr
    assert "ended without releasing it" in log and f"pid {process.pid}" in log
    assert not [p for p in fast.iterdir() if leftover_owner(p) is not None]
    assert ImageCache(layer / "image_cache").split("train").images.shape[1] == 32


def test_a_hook_failing_at_run_start_marks_the_run_failed_and_frees_the_lock(kedro_project):
    """An unusable MLflow store makes the tracking hook fail before the first node. Kedro calls
    no error hook for that; the run's manifest must still say `failed`, and the lock be free --
    through the CLI and in a notebook-style session (which takes the lock in the hook)."""
    from conftest import nest_dotted

    from rare_cxr.runs import RunLock, run_lock_holder

    project = kedro_project
    prepare(project)
    blocker = project.path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    broken = {"tracking.enabled": True, "tracking.store": str(blocker / "mlflow")}
    done = project.cli(
        "run",
        "--pipelines",
        "phantom",
        "--params",
        ",".join(f"{k}={v}" for k, v in broken.items()),
        check=False,
    )
    assert done.returncode != 0
    assert "cannot open the MLflow store" in done.stdout + done.stderr
    (failed,) = manifests(project)
    assert failed["status"] == "failed" and "MLflow store" in failed["error"]
    assert failed["finished"] is not None
    assert run_lock_holder(project.data()) is None

    with pytest.raises(RuntimeError, match="cannot open the MLflow store"):
        project.run("phantom", params=nest_dotted({**TINY, **broken}))
    assert RunLock.held(project.data()) is None  # this process let go of it
    assert [m["status"] for m in manifests(project)] == ["failed", "failed"]
    project.run("phantom", params=nest_dotted(TINY))  # the next session is not blocked
    assert manifests(project)[-1]["status"] == "completed"
