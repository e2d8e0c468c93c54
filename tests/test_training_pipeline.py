"""The `training` pipeline through a real KedroSession: catalog factories, namespaces, contracts.

The image cache is replaced (in the temporary project's `conf/local`) by a tiny in-memory
stand-in with the documented `ImageCache` API, so this test neither waits for nor depends on the
image-cache builder; the augmentation policy is a real JSON file read by the real catalog entry.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import HISTORY_COLUMNS

from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.training.nodes import load_checkpoint_model
from rare_cxr.training.engine import predict_probabilities

FAKE_DATASET = """
from kedro.io import AbstractDataset
from test_training import blob_cache


class FakeImageCacheDataset(AbstractDataset):
    def __init__(self, size=32, metadata=None):
        self.size = size
        self.metadata = metadata

    def load(self):
        return blob_cache(n_train=32, n_val=16, n_test=8, size=self.size)

    def save(self, data):
        raise NotImplementedError

    def _describe(self):
        return {"size": self.size}
"""

RUN_PARAMS = {
    "multiscale_resnet": {"model": {"scales": [16, 32]}},
    "training": {
        "epochs": 1,
        "batch_size": 16,
        "eval_batch_size": 16,
        "device": "cpu",
        "progress_bar": False,
        "loader_threads": 0,
        "tta_hflip": True,
    },
}


@pytest.mark.slow
def test_training_pipeline_writes_contract_outputs_and_a_reloadable_checkpoint(
    kedro_project, monkeypatch
):
    monkeypatch.syspath_prepend(str(kedro_project.path))
    (kedro_project.path / "fake_image_cache.py").write_text(FAKE_DATASET)
    (kedro_project.path / "conf" / "local" / "catalog.yml").write_text(
        "image_cache:\n  type: fake_image_cache.FakeImageCacheDataset\n  size: 32\n"
    )
    policy = kedro_project.data("05_model_input", "augmentation_policy.json")
    policy.write_text(json.dumps({"rotation_degrees": 3.0, "brightness": [0.9, 1.1]}))

    kedro_project.run(pipeline="training", params=RUN_PARAMS)

    ckpt_files = list(
        kedro_project.data("06_models", "multiscale_resnet").glob("checkpoint.pt/*/checkpoint.pt")
    )
    assert len(ckpt_files) == 1  # versioned
    # the finished training is kept in the catalog's training_state folder, for reruns
    states = list(kedro_project.data("06_models", "multiscale_resnet", "training_state").iterdir())
    assert len(states) == 1 and torch.load(states[0], weights_only=True)["finished"] is True
    checkpoint = torch.load(ckpt_files[0], weights_only=True)
    meta = checkpoint["metadata"]
    for key in (
        "model_spec",
        "findings",
        "normalisation",
        "scales",
        "input_size",
        "train_params",
        "epoch",
        "metric",
        "metric_name",
    ):
        assert key in meta, key
    assert meta["scales"] == [16, 32] and meta["input_size"] == 32
    assert meta["findings"] == list(FINDINGS)

    catalog = kedro_project.catalog(params=RUN_PARAMS)
    history = catalog.load("multiscale_resnet.history")
    assert list(history.columns) == [*HISTORY_COLUMNS, "seed"] and len(history) == 1
    predictions = catalog.load("multiscale_resnet.predictions")
    assert list(predictions.columns) == [
        "image_id",
        "patient_id",
        "split",
        "seed",
        *FINDINGS,
        "checkpoint_version",
        "training_id",
        "image_cache_fingerprint",
    ]
    # lineage: every row names the checkpoint version (= the run id) and training it came from
    assert predictions["checkpoint_version"].unique().tolist() == [ckpt_files[0].parent.name]
    assert predictions["training_id"].unique().tolist() == [meta["training_id"]]
    assert history["training_id"].unique().tolist() == [meta["training_id"]]
    assert predictions["split"].tolist() == ["val"] * 16 + ["test"] * 8
    assert predictions[list(FINDINGS)].apply(lambda c: c.between(0, 1).all()).all()

    # the checkpoint alone rebuilds the model and reproduces the saved predictions
    model = load_checkpoint_model(checkpoint)
    cache = catalog.load("image_cache")
    probs, _ = predict_probabilities(
        model, cache.split("val").images, torch.device("cpu"), tta_hflip=True
    )
    val = predictions[predictions["split"] == "val"]
    np.testing.assert_allclose(val[list(FINDINGS)].to_numpy(), probs, rtol=1e-5, atol=1e-6)
    assert pd.api.types.is_integer_dtype(predictions["patient_id"])


def test_namespaced_pipelines_share_inputs_and_map_their_own_parameters():
    from rare_cxr.pipelines.training import create_model_pipeline

    pipe = create_model_pipeline("densenet121")
    assert pipe.inputs() == {
        "image_cache",
        "augmentation_policy",
        "params:training",
        "params:densenet121.model",
        "densenet121.training_state",
    }
    assert pipe.outputs() == {"densenet121.history", "densenet121.predictions"}
    assert {n.name for n in pipe.nodes} == {"densenet121.train_model", "densenet121.predict"}


@pytest.mark.parametrize(
    ("model", "training", "key"),
    [
        ({"backbone": "resnet19"}, {}, r"multiscale_resnet\.model\.backbone"),
        ({"scales": [64, -128]}, {}, r"multiscale_resnet\.model\.scales"),
        ({}, {"optimizer": {"lr": 0.0}}, r"training\.optimizer\.lr"),
        ({}, {"patience": 0}, r"training\.patience"),
    ],
)
def test_train_model_node_fails_before_any_work_naming_the_key(model, training, key):
    from rare_cxr.pipelines.training.nodes import train_model

    class Untouchable:
        size = 128

        def split(self, name):  # pragma: no cover - must not be reached
            raise AssertionError("image cache touched before parameter validation")

    spec = {"name": "multiscale_resnet", "architecture": "multiscale_resnet", **model}
    with pytest.raises(ValueError, match=key):
        train_model(Untouchable(), {}, spec, training)


def test_per_model_training_overrides_merge_key_by_key_and_leave_the_spec_clean():
    from rare_cxr.pipelines.training.nodes import split_training_overrides

    shared = {"epochs": 8, "optimizer": {"lr": 1e-3, "weight_decay": 1e-4}}
    spec, merged = split_training_overrides(
        {"name": "vgg16", "architecture": "vgg16", "training": {"optimizer": {"lr": 1e-4}}},
        shared,
    )
    assert "training" not in spec
    assert merged == {"epochs": 8, "optimizer": {"lr": 1e-4, "weight_decay": 1e-4}}
    assert shared["optimizer"]["lr"] == 1e-3  # the shared block is not mutated
    with pytest.raises(ValueError, match=r"vgg16\.model\.training"):
        split_training_overrides({"name": "vgg16", "training": 3}, shared)


def test_python_m_entry_point_is_kedro_run_for_torchrun():
    """The documented multi-GPU launch is `torchrun ... -m rare_cxr --pipelines training`:
    `python -m rare_cxr` must be the project's `run` command itself (no `run` sub-command)."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "rare_cxr", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--pipelines" in done.stdout and "--namespaces" in done.stdout


@pytest.mark.slow
def test_several_seeds_train_predict_and_reuse_per_seed(kedro_project, monkeypatch, caplog):
    """`training.n_seeds=2`: one checkpoint holding both seeds, predictions per seed, and a
    rerun with three seeds reuses the two finished ones and trains only the third."""
    import logging

    from rare_cxr.pipelines.training.nodes import checkpoint_seeds

    monkeypatch.syspath_prepend(str(kedro_project.path))
    (kedro_project.path / "fake_image_cache.py").write_text(FAKE_DATASET)
    (kedro_project.path / "conf" / "local" / "catalog.yml").write_text(
        "image_cache:\n  type: fake_image_cache.FakeImageCacheDataset\n  size: 32\n"
    )
    kedro_project.data("05_model_input", "augmentation_policy.json").write_text("{}")
    params = {**RUN_PARAMS, "training": {**RUN_PARAMS["training"], "n_seeds": 2}}
    kedro_project.run(pipeline="training", params=params)

    catalog = kedro_project.catalog(params=params)
    checkpoint = catalog.load("multiscale_resnet.checkpoint")
    assert checkpoint_seeds(checkpoint) == [42, 43]
    assert set(checkpoint["seed_state_dicts"]) == {"43"}
    ids = {s: v["training_id"] for s, v in checkpoint["metadata"]["per_seed"].items()}
    assert len(set(ids.values())) == 2
    predictions = catalog.load("multiscale_resnet.predictions")
    assert predictions.groupby("seed").size().to_dict() == {42: 24, 43: 24}
    assert predictions.groupby("seed")["training_id"].first().to_dict() == {
        42: ids["42"],
        43: ids["43"],
    }
    # each seed's rows come from that seed's own weights
    first, second = (predictions[predictions["seed"] == s][list(FINDINGS)] for s in (42, 43))
    assert not np.allclose(first.to_numpy(), second.to_numpy())
    history = catalog.load("multiscale_resnet.history")
    assert sorted(history["seed"].unique()) == [42, 43]

    caplog.clear()
    more = {**params, "training": {**params["training"], "n_seeds": 3}}
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        kedro_project.run(pipeline="training", params=more)
    assert caplog.text.count("training already finished for this configuration") == 2
    assert "multiscale_resnet epoch 1" in caplog.text  # the third seed trains
    checkpoint = kedro_project.catalog(params=more).load("multiscale_resnet.checkpoint")
    assert checkpoint_seeds(checkpoint) == [42, 43, 44]
    assert checkpoint["metadata"]["per_seed"]["42"]["training_id"] == ids["42"]
