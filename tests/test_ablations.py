"""The named ablations of docs/training.md: each one `--params` away, each a working switch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_training import TINY_SPEC, blob_cache, tiny_params

from rare_cxr.cli import split_params
from rare_cxr.training import fit
from rare_cxr.training.config import merge_overrides, validate_training_params
from rare_cxr.training.engine import epoch_order, sample_weights

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_documented_ablation_commands_parse_to_the_switches():
    commands = re.findall(
        r"`kedro run --env nih --pipelines training --params \"([^\"]+)\"`", DOCS.read_text()
    )
    parsed = [split_params(None, None, c) for c in commands]
    assert len(parsed) == 8
    assert parsed[0]["training"]["transfer"]["two_stage"] is True
    assert parsed[1]["training"]["loss"]["name"] == "focal"
    assert parsed[2]["training"]["oversample_rare"]["enabled"] is True
    # the long-tail methods (docs/training.md, "Long-tail methods")
    assert parsed[3]["training"]["loss"] == {"name": "class_balanced", "cb_beta": 0.9999}
    assert [p["training"]["loss"]["name"] for p in parsed[4:7]] == [
        "asl",
        "logit_adjusted",
        "ldam_drw",
    ]
    assert parsed[7]["training"]["crt"]["epochs"] == 10
    assert all(p["data_root"] == "/data/nih" for p in parsed)
    for p in parsed:  # each one a valid training block, merged over the defaults
        validate_training_params(merge_overrides({"epochs": 30}, p["training"]))


def test_oversampling_draws_rare_images_more_often_and_trains():
    labels = np.zeros((200, 14), np.float32)
    labels[:4, 7] = 1  # a rare finding: 2 % of images
    labels[4:100, 0] = 1  # a common one
    weights = sample_weights(labels, power=1.0)
    assert weights[0] / weights[50] == pytest.approx((1 / 0.02) / (1 / 0.48))
    order = epoch_order(len(labels), seed=1, epoch=0, weights=weights)
    rare_share = np.isin(order, np.arange(4)).mean()
    assert rare_share > 0.1  # ~2 % with a plain shuffle
    assert np.array_equal(order, epoch_order(len(labels), seed=1, epoch=0, weights=weights))
    result = fit(
        TINY_SPEC,
        blob_cache(n_train=32, n_val=16),
        None,
        tiny_params(
            Path("/nonexistent"),
            epochs=1,
            resume=False,
            oversample_rare={"enabled": True, "power": 0.5},
        ),
    )
    assert (
        len(result.history) == 1 and result.metadata["train_params"]["oversample_rare"]["enabled"]
    )


def test_focal_loss_switch_trains():
    result = fit(
        TINY_SPEC,
        blob_cache(n_train=32, n_val=16),
        None,
        tiny_params(Path("/nonexistent"), epochs=1, resume=False, loss={"name": "focal"}),
    )
    assert result.metadata["train_params"]["loss"]["name"] == "focal"
    assert np.isfinite(result.history["train_loss"]).all()
