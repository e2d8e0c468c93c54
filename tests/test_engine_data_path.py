"""The training engine's data path and step (issue 11, items 3 and 6).

* a frozen-trunk epoch trains the head only: trunk weights and BatchNorm running statistics
  unchanged, no trunk gradient computed, everything restored afterwards;
* a single-scale model smaller than the cache is augmented (and trained) at its own size, while
  evaluation still feeds cache-size images; multi-scale models are augmented at the cache size;
* the augmentation generator lives on the training device;
* the prefetch depth follows `loader_threads`;
* gradient accumulation gives the full batch's update (BatchNorm statistics aside) and the
  schedule counts optimiser steps.

Tiny in-memory caches (`test_training.blob_cache`), resnet18 at 16-32 px, CPU.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_training import TINY_SPEC, blob_cache, tiny_params
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.models import build_model
from rare_cxr.pipelines.training.nodes import make_augmenter
from rare_cxr.training import TrainingCallbacks, engine, fit
from rare_cxr.training import data as training_data

TWO_STAGE = {
    "two_stage": True,
    "rare_findings": ["Cardiomegaly", "Hernia"],
    "stage1_epochs": 1,
    "stage2_targets": "all",
    "frozen_trunk_epochs": 1,
}


def capture_models(monkeypatch: pytest.MonkeyPatch, convert=None) -> list[nn.Module]:
    """Every model `fit` builds (optionally converted), for inspection by callbacks."""
    built: list[nn.Module] = []
    real_build = engine.build_model

    def build(spec, *args, **kwargs):
        model = real_build(spec, *args, **kwargs)
        if convert is not None:
            model = convert(model)
        built.append(model)
        return model

    monkeypatch.setattr(engine, "build_model", build)
    return built


def _head_names(model: nn.Module) -> set[str]:
    head = {id(p) for p in model.head().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


# ---------------------------------------------------------------- item 3: frozen trunk


def test_frozen_trunk_epoch_changes_the_head_only_and_restores_the_trunk(tmp_path, monkeypatch):
    models = capture_models(monkeypatch)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    checked_steps: list[tuple[int, int]] = []

    def on_step(epoch: int, step: int) -> None:
        model = models[0]
        head = {id(p) for p in model.head().parameters()}
        trunk_params = [p for p in model.parameters() if id(p) not in head]
        head_params = [p for p in model.parameters() if id(p) in head]
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(p.grad is not None for p in head_params)
        if epoch == 1:  # stage 2's first epoch: frozen
            # backward never reached the trunk, which ran in eval mode
            assert all(p.grad is None and not p.requires_grad for p in trunk_params)
            assert norms and not any(m.training for m in norms)
        else:
            assert all(p.grad is not None and p.requires_grad for p in trunk_params)
            assert all(m.training for m in norms)
        checked_steps.append((epoch, step))

    def on_epoch_end(epoch: int, row: dict[str, Any]) -> None:
        snapshots[epoch] = {k: v.detach().clone() for k, v in models[0].state_dict().items()}

    params = tiny_params(tmp_path, epochs=2, patience=3, resume=False, transfer=TWO_STAGE)
    result = fit(
        TINY_SPEC,
        blob_cache(n_train=32, n_val=16),
        None,
        params,
        callbacks=TrainingCallbacks(on_step=on_step, on_epoch_end=on_epoch_end),
    )
    assert result.history["stage"].tolist() == ["common", "all", "all"]
    assert {e for e, _ in checked_steps} == {0, 1, 2}

    model = models[0]
    head = _head_names(model)
    assert head == {"fc.weight", "fc.bias"}
    start, frozen, after = snapshots[1], snapshots[2], snapshots[3]  # epoch 1 = end of stage 1
    trunk_keys = [k for k in start if k not in head]
    running = [k for k in trunk_keys if k.endswith(("running_mean", "running_var"))]
    assert running and len(trunk_keys) > len(running)
    for key in trunk_keys:  # every trunk weight AND every BatchNorm statistic, bit for bit
        assert torch.equal(frozen[key], start[key]), key
    for key in head:
        assert not torch.equal(frozen[key], start[key]), key
    # the next, unfrozen epoch trains the trunk again and updates its statistics
    assert any(not torch.equal(after[k], frozen[k]) for k in running)
    assert any(not torch.equal(after[k], frozen[k]) for k in trunk_keys if k.endswith(".weight"))
    assert all(p.requires_grad for p in model.parameters())


def test_a_frozen_last_epoch_leaves_the_model_trainable(tmp_path, monkeypatch):
    models = capture_models(monkeypatch)
    params = tiny_params(
        tmp_path, epochs=1, resume=False, transfer={**TWO_STAGE, "frozen_trunk_epochs": 3}
    )
    fit(TINY_SPEC, blob_cache(n_train=32, n_val=16), None, params)
    assert all(p.requires_grad for p in models[0].parameters())


def test_trunk_is_everything_outside_the_head_dropout_included():
    model = build_model({**TINY_SPEC, "dropout": 0.2})
    trunk = engine.trunk_modules(model)
    ids = {id(m) for m in trunk}
    assert id(model.fc) not in ids and id(model) not in ids
    assert id(model.dropout) in ids  # outside the head: off in frozen epochs (issue 18)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(id(m) in ids for m in bn)
    head = {id(p) for p in model.head().parameters()}
    covered = {id(p) for m in trunk for p in m.parameters(recurse=False)}
    assert covered == {id(p) for p in model.parameters() if id(p) not in head}


@pytest.mark.parametrize(
    ("architecture", "kinds"),
    [("efficientnet_b0", ("Dropout", "StochasticDepth")), ("vgg16", ("Dropout",))],
)
def test_a_frozen_epoch_is_deterministic_outside_the_head(architecture, kinds):
    """During a frozen epoch (model in train mode, trunk frozen) every dropout and
    stochastic-depth layer outside the head is in eval mode: the same input gives the same
    output twice. Without freezing, the same model in train mode does not."""
    torch.manual_seed(0)
    model = build_model(
        {"name": "m", "architecture": architecture, "scales": [32], "pretrained": "none"}
    )
    stochastic = [m for m in model.modules() if type(m).__name__ in kinds]
    assert {type(m).__name__ for m in stochastic} == set(kinds)
    x = torch.rand(2, 1, 32, 32)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout / stochastic depth active
    head = {id(p) for p in model.head().parameters()}
    trunk_params = [p for p in model.parameters() if id(p) not in head]
    model.train()
    engine.set_trunk_frozen(engine.trunk_modules(model), trunk_params, True)
    assert model.head().training  # the head itself trains
    assert not any(m.training for m in stochastic)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_stage2_rare_freezes_the_trunk_and_keeps_the_common_findings_exact(tmp_path, monkeypatch):
    """stage2_targets: rare -- stage 2 trains the head on the rare findings only, the trunk
    stays frozen throughout, and the common findings' head rows (and so their logits) stay
    the stage-1 model's bit for bit, weight decay on."""
    models = capture_models(monkeypatch)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(epoch: int, row: dict[str, Any]) -> None:
        snapshots[epoch] = {k: v.detach().clone() for k, v in models[0].state_dict().items()}

    rare = {**TWO_STAGE, "stage2_targets": "rare", "frozen_trunk_epochs": 0}
    params = tiny_params(
        tmp_path,
        epochs=2,
        patience=3,
        resume=False,
        transfer=rare,
        optimizer={"lr": 1e-2, "weight_decay": 0.01},
    )
    stages = engine.plan_stages(
        {"epochs": 2, "transfer": {**rare, "rare_findings": ["Cardiomegaly", "Hernia"]}}, None
    )
    assert [(s.name, s.epochs, s.frozen_epochs) for s in stages] == [
        ("common", 1, 0),
        ("rare", 2, 2),
    ]
    result = fit(
        TINY_SPEC,
        blob_cache(n_train=32, n_val=16),
        None,
        params,
        callbacks=TrainingCallbacks(on_epoch_end=on_epoch_end),
    )
    assert result.history["stage"].tolist() == ["common", "rare", "rare"]
    start, end = snapshots[1], snapshots[3]  # end of stage 1 (best loaded), end of stage 2
    head = _head_names(models[0])
    for key in start:
        if key not in head:
            assert torch.equal(end[key], start[key]), key
    rare_rows = [FINDINGS.index("Cardiomegaly"), FINDINGS.index("Hernia")]
    common_rows = [i for i in range(len(FINDINGS)) if i not in rare_rows]
    for key in ("fc.weight", "fc.bias"):
        assert torch.equal(end[key][common_rows], start[key][common_rows]), key
        assert not torch.equal(end[key][rare_rows], start[key][rare_rows]), key
        assert torch.equal(result.state_dict[key][common_rows], start[key][common_rows]), key


# ---------------------------------------------------------------- item 6: single-scale size


class ShapeSpy:
    """An augmenter wrapper recording the batch shapes and generator devices it is given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.policy = inner.policy
        self.shapes: list[tuple[int, ...]] = []
        self.devices: list[tuple[torch.device, torch.device]] = []

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        self.shapes.append(tuple(batch.shape))
        self.devices.append((batch.device, generator.device))
        return self.inner(batch, generator=generator)


def _record_inputs(seen: list[tuple[bool, tuple[int, ...]]]):
    """A model conversion recording (training?, input side) of every forward call."""

    def hook(module, args):
        seen.append((module.training, tuple(args[0].shape[-2:])))

    def convert(model):
        model.register_forward_pre_hook(hook)
        return model

    return convert


@pytest.mark.parametrize(
    ("scales", "train_side"),
    [([16], 16), ([16, 32], 32), ([32], 32)],
    ids=["single-scale below the cache", "multi-scale", "single-scale at the cache size"],
)
def test_training_input_size_and_unchanged_evaluation(tmp_path, monkeypatch, scales, train_side):
    seen: list[tuple[bool, tuple[int, ...]]] = []
    capture_models(monkeypatch, _record_inputs(seen))
    spy = ShapeSpy(make_augmenter({"rotation_degrees": 5.0, "noise_std": 0.02}))
    fit(
        {**TINY_SPEC, "scales": scales},
        blob_cache(n_train=32, n_val=16),
        spy,
        tiny_params(tmp_path, epochs=1, resume=False),
    )
    train = {shape for training, shape in seen if training}
    evaluation = {shape for training, shape in seen if not training}
    assert train == {(train_side, train_side)}  # the model's own size, already augmented
    assert {s[-2:] for s in spy.shapes} == {(train_side, train_side)}
    assert evaluation == {(32, 32)}  # evaluation feeds cache-size images, as before
    # the augmentation generator lives on the training device
    assert spy.devices and all(gen == batch for batch, gen in spy.devices)


@pytest.mark.parametrize(
    "spec",
    [
        {**TINY_SPEC, "scales": [16]},
        {"name": "eff", "architecture": "efficientnet_b0", "scales": [32], "pretrained": "none"},
    ],
    ids=["multiscale_resnet", "efficientnet_b0"],
)
def test_resizing_first_is_what_the_model_does_itself(spec):
    """The engine's resize matches the model's `Preprocess`: pre-resized input gives the same
    logits as cache-size input, whose internal resize it replaces."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    scale = spec["scales"][0]
    x = torch.rand((4, 1, 2 * scale, 2 * scale), generator=torch.Generator().manual_seed(1))
    small = engine.resize_batch(x, scale)
    assert small.shape[-2:] == (scale, scale)
    with torch.no_grad():
        torch.testing.assert_close(model(small), model(x), rtol=1e-4, atol=1e-5)
    assert engine.resize_batch(small, scale) is small  # already there: untouched
    assert engine.train_input_size(model, 2 * scale) == scale
    assert engine.train_input_size(model, scale) is None


# ---------------------------------------------------------------- item 6: prefetch depth


class InstantPool:
    """A ThreadPoolExecutor stand-in that runs jobs at submit time and counts submissions."""

    submitted = 0

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        InstantPool.submitted += 1
        future: Future = Future()
        future.set_result(fn(*args))
        return future


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_prefetch_keeps_threads_plus_one_batches_in_flight(monkeypatch, threads):
    monkeypatch.setattr(training_data, "ThreadPoolExecutor", InstantPool)
    InstantPool.submitted = 0
    images = np.arange(40 * 2 * 2, dtype=np.uint8).reshape(40, 2, 2)
    labels = np.arange(40, dtype=np.float32)[:, None]
    jobs = [np.arange(i, i + 4)[::-1] for i in range(0, 40, 4)]
    in_flight = []
    out = []
    for i, (xb, yb) in enumerate(engine._prefetch(jobs, images, labels, threads)):
        # read or being read while batch i trains: submitted, not yet handed out
        in_flight.append(InstantPool.submitted - (i + 1))
        out.append(yb[:, 0].tolist())
        assert np.array_equal(xb, images[yb[:, 0].astype(int)])
    assert max(in_flight) == threads + 1
    assert out == [sorted(j.tolist()) for j in jobs]  # in order, sorted within a batch


# ---------------------------------------------------------------- item 6: accumulation


class FixedStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (eval-mode BN): the model
    then has no batch-size-dependent layer, so accumulation must reproduce the full batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def fixed_stats_bn(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                fixed = FixedStatsBatchNorm2d(child.num_features, eps=child.eps)
                fixed.load_state_dict(child.state_dict())
                setattr(module, name, fixed)
    return model


def test_accumulation_gives_the_full_batch_update_and_counts_optimiser_steps(
    tmp_path, monkeypatch, caplog
):
    capture_models(monkeypatch, fixed_stats_bn)
    cache = blob_cache(n_train=32, n_val=16)
    augment = make_augmenter({"rotation_degrees": 5.0, "noise_std": 0.02})
    results, steps = {}, {}
    for accumulation in (1, 2, 4):
        calls: list[tuple[int, int]] = []
        params = tiny_params(
            tmp_path,
            epochs=1,
            batch_size=16,
            accumulation_steps=accumulation,
            # Adam with a large eps moves weights in proportion to the gradient (see the DDP
            # test); cosine makes the learning rate depend on the step count
            optimizer={"eps": 1.0},
            schedule={"name": "cosine", "warmup_epochs": 0},
        )
        with caplog.at_level(logging.WARNING, logger="rare_cxr"):
            results[accumulation] = fit(
                TINY_SPEC,
                cache,
                augment,
                params,
                callbacks=TrainingCallbacks(on_step=lambda e, s, c=calls: c.append((e, s))),
            )
        steps[accumulation] = calls
    # part of the training fingerprint (it changes BatchNorm statistics): each value trains
    # afresh, and the log names the key
    assert "training.accumulation_steps: 1 -> 2" in caplog.text
    assert "training.accumulation_steps: 2 -> 4" in caplog.text
    reference = results[1]
    assert steps[1] == steps[2] == steps[4] == [(0, 0), (0, 1)]  # one per global batch
    for accumulation in (2, 4):
        result = results[accumulation]
        assert result.history["lr"].tolist() == reference.history["lr"].tolist()
        assert result.history["train_loss"].iloc[0] == pytest.approx(
            reference.history["train_loss"].iloc[0], rel=1e-5
        )
        for key, value in reference.state_dict.items():
            if value.is_floating_point():
                torch.testing.assert_close(
                    result.state_dict[key],
                    value,
                    rtol=1e-4,
                    atol=1e-6,
                    msg=lambda m, k=key, a=accumulation: f"accumulation {a}, {k}: {m}",
                )


def test_micro_batches_split_the_sorted_global_batch_before_the_ranks():
    batch = np.random.default_rng(0).permutation(16)
    assert [m.tolist() for m in engine.micro_batches(batch, 1, 0, 1)] == [list(range(16))]
    assert [m.tolist() for m in engine.micro_batches(batch, 1, 0, 2)] == [
        list(range(8)),
        list(range(8, 16)),
    ]
    # 2 ranks: rank r's k-th micro-batch is its half of global micro-batch k
    assert [m.tolist() for m in engine.micro_batches(batch, 2, 1, 2)] == [
        [4, 5, 6, 7],
        [12, 13, 14, 15],
    ]
    # a short last batch is kept only if it splits into >= 2 images per rank and micro-batch
    order = np.arange(20)
    assert [len(b) for b in engine.batches_for(order, 8, 1, 2)] == [8, 8, 4]
    assert [len(b) for b in engine.batches_for(order, 8, 2, 2)] == [8, 8]
    assert [len(b) for b in engine.batches_for(order, 8, 2, 1)] == [8, 8, 4]
