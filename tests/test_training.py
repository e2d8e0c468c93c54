"""Training loop: losses, schedule, parameter validation, learning, NaN guard, resume, DDP.

Everything runs on tiny in-memory image caches (`FakeCache`, same attributes as
`rare_cxr.image_cache.ImageCache`), 32 px images and resnet18, so the file stays fast on 2 cores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from rare_cxr.findings import FINDINGS
from rare_cxr.training import TrainingCallbacks, fit, validate_training_params
from rare_cxr.training.losses import MultiLabelLoss, balanced_pos_weight
from rare_cxr.training.schedule import LRSchedule

HISTORY_COLUMNS = [
    "epoch",
    "stage",
    "train_loss",
    "val_loss",
    "val_macro_auroc",
    *[f"val_auroc_{f}" for f in FINDINGS],
    "val_acc",
    "val_recall",
    "val_precision",
    "val_f1",
    "lr",
    "img_per_s",
    "training_id",
]


class FakeSplit:
    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, offset: int) -> None:
        self.name = name
        self.images = images
        n = len(images)
        table = pd.DataFrame(
            {
                "image_id": [f"{offset + i:08d}_000.png" for i in range(n)],
                "patient_id": np.arange(offset, offset + n),
            }
        )
        for k, f in enumerate(FINDINGS):
            table[f] = labels[:, k].astype(np.int8)
        self.table = table
        self.labels = labels.astype(np.float32)


class FakeCache:
    """In-memory stand-in for `rare_cxr.image_cache.ImageCache` (the documented API)."""

    def __init__(self, splits: dict[str, FakeSplit], size: int) -> None:
        self._splits = splits
        self.size = size
        self.findings = list(FINDINGS)
        self.split_names = list(splits)

    def split(self, name: str) -> FakeSplit:
        return self._splits[name]


def blob_cache(
    n_train: int = 96, n_val: int = 48, n_test: int = 16, size: int = 32, seed: int = 0
) -> FakeCache:
    """Easy task: Atelectasis ⇔ bright blob top-left, Cardiomegaly ⇔ bright blob bottom-right."""
    rng = np.random.default_rng(seed)
    splits, offset = {}, 0
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = np.zeros((n, len(FINDINGS)), np.float32)
        labels[:, 0] = rng.random(n) < 0.4
        labels[:, 1] = rng.random(n) < 0.3
        imgs = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
        q = size // 2
        for i in range(n):
            if labels[i, 0]:
                imgs[i, 2 : q - 2, 2 : q - 2] = 230
            if labels[i, 1]:
                imgs[i, q + 2 : size - 2, q + 2 : size - 2] = 230
        splits[name] = FakeSplit(name, imgs, labels, offset)
        offset += n
    return FakeCache(splits, size)


TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "architecture": "multiscale_resnet",
    "backbone": "resnet18",
    "scales": [32],
    "pretrained": "none",
}


def tiny_params(tmp_path: Path, **over: Any) -> dict[str, Any]:
    params = {
        "epochs": 2,
        "patience": 2,
        "batch_size": 16,
        "eval_batch_size": 32,
        "device": "cpu",
        "progress_bar": False,
        "resume_dir": str(tmp_path / "resume"),
        "loader_threads": 0,
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_epochs": 0},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    return params


# ---------------------------------------------------------------- losses and schedule


def test_balanced_pos_weight_is_neg_over_pos_capped_and_safe_for_zero_positives():
    labels = np.zeros((100, 3))
    labels[:10, 0] = 1  # 10 % -> 9
    labels[:1, 1] = 1  # 1 % -> 99 -> capped at 50
    w = balanced_pos_weight(labels, cap=50.0)
    assert w.tolist() == pytest.approx([9.0, 50.0, 1.0])


def test_a_capped_pos_weight_is_logged_with_its_balanced_value(caplog):
    labels = np.zeros((1000, len(FINDINGS)))
    labels[:2, FINDINGS.index("Hernia")] = 1  # balanced 499
    labels[:100, 0] = 1  # balanced 9: below the cap
    with caplog.at_level(logging.INFO, logger="rare_cxr.training.losses"):
        w = balanced_pos_weight(labels, cap=100.0)
    assert float(w[FINDINGS.index("Hernia")]) == 100.0
    assert "pos_weight capped at 100 (training.loss.pos_weight_cap) for Hernia (balanced 499)" in (
        caplog.text
    )
    assert "Atelectasis" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr.training.losses"):
        balanced_pos_weight(labels, cap=1000.0)  # conf/nih: the paper's uncapped weights
    assert "capped" not in caplog.text


def test_masked_loss_ignores_masked_findings_and_focal_down_weights_easy_examples():
    logits = torch.tensor([[5.0, -3.0], [0.0, 2.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = MultiLabelLoss(None)
    loss.set_mask(torch.tensor([1.0, 0.0]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y[:, 0])
    assert loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    bce = MultiLabelLoss(None)(logits, y)
    focal = MultiLabelLoss(None, kind="focal", gamma=2.0)(logits, y)
    assert focal < bce


def test_cosine_schedule_warms_up_then_decays():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(
        opt,
        1.0,
        {
            "name": "cosine",
            "warmup_epochs": 1,
            "min_lr_ratio": 0.1,
            "plateau_factor": 0.5,
            "plateau_patience": 0,
        },
        steps_per_epoch=4,
        epochs=3,
    )
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert lrs[4] > lrs[8] > lrs[11] >= 0.1 - 1e-9


# ---------------------------------------------------------------- parameter validation


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"optimizer": {"lr": 0}}, "training.optimizer.lr"),
        ({"batch_size": 0}, "training.batch_size"),
        ({"epochs": -1}, "training.epochs"),
        ({"patience": "x"}, "training.patience"),
        ({"schedule": {"name": "step"}}, "training.schedule.name"),
        ({"transfer": {"rare_findings": ["Hernai"]}}, "training.transfer.rare_findings"),
        ({"lerning_rate": 1}, "training.lerning_rate"),
        ({"accumulation_steps": 0}, "training.accumulation_steps"),
        ({"accumulation_steps": 1.5}, "training.accumulation_steps"),
        ({"batch_size": 16, "accumulation_steps": 3}, "training.accumulation_steps"),
        ({"batch_size": 16, "accumulation_steps": 16}, "training.accumulation_steps"),
    ],
)
def test_invalid_training_params_name_the_key(over, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_training_params(over)


def test_fit_validates_before_touching_data(tmp_path):
    class Untouchable:
        size = 32

        def split(self, name):  # pragma: no cover - must not be reached
            raise AssertionError("data touched before validation")

    with pytest.raises(ValueError, match=r"tiny\.model\.backbone"):
        fit({**TINY_SPEC, "backbone": "resnet19"}, Untouchable(), None, tiny_params(tmp_path))
    with pytest.raises(ValueError, match=r"tiny\.model\.scales"):
        fit({**TINY_SPEC, "scales": [0, 32]}, Untouchable(), None, tiny_params(tmp_path))
    with pytest.raises(ValueError, match=r"training\.optimizer\.lr"):
        fit(TINY_SPEC, Untouchable(), None, tiny_params(tmp_path, optimizer={"lr": -1}))


# ---------------------------------------------------------------- learning, NaN


@pytest.mark.slow
def test_validation_auroc_rises_above_chance_on_an_easy_task(tmp_path):
    cache = blob_cache()
    result = fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=3, patience=3))
    hist = result.history
    assert list(hist.columns) == HISTORY_COLUMNS
    assert len(hist) == 3 and hist["stage"].eq("single").all()
    assert hist["val_macro_auroc"].max() > 0.8
    assert result.metadata["metric"] == pytest.approx(hist["val_macro_auroc"].max())
    assert result.metadata["epoch"] == int(hist["val_macro_auroc"].idxmax()) + 1
    # training finished: the state is kept, marked finished, for reruns to reuse
    (state_file,) = (tmp_path / "resume" / "tiny").glob("*.pt")
    saved = torch.load(state_file, weights_only=True)
    assert saved["finished"] is True and "optimizer" not in saved
    assert saved["metadata"]["training_id"] == result.metadata["training_id"]


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_state(tmp_path):
    cache = blob_cache(n_train=48, n_val=16)

    def poison(epoch: int, step: int) -> None:
        if epoch == 1 and step == 0:
            with torch.no_grad():
                for p in model_ref[0].parameters():
                    p.fill_(float("nan"))

    model_ref: list[torch.nn.Module] = []
    from rare_cxr.training import engine

    real_build = engine.build_model

    def capture(spec, *a, **k):
        model = real_build(spec, *a, **k)
        model_ref.append(model)
        return model

    engine_build = pytest.MonkeyPatch()
    engine_build.setattr(engine, "build_model", capture)
    try:
        with pytest.raises(FloatingPointError, match=r"epoch 2 step 2") as err:
            fit(
                TINY_SPEC,
                cache,
                None,
                tiny_params(tmp_path, epochs=3),
                callbacks=TrainingCallbacks(on_step=poison),
            )
    finally:
        engine_build.undo()
    (state,) = (tmp_path / "resume" / "tiny").glob("*.pt")
    assert str(state) in str(err.value)
    saved = torch.load(state, weights_only=True)
    assert saved["finished"] is False
    assert saved["global_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_two_stage_transfer_trains_common_then_all(tmp_path):
    cache = blob_cache(n_train=48, n_val=24)
    params = tiny_params(
        tmp_path,
        epochs=1,
        transfer={
            "two_stage": True,
            "rare_findings": ["Cardiomegaly", "Hernia"],
            "stage1_epochs": 1,
            "stage2_targets": "all",
            "frozen_trunk_epochs": 1,
        },
    )
    result = fit(TINY_SPEC, cache, None, params)
    assert result.history["stage"].tolist() == ["common", "all"]
    assert result.metadata["stage"] == "all"
    assert result.metadata["metric_name"] == "val_macro_auroc"


# ---------------------------------------------------------------- training state: reuse, resume


def _state_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "resume" / "tiny").glob("*.pt"))


def test_finished_training_is_reused_and_reuse_can_be_switched_off(tmp_path, caplog):
    cache = blob_cache(n_train=32, n_val=16)
    first = fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        again = fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1))
    assert "training already finished for this configuration" in caplog.text
    assert "tiny epoch" not in caplog.text  # not one epoch trained
    assert again.metadata["training_id"] == first.metadata["training_id"]
    for key, value in first.state_dict.items():
        assert torch.equal(value, again.state_dict[key])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        retrained = fit(
            TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1, reuse_finished=False)
        )
    assert "tiny epoch 1" in caplog.text
    assert retrained.metadata["training_id"] != first.metadata["training_id"]


@pytest.mark.parametrize(
    ("content", "logged"),
    [
        (b"\x00garbage, e.g. a file truncated by a full disk", "unreadable training state"),
        ([1, 2, 3], "not a rare-cxr training state"),
        ({"format": 2, "finished": False, "fingerprint": "x"}, "malformed training state"),
    ],
)
def test_corrupt_or_foreign_state_gives_a_logged_fresh_start(tmp_path, caplog, content, logged):
    cache = blob_cache(n_train=32, n_val=16)
    fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1))
    (state,) = _state_files(tmp_path)
    if isinstance(content, bytes):
        state.write_bytes(content)
    else:
        torch.save(content, state)
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        result = fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1))
    assert logged in caplog.text and "starting afresh" in caplog.text
    assert len(result.history) == 1
    assert torch.load(state, weights_only=True)["finished"] is True  # replaced by a good one


def test_changed_settings_start_afresh_naming_what_changed_and_keep_the_old_state(tmp_path, caplog):
    cache = blob_cache(n_train=32, n_val=16)
    fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1))
    with caplog.at_level(logging.WARNING, logger="rare_cxr"):
        fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1, batch_size=8))
    assert "training.batch_size: 16 -> 8" in caplog.text
    assert len(_state_files(tmp_path)) == 2  # the other configuration's state is kept

    caplog.clear()  # the data and the augmentation policy are part of the fingerprint too
    from rare_cxr.pipelines.training.nodes import make_augmenter

    other_labels = blob_cache(n_train=32, n_val=16, seed=1)
    with caplog.at_level(logging.WARNING, logger="rare_cxr"):
        fit(TINY_SPEC, other_labels, None, tiny_params(tmp_path, epochs=1))
        fit(
            TINY_SPEC,
            cache,
            make_augmenter({"rotation_degrees": 3.0}),
            tiny_params(tmp_path, epochs=1),
        )
    assert "data.arrays" in caplog.text and "augmentation" in caplog.text
    assert len(_state_files(tmp_path)) == 4


def test_max_steps_per_epoch_caps_the_optimiser_steps_and_is_fingerprinted(tmp_path):
    """The benchmark cap (conf/rehearsal): 96 training images in batches of 16 are 6 steps; a
    cap of 2 makes 2 per epoch (32 images seen), and the capped training is its own state."""
    cache = blob_cache(n_train=96, n_val=16)
    steps: list[tuple[int, int]] = []
    on_step = TrainingCallbacks(on_step=lambda epoch, step: steps.append((epoch, step)))
    fit(TINY_SPEC, cache, None, tiny_params(tmp_path, max_steps_per_epoch=2), callbacks=on_step)
    assert steps == [(0, 0), (0, 1), (1, 0), (1, 1)]
    steps.clear()
    fit(TINY_SPEC, cache, None, tiny_params(tmp_path, epochs=1), callbacks=on_step)
    assert steps == [(0, s) for s in range(6)]  # uncapped: not the capped state reused
    assert len(_state_files(tmp_path)) == 2
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        validate_training_params({"max_steps_per_epoch": 0})


def test_a_full_disk_while_streaming_the_training_state_names_the_file_and_leaves_nothing(
    tmp_path, monkeypatch
):
    """The state is streamed into its file (no in-memory copy, issue 19): a full disk part-way
    is an OSError naming the state file, and no partial file or temporary remains."""
    import errno

    from rare_cxr.atomic import AtomicWriter
    from rare_cxr.training.checkpointing import TrainingStateStore

    real_write = AtomicWriter.write

    def full_after_1k(self, data):  # type: ignore[no-untyped-def]
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    store = TrainingStateStore(tmp_path / "states")
    state = {"model": {"w": torch.zeros(10_000)}, "finished": False}
    monkeypatch.setattr(AtomicWriter, "write", full_after_1k)
    with pytest.raises(OSError, match=r"training state .*\.pt") as err:
        store.save("abc", state)
    assert "MB free" in str(err.value)
    # the folder the write created is removed with its temporary
    assert not (tmp_path / "states").exists() or not list((tmp_path / "states").iterdir())
    monkeypatch.undo()
    saved = torch.load(store.save("abc", state), weights_only=True)
    assert saved["fingerprint"] == "abc" and torch.equal(saved["model"]["w"], torch.zeros(10_000))


def test_the_optimiser_is_fused_adam_with_the_same_update_as_the_default(tmp_path, monkeypatch):
    """Peak memory (VGG16's, docs/benchmarks.md): the trainer builds fused Adam on CPU (no
    weight-sized temporaries), which steps a model as the default Adam does, and frees the
    gradients after an epoch's last step (none is left beside validation and the saved state)."""
    built: list[tuple[dict[str, Any], torch.optim.Optimizer]] = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            built.append((kwargs, self))

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    fit(TINY_SPEC, blob_cache(n_train=32, n_val=16), None, tiny_params(tmp_path, epochs=1))
    assert [kwargs.get("fused") for kwargs, _ in built] == [True]
    stepped = [p for group in built[0][1].param_groups for p in group["params"]]
    assert stepped and all(p.grad is None for p in stepped)
    monkeypatch.undo()

    def three_steps(**kwargs: Any) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4, **kwargs)
        x, y = torch.randn(12, 8), torch.rand(12, 3).round()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    for fused, default in zip(three_steps(fused=True), three_steps(), strict=True):
        torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)
