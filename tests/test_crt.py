"""Decoupling (cRT, Kang et al. 2020): the head alone is re-trained, with class-aware sampling,
as the last stage of the same training (docs/training.md, "Long-tail methods")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import TINY_SPEC, blob_cache, tiny_params

from rare_cxr.training import TrainingCallbacks, fit
from rare_cxr.training.decoupling import class_aware_weights
from rare_cxr.training.engine import epoch_order


def test_class_aware_weights_draw_each_class_equally_often():
    labels = np.array(
        [
            [1, 0, 0],  # finding 0 is common: 4 images
            [1, 0, 0],
            [1, 0, 0],
            [1, 1, 0],  # finding 1: 1 image, which also has finding 0
            [0, 0, 0],  # no finding: 2 images
            [0, 0, 0],
        ],
        dtype=np.float32,
    )
    # by hand: 3 classes (finding 0, finding 1, no finding; finding 2 has no image)
    # p = (1/3) * [1/4, 1/4, 1/4, 1/4 + 1/1, 1/2, 1/2]
    expected = np.array([1 / 4, 1 / 4, 1 / 4, 1 / 4 + 1, 1 / 2, 1 / 2]) / 3
    weights = class_aware_weights(labels)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert weights.sum() == pytest.approx(1.0)
    # drawn with the engine's sampler (6 images an epoch): each class a third of the draws
    draws = np.concatenate([epoch_order(6, 3, e, weights) for e in range(2000)])
    share_rare = np.isin(draws, [3]).mean()
    share_none = np.isin(draws, [4, 5]).mean()
    assert share_rare == pytest.approx(1.25 / 3, abs=0.02)
    assert share_none == pytest.approx(1 / 3, abs=0.02)


def _head_keys(model: torch.nn.Module) -> set[str]:
    head = {id(p) for p in model.head().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


def _crt_params(tmp_path: Path, **crt):
    """One main epoch, then (by default) two cRT epochs; `crt` overrides the cRT block."""
    return tiny_params(tmp_path, epochs=1, patience=3, deterministic=True, crt={"epochs": 2, **crt})


def test_crt_trains_the_head_only_and_leaves_every_trunk_tensor_equal(tmp_path, monkeypatch):
    """Every trunk parameter and buffer (BatchNorm running statistics and batch counters
    included) is bit-equal before, during and after cRT; the head changes; no trunk gradient
    is computed."""
    from rare_cxr.training import engine

    models: list[torch.nn.Module] = []
    real_build = engine.build_model

    def capture(spec, *a, **k):
        models.append(real_build(spec, *a, **k))
        return models[-1]

    monkeypatch.setattr(engine, "build_model", capture)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    trunk_grads: list[bool] = []

    def on_epoch_end(epoch, row):
        snapshots[epoch] = {k: v.detach().clone() for k, v in models[0].state_dict().items()}

    def on_step(epoch, step):
        if epoch >= 1:  # the cRT epochs
            head = _head_keys(models[0])
            trunk_grads.extend(
                p.grad is not None for n, p in models[0].named_parameters() if n not in head
            )

    cache = blob_cache(n_train=32, n_val=16)
    result = fit(
        TINY_SPEC,
        cache,
        None,
        _crt_params(tmp_path),
        callbacks=TrainingCallbacks(on_step=on_step, on_epoch_end=on_epoch_end),
    )
    assert result.history["stage"].tolist() == ["single", "crt", "crt"]
    assert result.metadata["stage"] == "crt"
    head = _head_keys(models[0])
    assert head == {"fc.weight", "fc.bias"}
    # the main training's best weights, kept by the cRT run as the finished training of the
    # same configuration without cRT
    main = fit(TINY_SPEC, cache, None, _crt_params(tmp_path, epochs=0))
    assert len(main.history) == 1
    trunk = [k for k in main.state_dict if k not in head]
    assert any("running_mean" in k for k in trunk)
    assert any("num_batches_tracked" in k for k in trunk)
    after_main, crt_1, crt_2 = snapshots[1], snapshots[2], snapshots[3]
    for key in trunk:
        for state in (after_main, crt_1, crt_2, result.state_dict):
            assert torch.equal(state[key], main.state_dict[key]), key
    # the head: re-initialised at the start of cRT, then trained every cRT epoch
    for key in head:
        assert not torch.equal(after_main[key], main.state_dict[key]), key
        assert not torch.equal(crt_1[key], after_main[key]), key
        assert not torch.equal(crt_2[key], crt_1[key]), key
    assert trunk_grads and not any(trunk_grads)


@pytest.mark.slow
def test_crt_starts_from_a_finished_main_training_and_equals_one_go(tmp_path, caplog):
    cache = blob_cache(n_train=32, n_val=16)
    one_go = fit(TINY_SPEC, cache, None, _crt_params(tmp_path / "a"))

    # main training first (cRT off), then cRT on: the main epoch is not trained again
    main = fit(TINY_SPEC, cache, None, _crt_params(tmp_path / "b", epochs=0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        after = fit(TINY_SPEC, cache, None, _crt_params(tmp_path / "b"))
    assert "starting classifier re-training (cRT) from its best weights" in caplog.text
    assert "tiny epoch 1 [single]" not in caplog.text
    assert "tiny epoch 2 [crt]" in caplog.text
    assert after.history["stage"].tolist() == ["single", "crt", "crt"]
    assert after.history["train_loss"].tolist() == one_go.history["train_loss"].tolist()
    for key, value in one_go.state_dict.items():
        assert torch.equal(value, after.state_dict[key]), key
    assert after.metadata["training_id"] != main.metadata["training_id"]

    # ... and other cRT settings start cRT afresh from the same main training
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        other = fit(TINY_SPEC, cache, None, _crt_params(tmp_path / "b", lr=0.01))
    assert "starting classifier re-training (cRT)" in caplog.text
    assert other.history["train_loss"].iloc[0] == main.history["train_loss"].iloc[0]
    assert other.history["train_loss"].iloc[1] != after.history["train_loss"].iloc[1]
    assert other.metadata["train_params"]["crt"]["lr"] == 0.01

    # the one-go run kept its main result too: turning cRT off there trains nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        reused = fit(TINY_SPEC, cache, None, _crt_params(tmp_path / "a", epochs=0))
    assert "training already finished for this configuration" in caplog.text
    assert reused.metadata["train_params"]["crt"]["epochs"] == 0
    assert reused.metadata["stage"] == "single"
    for key, value in main.state_dict.items():
        assert torch.equal(value, reused.state_dict[key]), key
