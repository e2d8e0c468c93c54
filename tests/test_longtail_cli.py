"""Each long-tail method's parameter block through the real `kedro` command line, in a tiny run
(docs/training.md, "Long-tail methods"): one `--params` or a model block, never a code change."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

TINY = {
    "phantom.n_patients": 24,
    "phantom.image_size": 64,
    "image_cache.size": 32,
    "image_cache.workers": 1,
    "augmentation_preview.scales": [16, 32],
    "multiscale_resnet.model.scales": [16, 32],
    "resnet_single_scale.model.scales": [32],
    "training.epochs": 1,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.progress_bar": False,
}
ONE_THREAD = {"RARE_CXR_THREADS": "1", "OMP_NUM_THREADS": "1"}
MODEL = "multiscale_resnet"


def _log(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def _epoch(n: int) -> str:
    """An epoch's log line in the console log (rich drops the `[stage]` markup-like tag)."""
    return f"{MODEL} epoch {n} "


def _latest(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if p.is_dir())[-1] / folder.name


def _outputs(project) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The newest checkpoint, history and predictions of the main model."""
    checkpoint = torch.load(
        _latest(project.data("06_models", MODEL, "checkpoint.pt")), weights_only=True
    )
    history = pd.read_csv(
        _latest(project.data("08_reporting", MODEL, "history.csv")), dtype={"training_id": str}
    )
    predictions = pd.read_parquet(
        _latest(project.data("07_model_output", MODEL, "predictions.parquet"))
    )
    return checkpoint, history, predictions


# (--params of the run, the loss it selects, the per-finding constants the checkpoint records)
METHODS = [
    (
        "training.loss.name=class_balanced,training.loss.cb_beta=0.99",
        "class_balanced",
        {"weight_positive", "weight_negative"},
    ),
    ("training.loss.name=asl", "asl", set()),
    (
        "training.loss.name=logit_adjusted,training.loss.la_tau=0.5",
        "logit_adjusted",
        {"logit_offset"},
    ),
    # a model block: the multi-scale model's own `training:` overrides
    (
        f"{MODEL}.model.training.loss.name=ldam_drw,{MODEL}.model.training.loss.drw_start_epoch=0",
        "ldam_drw",
        {"margin_positive", "margin_negative", "drw_weight_positive", "drw_weight_negative"},
    ),
]


def test_each_long_tail_block_trains_through_the_kedro_cli(kedro_project):
    project = kedro_project
    project.write_local_params(TINY)
    # the paper's balanced BCE first (and everything it needs: phantom, labels, image cache)
    first = project.cli(
        "run", "--pipelines", "phantom,data_processing,augmentation,training", env=ONE_THREAD
    )
    assert _epoch(1) in _log(first)
    baseline, _, _ = _outputs(project)
    assert baseline["metadata"]["train_params"]["loss"]["name"] == "bce"

    for params, name, constants in METHODS:
        run = project.cli("run", "--pipelines", "training", "--params", params, env=ONE_THREAD)
        log = _log(run)
        assert _epoch(1) in log, log[-3000:]  # a new training, not a reuse
        checkpoint, history, predictions = _outputs(project)
        meta = checkpoint["metadata"]
        assert meta["train_params"]["loss"]["name"] == name
        assert set(meta["loss_constants"]) == constants
        assert meta["fingerprint"] != baseline["metadata"]["fingerprint"]
        assert history["training_id"].eq(meta["training_id"]).all()
        assert predictions["training_id"].eq(meta["training_id"]).all()
        assert np.isfinite(history["train_loss"]).all()

    # cRT after the paper's training: its main training is reused, only the head is retrained
    run = project.cli(
        "run", "--pipelines", "training", "--params", "training.crt.epochs=1", env=ONE_THREAD
    )
    log = _log(run)
    assert "starting classifier re-training (cRT) from its best weights" in log, log[-3000:]
    assert _epoch(1) not in log and _epoch(2) in log
    checkpoint, history, _ = _outputs(project)
    assert history["stage"].tolist() == ["single", "crt"]
    assert checkpoint["metadata"]["stage"] == "crt"
    head = {"fc.weight", "fc.bias"}
    for key, value in baseline["state_dict"].items():
        same = torch.equal(value, checkpoint["state_dict"][key])
        assert same is (key not in head), key  # the trunk is the paper model's, bit for bit

    # a block that cannot work stops before anything runs, naming the key
    bad = project.cli(
        "run",
        "--pipelines",
        "training",
        "--params",
        "training.loss.name=ldam_drw",
        env=ONE_THREAD,
        check=False,
    )
    assert bad.returncode != 0
    assert "training.loss.drw_start_epoch: 4 must be below the block's epochs (1)" in _log(bad)
    assert "Traceback" not in _log(bad)
