"""The training loop shared by every model: data from the image cache, augmentation on device,
Adam + schedule, balanced BCE/focal loss, early stopping on validation macro AUROC, resume,
AMP/channels_last/compile on GPU, DDP, and a NaN guard.

`fit` is a plain function of (model spec, image cache, augmenter, training parameters) so it can
run inside the Kedro node, in DDP worker processes, in the benchmark and in tests alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

# The submodules themselves, not through the package: `rare_cxr.training` re-exports this
# module's `fit`, so importing the package from here would be an import cycle.
import rare_cxr.training.checkpointing as checkpointing  # noqa: PLR0402
import rare_cxr.training.decoupling as decoupling  # noqa: PLR0402
import rare_cxr.training.distributed as distributed  # noqa: PLR0402
from rare_cxr.findings import FINDINGS
from rare_cxr.models import NORMALISATION, build_model, validate_model_spec
from rare_cxr.models.common import make_pooling_deterministic
from rare_cxr.progress import progress as progress_bar
from rare_cxr.training.config import TrainingParams, training_params
from rare_cxr.training.data import (  # the data path (re-exported: tests, benchmarks)
    TrainingData,
    _prefetch,
    _to_device,
    batches_for,
    epoch_order,
    micro_batches,
    resize_batch,
    sample_weights,
    to_batch,
    train_input_size,
)
from rare_cxr.training.losses import MultiLabelLoss, build_loss, loss_settings
from rare_cxr.training.metrics import validation_metrics
from rare_cxr.training.schedule import LRSchedule

logger = logging.getLogger(__name__)

Augment = Callable[..., torch.Tensor]


@dataclass
class TrainingCallbacks:
    """Hooks for tests and tools: called on every rank after each step / epoch."""

    on_step: Callable[[int, int], None] | None = None  # (epoch, step)
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None  # (epoch, history row)


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class Stage:
    name: str  # "single", or "common" then "all"/"rare" for two-stage transfer; then "crt"
    epochs: int
    targets: list[int]  # finding indices the loss and the monitored metric use
    frozen_epochs: int = 0
    # classifier re-training (decoupling.py): head only, class-aware sampling, plain BCE
    crt: bool = False


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; under DDP each rank takes its own GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.device: cuda requested but no CUDA device is available")
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds python, numpy and torch; deterministic mode also forbids nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def amp_dtype(cfg: TrainingParams | Mapping[str, Any], device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it (no scaler needed), else fp16; None = full fp32."""
    cfg = training_params(cfg)  # an instance passes through
    enabled = cfg.amp if cfg.amp != "auto" else device.type == "cuda"
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    *,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta_hflip: bool = False,
    labels: np.ndarray | None = None,
    criterion: nn.Module | None = None,
    progress_desc: str | None = None,
) -> tuple[np.ndarray, float]:
    """Sigmoid probabilities `[N, 14]` (and mean loss when labels are given), in eval mode.

    `progress_desc` names a progress bar over the batches (`rare_cxr.progress`); None: no bar.
    """
    was_training = model.training
    model.eval()
    probs, loss_sum, n = [], 0.0, 0
    starts = range(0, len(images), batch_size)
    with progress_bar(
        total=len(starts), desc=progress_desc or "", unit="batch", enabled=bool(progress_desc)
    ) as bar:
        for start in starts:
            x = to_batch(images[start : start + batch_size], device, channels_last)
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                logits = model(x).float()
                if tta_hflip:
                    logits_flip = model(torch.flip(x, dims=[-1])).float()
            p = torch.sigmoid(logits)
            if tta_hflip:
                p = 0.5 * (p + torch.sigmoid(logits_flip))
            if labels is not None and criterion is not None:
                y = torch.as_tensor(np.array(labels[start : start + batch_size]), device=device)
                loss_sum += float(criterion(logits, y)) * len(x)
            n += len(x)
            probs.append(p.cpu().numpy())
            bar.update()
    model.train(was_training)
    out = np.concatenate(probs) if probs else np.zeros((0, len(FINDINGS)), np.float32)
    return out.astype(np.float32), (loss_sum / n if n and labels is not None else float("nan"))


def plan_stages(cfg: TrainingParams | Mapping[str, Any], train_labels: np.ndarray) -> list[Stage]:
    """One stage, or the two-stage rare-finding transfer of the issue (§4); then, with
    `crt.epochs` > 0, classifier re-training on the last stage's targets, every epoch frozen.

    `stage2_targets: rare` keeps the trunk frozen for the WHOLE of stage 2: only the head
    learns, on the rare findings' loss. Why: the report scores all 14 findings, and a trunk
    trained for the rare findings alone would leave the common findings' head rows matched to
    features that no longer exist. With the trunk frozen (and the head's weight decay off in
    such masked frozen epochs, `_Trainer._start_epoch`) the common findings' logits stay the
    stage-1 model's exactly (concat/mean fusion; `fusion: attention` has the attention in the
    head, which learns and moves them)."""
    cfg = training_params(cfg)  # an instance passes through
    all_idx = list(range(len(FINDINGS)))
    tr = cfg.transfer
    if not tr.two_stage:
        stages = [Stage("single", cfg.epochs, all_idx)]
    else:
        rare = sorted(FINDINGS.index(n) for n in tr.rare_findings)
        common = [i for i in all_idx if i not in rare]
        if tr.stage2_targets == "all":
            second = Stage("all", cfg.epochs, all_idx, tr.frozen_trunk_epochs)
        else:
            second = Stage("rare", cfg.epochs, rare, cfg.epochs)
        stages = [Stage("common", tr.stage1_epochs, common), second]
    crt_epochs = cfg.crt.epochs
    if crt_epochs:
        stages.append(
            Stage(decoupling.CRT_STAGE, crt_epochs, stages[-1].targets, crt_epochs, crt=True)
        )
    return stages


# Devices with PyTorch's fused Adam kernel (torch >= 2.4 on CPU); elsewhere the default applies.
# The fused kernel updates each weight in place; the default (foreach) builds temporaries as
# large as every weight at once: VGG16's one-step peak RSS was 1.19 GB higher with it (2,774 vs
# 1,586 MB above the built model, 32 px, CPU; docs/benchmarks.md, "NIH-size rehearsal"). Same
# update rule (tested); not fingerprinted, so a state saved with either resumes with the other.
_FUSED_ADAM_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})

# Training parameters that do not change what is learned: excluded from the state fingerprint,
# so that e.g. moving a resumed run from the CPU to a GPU, or turning the progress bar off,
# continues it instead of starting afresh.
NON_RESULT_KEYS = frozenset(
    {
        "progress_bar",
        "resume",
        "reuse_finished",
        "device",
        "loader_threads",
        "resume_dir",
        "n_seeds",  # each seed is its own training; `seed` itself is fingerprinted
        # prediction-only: test-time flipping is applied by `predict`, never during validation,
        # and the evaluation batch only sets how many images go through the (eval-mode) network
        # at once. Turning TTA on, or lowering the batch after an out-of-memory error, re-runs
        # prediction (the `predict` node always runs) and retrains nothing.
        "tta_hflip",
        "eval_batch_size",
    }
)


def data_fingerprint(cache: Any) -> dict[str, Any]:
    """What the training data is: the image cache's content and label fingerprints.

    A built `ImageCache` records both: the content fingerprint hashes the checksums of the
    decoded pixels (never a path or a file date, so a moved or re-mounted download reuses every
    finished training), the label fingerprint the label tables. Other cache-like objects
    (tests, benchmarks) are hashed from their train/val arrays.
    """
    meta = getattr(cache, "meta", None)
    if isinstance(meta, Mapping) and meta.get("fingerprint"):
        return {
            "pixels": str(meta["fingerprint"]),
            "labels": str(meta.get("table_fingerprint")),
            "size": int(cache.size),
        }
    digest = hashlib.sha256()
    for name in ("train", "val"):
        part = cache.split(name)
        digest.update(np.ascontiguousarray(part.images).tobytes())
        digest.update(np.ascontiguousarray(part.labels, dtype=np.float32).tobytes())
    return {"arrays": digest.hexdigest(), "size": int(cache.size)}


def result_settings(cfg: TrainingParams | Mapping[str, Any]) -> dict[str, Any]:
    """The training parameters a result depends on: every key but `NON_RESULT_KEYS`, of
    `loss` only the selected loss's keys (`losses.LOSS_KEYS`), and `crt` only when it is on.
    So a key that the configuration does not read (an `asl_*` key under `bce`, the cRT block
    with `crt.epochs: 0`) retrains nothing, and the fingerprints of trainings made before the
    long-tail keys existed are unchanged (they are reused)."""
    plain = cfg.model_dump() if isinstance(cfg, TrainingParams) else dict(cfg)
    out = {k: v for k, v in plain.items() if k not in NON_RESULT_KEYS}
    if "loss" in out:
        out["loss"] = loss_settings(out["loss"])
    if "crt" in out and not out["crt"]["epochs"]:
        del out["crt"]
    if out.get("max_steps_per_epoch", 0) is None:  # unset: fingerprints from before it existed
        del out["max_steps_per_epoch"]
    return out


def training_settings(
    spec: Mapping[str, Any],
    cfg: TrainingParams,
    cache: Any,
    augment: Augment | None,
    world: int,
) -> dict[str, Any]:
    """Everything a training's result depends on (the fingerprinted settings, plain data: the
    fingerprint hashes their JSON)."""
    policy = getattr(augment, "policy", None)
    from rare_cxr.models import normalisation_for

    return {
        "model": dict(spec),
        # what the model is fed: part of the result even when the spec does not say it
        "normalisation": normalisation_for(spec["architecture"]),
        "training": result_settings(cfg),
        "data": data_fingerprint(cache),
        "augmentation": dict(policy) if isinstance(policy, Mapping) else repr(augment),
        "processes": world,
        "findings": list(FINDINGS),
    }


def _head_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.head().parameters()}


def trunk_modules(model: nn.Module) -> list[nn.Module]:
    """The trunk = every module outside `model.head()` that contains no part of the head:
    convolutions, BatchNorm with its running statistics, and the parameter-free modules whose
    behaviour depends on the train/eval mode -- Dropout (VGG's classifier before its last
    layer, EfficientNet's before its classifier, the multi-scale model's before `fc`) and
    torchvision's StochasticDepth. In a frozen epoch they all go to eval mode, so the frozen
    part is a fixed, deterministic function and the head learns on the features it will see
    at test time. Containers of the head (the model itself, a Sequential holding the
    classifier) stay out: their `eval()` would reach the head."""
    head = {id(m) for m in model.head().modules()}
    named = list(model.named_modules())
    head_names = [name for name, m in named if id(m) in head]
    holders = {name.rsplit(".", k)[0] for name in head_names for k in range(name.count(".") + 1)}
    holders.add("")  # the model itself
    return [m for name, m in named if id(m) not in head and name not in holders]


def set_trunk_frozen(
    modules: Sequence[nn.Module], params: Sequence[nn.Parameter], frozen: bool
) -> None:
    """Frozen: the trunk's modules in eval mode (BatchNorm uses and keeps its running
    statistics) and its parameters without gradients (autograd records nothing before the head,
    so backward runs through the head only). Unfrozen: gradients back on; the train/eval mode
    is restored by the `model.train()` every epoch starts with."""
    for p in params:
        p.requires_grad_(not frozen)
    if frozen:
        for m in modules:
            m.eval()


def _all_reduce_mean_grads(params: Sequence[nn.Parameter], world: int) -> None:
    """DDP's gradient averaging, by hand, for the head-only (frozen-trunk) steps: those run the
    unwrapped model, because DDP expects a gradient for every parameter it was built with."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def fit(
    model_spec: Mapping[str, Any],
    cache: Any,
    augment: Augment | None,
    params: TrainingParams | Mapping[str, Any] | None,
    *,
    callbacks: TrainingCallbacks | None = None,
    rank: int = 0,
    world: int = 1,
    state_store: checkpointing.TrainingStateStore | None = None,
) -> FitResult | None:
    """Train one model; returns the best-on-validation weights + metadata + history on rank 0
    (None on other ranks).

    `state_store` is the folder of training states (the catalog's `<model>.training_state`);
    without it, `training.resume_dir/<model name>` is used when set, else nothing is persisted.
    """
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    try:
        return _fit(
            model_spec,
            cache,
            augment,
            params,
            callbacks=callbacks,
            rank=rank,
            world=world,
            state_store=state_store,
        )
    finally:
        # deterministic mode is process-global: do not leak it into whatever runs next
        torch.use_deterministic_algorithms(previous_determinism)


def _fit(
    model_spec: Mapping[str, Any],
    cache: Any,
    augment: Augment | None,
    params: TrainingParams | Mapping[str, Any] | None,
    *,
    callbacks: TrainingCallbacks | None,
    rank: int,
    world: int,
    state_store: checkpointing.TrainingStateStore | None,
) -> FitResult | None:
    """Check everything, reuse a finished training of this configuration, else train."""
    spec = validate_model_spec(model_spec)
    cfg = training_params(params)  # validated once; an instance passes through unchanged
    _check_batch_split(cfg, world)
    name = spec["name"]
    data = TrainingData.from_cache(cache, name)

    # training state: reuse a finished training, or resume an unfinished one
    settings = training_settings(spec, cfg, cache, augment, world)
    fp = checkpointing.fingerprint(settings)
    store = _state_store(cfg, name, state_store)
    main = _main_training(cfg, settings)
    main_state = _finished_main(name, cfg, store, fp, main, rank=rank)
    state = store.load(fp, settings) if store is not None and main_state is None else None
    if store is not None and state is not None and state.get("finished"):
        if cfg.reuse_finished:
            return _reuse_finished(name, state, store.path(fp), rank, cfg)
        logger.info("%s: training.reuse_finished is false: training again", name)
        state = None

    trainer = _Trainer(
        spec,
        cfg,
        data,
        augment,
        callbacks=callbacks or TrainingCallbacks(),
        rank=rank,
        world=world,
        store=store,
        fingerprint=fp,
        settings=settings,
        main=main,
    )
    return trainer.run(state, main_state)


def _main_training(
    cfg: TrainingParams, settings: dict[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    """With cRT on: the fingerprint and settings of the same configuration without cRT, whose
    result the main stages produce (they do not read `training.crt`). None with cRT off."""
    if not cfg.crt.epochs:
        return None
    main_settings = {
        **settings,
        "training": result_settings(decoupling.main_training_config(cfg)),
    }
    return checkpointing.fingerprint(main_settings), main_settings


def _finished_main(
    name: str,
    cfg: TrainingParams,
    store: checkpointing.TrainingStateStore | None,
    fp: str,
    main: tuple[str, dict[str, Any]] | None,
    *,
    rank: int,
) -> dict[str, Any] | None:
    """The finished main training to start cRT from, when this configuration has no state of
    its own yet (a new or changed cRT block): its main stages are not trained again."""
    if store is None or main is None or not cfg.reuse_finished or store.path(fp).is_file():
        return None
    main_fp, main_settings = main
    if not store.path(main_fp).is_file():
        return None
    state = store.load(main_fp, main_settings)
    if state is None or not state.get("finished"):
        return None
    if rank == 0:
        logger.info(
            "%s: the main training of this configuration already finished (%s, best epoch %s): "
            "starting classifier re-training (cRT) from its best weights, no main epoch is "
            "trained",
            name,
            store.path(main_fp),
            state["metadata"].get("epoch"),
        )
    return state


def _check_batch_split(cfg: TrainingParams, world: int) -> None:
    """The global batch must split over the DDP processes and accumulation micro-batches."""
    if cfg.batch_size % world:
        raise ValueError(
            f"training.batch_size ({cfg.batch_size}) must be divisible by the "
            f"number of DDP processes ({world})"
        )
    accumulation = cfg.accumulation_steps
    if cfg.batch_size % (world * accumulation) or cfg.batch_size // (world * accumulation) < 2:
        raise ValueError(
            f"training.batch_size ({cfg.batch_size}) must split into "
            f"training.accumulation_steps ({accumulation}) micro-batches x {world} DDP "
            "process(es) of at least 2 images each"
        )


def _state_store(
    cfg: TrainingParams, name: str, state_store: checkpointing.TrainingStateStore | None
) -> checkpointing.TrainingStateStore | None:
    """Where training states live: the catalog's folder, else `training.resume_dir/<name>`;
    None (nothing persisted) when neither is set or `training.resume` is off."""
    if not cfg.resume:
        return None
    if state_store is None and cfg.resume_dir:
        return checkpointing.TrainingStateStore(Path(cfg.resume_dir) / name)
    return state_store


def _reuse_finished(
    name: str, state: Mapping[str, Any], path: Path, rank: int, cfg: TrainingParams
) -> FitResult | None:
    """The result of a finished training of the same fingerprint; no epoch is trained.

    The settings that do not change what is learned (`NON_RESULT_KEYS`: device, test-time
    flipping, evaluation batch...) may differ from the run that trained it: the metadata
    records this run's values, so the checkpoint and the model bundle describe how its
    predictions are made now (e.g. `tta_hflip: true` after a training without it).
    """
    if rank == 0:
        logger.info(
            "%s: training already finished for this configuration (%s, best epoch %s): "
            "reusing its result, no epoch is trained (training.reuse_finished=false "
            "trains again)",
            name,
            path,
            state["metadata"].get("epoch"),
        )
    if rank != 0:
        return None
    history_frame = pd.DataFrame(state["history"])
    history_frame["training_id"] = state["metadata"].get("training_id")
    metadata = dict(state["metadata"])
    # the same fingerprint: every key the result depends on is equal, the others (device,
    # TTA, keys of another loss, an unused cRT block) are this run's
    metadata["train_params"] = cfg.model_dump()
    return FitResult(dict(state["best_state"]), metadata, history_frame)


def _metric_name(stage: Stage) -> str:
    """The monitored metric: macro AUROC over the stage's target findings."""
    return "val_macro_auroc" + ("" if len(stage.targets) == len(FINDINGS) else f"_{stage.name}")


@dataclass
class _FitState:
    """Where a training stands between epochs: with the model, optimiser, scaler, schedule and
    RNG states, exactly what the resumable training state stores (`_Trainer._save_state`)."""

    training_id: str
    stage_index: int = 0
    epoch_in_stage: int = 0
    global_epoch: int = 0  # epochs completed, over all stages
    best_metric: float = float("nan")
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    schedule: dict[str, Any] | None = None  # a resumed stage's schedule, used once

    def track_best(self, monitored: float, model: nn.Module, patience: int) -> bool:
        """Best-on-validation tracking and early stopping after an epoch (before it is counted
        in `global_epoch`); True when the stage stops early. A NaN metric never improves, but
        the first epoch of a stage is always kept (there must be a best state)."""
        improved = self.best_state is None or (
            not math.isnan(monitored)
            and (math.isnan(self.best_metric) or monitored > self.best_metric)
        )
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = monitored, self.global_epoch + 1, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= patience

    def reset_best(self) -> None:
        """A new stage starts a fresh early-stopping record."""
        self.best_metric, self.best_state = float("nan"), None
        self.best_epoch, self.bad_epochs = -1, 0


@dataclass
class _Epoch:
    """One epoch's fixed choices and running totals. Not saved: an epoch is replayed whole."""

    index: int  # global epoch index, 0-based
    stage: Stage
    schedule: LRSchedule
    frozen: bool  # frozen-trunk epoch: the head trains alone
    model: nn.Module  # what the steps run (plain when frozen, else the DDP/compiled one)
    generator: torch.Generator  # the augmentation draws, on the training device
    loss_sum: torch.Tensor  # sum of per-image losses on this rank
    seen: int = 0  # images seen on this rank


class _Trainer:
    """One training: the parts fixed for its whole length (device, model, loss, optimiser, data,
    stages) and the loop over them -- stages (`_run_stage`), epochs (`_run_epoch`: train
    `_train_epoch` of steps `_train_step`, validate `_validate`, track the best, stage
    transition `_next_stage`, save `_save_state`), resume (`_restore`), result (`_finish`).

    Building it has the process-wide effects a training needs: the DDP process group, the
    seeds and the deterministic mode. Their order, and the order of every random draw, is
    part of the bit-exact resume contract: do not reorder.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        cfg: TrainingParams,
        data: TrainingData,
        augment: Augment | None,
        *,
        callbacks: TrainingCallbacks,
        rank: int,
        world: int,
        store: checkpointing.TrainingStateStore | None,
        fingerprint: str,
        settings: dict[str, Any],
        main: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        self.spec, self.cfg, self.data, self.augment = spec, cfg, data, augment
        self.main = main  # with cRT: (fingerprint, settings) of the main training alone
        self.name = spec["name"]
        self.callbacks, self.rank, self.world = callbacks, rank, world
        self.store, self.fingerprint, self.settings = store, fingerprint, settings
        self.state_path = store.path(fingerprint) if store is not None else None
        self.accumulation = cfg.accumulation_steps
        self.show_bar = cfg.progress_bar and rank == 0

        device = self.device = resolve_device(cfg.device, rank)
        if world > 1:
            distributed.init_process_group(rank, world, device)
        seed_everything(cfg.seed, cfg.deterministic)
        self.dtype = amp_dtype(cfg, device)
        self.channels_last = (cfg.channels_last is True) or (
            cfg.channels_last == "auto" and device.type == "cuda"
        )

        model = build_model(spec).to(device)
        if cfg.deterministic and device.type == "cuda":
            # adaptive average pooling has no deterministic CUDA backward (VGG16's 7x7 pool
            # would fail the first step): the equivalent plain pooling where one exists
            make_pooling_deterministic(model)
        if world > 1 and cfg.sync_batchnorm:
            # before the optimiser is built: conversion creates new BatchNorm parameter objects
            model = distributed.convert_sync_batchnorm(model, device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # the loss of the main stages, and the cRT stage's plain BCE (decoupling.py)
        self.main_criterion = build_loss(cfg.loss, data.train_labels).to(device)
        self.crt_criterion = MultiLabelLoss(None, "bce").to(device)
        self.criterion = self.main_criterion  # the current stage's (`_run_stage`)
        self.pos_weight = getattr(self.main_criterion, "pos_weight", None)
        head_ids = _head_parameter_ids(model)
        self.head_params = [p for p in model.parameters() if id(p) in head_ids]
        self.trunk_params = [p for p in model.parameters() if id(p) not in head_ids]
        self.trunk = trunk_modules(model)
        self.train_size = train_input_size(model, data.size)
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.trunk_params, "lr_multiplier": 1.0},
                {"params": self.head_params, "lr_multiplier": 1.0},
            ],
            lr=cfg.optimizer.lr,
            weight_decay=cfg.optimizer.weight_decay,
            eps=cfg.optimizer.eps,
            fused=device.type in _FUSED_ADAM_DEVICES,  # why: at _FUSED_ADAM_DEVICES
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.stages = plan_stages(cfg, data.train_labels)
        self.weights = (
            sample_weights(data.train_labels, cfg.oversample_rare.power)
            if cfg.oversample_rare.enabled
            else None
        )
        self.crt_weights = (
            decoupling.class_aware_weights(data.train_labels)
            if any(s.crt for s in self.stages)
            else None
        )
        # set by `_wrap_model`, after a resume has loaded the weights
        self.train_model: nn.Module = model
        self.ddp_model: nn.parallel.DistributedDataParallel | None = None

    # ---- the whole training --------------------------------------------------------------

    def run(
        self, state: Mapping[str, Any] | None, main_state: Mapping[str, Any] | None = None
    ) -> FitResult | None:
        """Train every stage from the start or from `state`, or only cRT after the finished
        main training `main_state`; the result on rank 0."""
        progress = self._restore(state) if main_state is None else self._after_main(main_state)
        self._wrap_model()
        while progress.stage_index < len(self.stages):
            self._run_stage(progress)
            progress.stage_index, progress.epoch_in_stage = progress.stage_index + 1, 0
        set_trunk_frozen(
            self.trunk, self.trunk_params, False
        )  # a frozen last epoch leaves no trace

        distributed.barrier()
        if self.rank != 0:
            return None
        return self._finish(progress)

    def _wrap_model(self) -> None:
        """DDP (gradients averaged over the ranks) and torch.compile around the model."""
        if self.world > 1:
            self.train_model = self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)

    # ---- resume --------------------------------------------------------------------------

    def _restore(self, state: Mapping[str, Any] | None) -> _FitState:
        """A fresh start, or the model/optimiser/scaler/RNG states and the progress of an
        unfinished training."""
        progress = _FitState(training_id=uuid.uuid4().hex[:12])
        if state is None:
            return progress
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        checkpointing.set_rng_state(state["rng"])
        progress = _FitState(
            training_id=str(state.get("training_id") or progress.training_id),
            stage_index=state["stage_index"],
            epoch_in_stage=state["epoch_in_stage"],
            global_epoch=state["global_epoch"],
            best_metric=state["best_metric"],
            best_state=state["best_state"],
            best_epoch=state["best_epoch"],
            bad_epochs=state["bad_epochs"],
            history=list(state["history"]),
            schedule=state["schedule"],
        )
        if self.rank == 0:
            stage = (
                self.stages[progress.stage_index].name
                if progress.stage_index < len(self.stages)
                else "all done"
            )
            logger.info(
                "%s: resuming from %s at epoch %d (stage %s)",
                self.name,
                self.state_path,
                progress.global_epoch + 1,
                stage,
            )
        return progress

    def _after_main(self, main: Mapping[str, Any]) -> _FitState:
        """The progress a cRT run has when its main stages end, rebuilt from the finished main
        training (what `_keep_main_result` saved, or a run without cRT): the same weights,
        history and epoch count, so the cRT epochs draw exactly what they draw in one go."""
        meta = main["metadata"]
        progress = _FitState(
            training_id=uuid.uuid4().hex[:12],
            stage_index=len(self.stages) - 2,
            global_epoch=len(main["history"]),
            best_metric=float(meta["metric"]),
            best_state=dict(main["best_state"]),
            best_epoch=int(meta["epoch"]),
            history=list(main["history"]),
        )
        self._next_stage(progress)
        progress.stage_index = len(self.stages) - 1
        return progress

    def _save_state(
        self, progress: _FitState, schedule: LRSchedule, next_stage: int, next_epoch: int
    ) -> None:
        """The resumable state after an epoch (rank 0 writes; all ranks hold the same)."""
        if self.rank != 0 or self.store is None:
            return
        self.store.save(
            self.fingerprint,
            {
                "finished": False,
                "settings": self.settings,
                "training_id": progress.training_id,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                # a new stage builds its own schedule
                "schedule": schedule.state_dict() if next_stage == progress.stage_index else None,
                "rng": checkpointing.rng_state(),
                "stage_index": next_stage,
                "epoch_in_stage": next_epoch,
                "global_epoch": progress.global_epoch,
                "best_metric": progress.best_metric,
                "best_state": progress.best_state,
                "best_epoch": progress.best_epoch,
                "bad_epochs": progress.bad_epochs,
                "history": progress.history,
            },
        )

    # ---- stages and their transitions ----------------------------------------------------

    def _run_stage(self, progress: _FitState) -> None:
        """The remaining epochs of the current stage, until its last or an early stop."""
        cfg = self.cfg
        stage = self.stages[progress.stage_index]
        self.criterion = self.crt_criterion if stage.crt else self.main_criterion
        mask = torch.zeros(len(FINDINGS), device=self.device)
        mask[stage.targets] = 1.0
        self.criterion.set_mask(None if len(stage.targets) == len(FINDINGS) else mask)
        base_lr = cfg.optimizer.lr
        if stage.crt and cfg.crt.lr is not None:
            base_lr = cfg.crt.lr
        # the schedule counts optimiser steps (global batches), never micro-batches
        steps_per_epoch = len(
            batches_for(
                np.arange(len(self.data.train_labels)),
                cfg.batch_size,
                self.world,
                self.accumulation,
            )
        )
        if cfg.max_steps_per_epoch:  # a benchmark's cap (conf/rehearsal)
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        schedule = LRSchedule(self.optimizer, base_lr, cfg.schedule, steps_per_epoch, stage.epochs)
        if progress.schedule is not None:
            schedule.load_state_dict(progress.schedule)
            progress.schedule = None
        stop = False
        while progress.epoch_in_stage < stage.epochs and not stop:
            stop = self._run_epoch(progress, stage, schedule)

    def _next_stage(self, progress: _FitState) -> None:
        """Stage 2 starts from the best stage-1 weights, with a fresh optimiser state,
        schedule (built by `_run_stage`) and early-stopping record. cRT also re-initialises
        the head (`crt.reinit_head`, from the seed) and starts a fresh GradScaler."""
        self.model.load_state_dict(progress.best_state)
        self.optimizer.state.clear()
        progress.reset_best()
        if self.stages[progress.stage_index + 1].crt:
            if self.cfg.crt.reinit_head:
                decoupling.reinit_head(self.model, self.cfg.seed * 7_727 + 1)
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    # ---- one epoch -----------------------------------------------------------------------

    def _run_epoch(self, progress: _FitState, stage: Stage, schedule: LRSchedule) -> bool:
        """Train, validate, keep the best, save the state; True when the stage stops early."""
        self.criterion.start_epoch(progress.epoch_in_stage)  # DRW's switch: a function of it
        epoch = self._start_epoch(progress, stage, schedule)
        elapsed = self._train_epoch(epoch)
        train_loss = float(epoch.loss_sum) / max(epoch.seen, 1)
        if self.world > 1:
            t = torch.tensor([train_loss], device=self.device)
            torch.distributed.all_reduce(t)
            train_loss = float(t) / self.world

        metrics, val_loss, monitored = self._validate(stage, progress.global_epoch)
        schedule.epoch_end(monitored)
        row = {
            "epoch": progress.global_epoch + 1,
            "stage": stage.name,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **metrics,
            "lr": schedule.lr,
            "img_per_s": epoch.seen * self.world / max(elapsed, 1e-9),
        }
        progress.history.append(row)
        stop = progress.track_best(monitored, self.model, self.cfg.patience)
        progress.global_epoch += 1
        progress.epoch_in_stage += 1
        next_stage, next_epoch = progress.stage_index, progress.epoch_in_stage
        if stop or progress.epoch_in_stage >= stage.epochs:
            next_stage, next_epoch = progress.stage_index + 1, 0
        logger.info(
            "%s epoch %d [%s]: train_loss %.4f val_loss %.4f %s %.4f (best %.4f @ %d) "
            "lr %.2e %.1f img/s%s",
            self.name,
            progress.global_epoch,
            stage.name,
            train_loss,
            val_loss,
            _metric_name(stage),
            monitored,
            progress.best_metric,
            progress.best_epoch,
            schedule.lr,
            row["img_per_s"],
            " -- early stop" if stop else "",
        )
        if progress.stage_index < next_stage < len(self.stages):
            if self.stages[next_stage].crt:
                self._keep_main_result(progress)
            self._next_stage(progress)
        self._save_state(progress, schedule, next_stage, next_epoch)
        if self.callbacks.on_epoch_end:
            self.callbacks.on_epoch_end(progress.global_epoch, row)
        return stop

    def _start_epoch(self, progress: _FitState, stage: Stage, schedule: LRSchedule) -> _Epoch:
        """Learning rate, seeds and train/frozen modes for the next epoch."""
        cfg, index = self.cfg, progress.global_epoch
        # A frozen-trunk epoch trains the head only: the trunk in eval mode (its BatchNorm
        # running statistics stay put) without gradients (backward stops at the head). Its
        # learning rate is 0 as well, so Adam leaves it alone whatever happens. Whether an
        # epoch is frozen is a function of (stage, epoch), so a resumed run freezes the same
        # epochs; the flags themselves are not state and are set afresh every epoch.
        frozen = progress.epoch_in_stage < stage.frozen_epochs
        self.optimizer.param_groups[0]["lr_multiplier"] = 0.0 if frozen else 1.0
        # A frozen epoch on a masked loss (stage2_targets: rare) must leave the masked findings'
        # head rows alone: their gradient is exactly 0, but Adam's L2 weight decay would still
        # shrink them towards 0 (by ~lr per step). Off for the head in such epochs only.
        masked = len(stage.targets) < len(FINDINGS)
        self.optimizer.param_groups[1]["weight_decay"] = (
            0.0 if frozen and masked else cfg.optimizer.weight_decay
        )
        schedule.apply()
        # Every random draw of an epoch derives from (seed, epoch): a resumed epoch replays
        # exactly what the interrupted one would have done. The augmentation generator lives
        # on the training device (no host-side draws or copies per batch); it is re-seeded
        # from (seed, epoch, rank) every epoch, so it has no state to save.
        torch.manual_seed(cfg.seed * 7919 + index)
        generator = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 104_729 + index * 131 + self.rank
        )
        self.train_model.train()
        set_trunk_frozen(self.trunk, self.trunk_params, frozen)
        return _Epoch(
            index=index,
            stage=stage,
            schedule=schedule,
            frozen=frozen,
            # head-only steps run the plain model: DDP expects a gradient for every parameter
            # it wraps (the head's gradients are averaged by hand), and a compiled graph
            # would recompile for the frozen flags
            model=self.model if frozen else self.train_model,
            generator=generator,
            loss_sum=torch.zeros((), device=self.device),
        )

    def _train_epoch(self, epoch: _Epoch) -> float:
        """Every optimiser step of the epoch, over this rank's share of the epoch's batches
        (read ahead by the loader threads); returns the seconds it took."""
        cfg, world = self.cfg, self.world
        weights = self.crt_weights if epoch.stage.crt else self.weights
        jobs = batches_for(
            epoch_order(len(self.data.train_labels), cfg.seed, epoch.index, weights),
            cfg.batch_size,
            world,
            self.accumulation,
        )
        if cfg.max_steps_per_epoch:  # a benchmark's cap (conf/rehearsal): the first steps
            jobs = jobs[: cfg.max_steps_per_epoch]
        rank_jobs = [micro_batches(j, world, self.rank, self.accumulation) for j in jobs]
        batches = _prefetch(
            [np.concatenate(micros) for micros in rank_jobs],
            self.data.train_images,
            self.data.train_labels,
            cfg.loader_threads,
            pin=self.device.type == "cuda",
        )
        t0 = time.perf_counter()
        with progress_bar(
            total=len(rank_jobs),
            desc=f"{self.name} epoch {epoch.index + 1} [{epoch.stage.name}]",
            unit="batch",
            enabled=self.show_bar,
        ) as bar:
            for step, (micros, (xb, yb)) in enumerate(zip(rank_jobs, batches, strict=True)):
                loss = self._train_step(epoch, step, micros, xb, yb)
                if not bar.disable:
                    rate = epoch.seen * world / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
                    bar.update()
                if self.callbacks.on_step:
                    self.callbacks.on_step(epoch.index, step)
        # The last step's gradients are spent: free them, so validation, the best-weights copy
        # and the saved state never sit beside a model-sized gradient (VGG16: 0.55 GB of peak
        # RSS; docs/benchmarks.md, "NIH-size rehearsal"). Each step frees the previous one's.
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # ---- one step ------------------------------------------------------------------------

    def _train_step(
        self,
        epoch: _Epoch,
        step: int,
        micros: list[np.ndarray],
        xb: np.ndarray | torch.Tensor,
        yb: np.ndarray | torch.Tensor,
    ) -> torch.Tensor:
        """One optimiser step on this rank's share `xb`/`yb` of one global batch, cut into
        `micros`; adds to the epoch's loss sum and image count; returns the last loss."""
        device, world = self.device, self.world
        # The rank's whole share goes to the device, is resized (single-scale models below
        # the cache size) and augmented at once -- the same draws whatever the accumulation
        # -- and is then split into its micro-batches.
        x_all = to_batch(xb, device, self.channels_last)
        y_all = _to_device(yb if isinstance(yb, torch.Tensor) else torch.from_numpy(yb), device)
        if self.train_size is not None:
            x_all = resize_batch(x_all, self.train_size)
        if self.augment is not None:
            x_all = self.augment(x_all, generator=epoch.generator)
        sizes = [len(m) for m in micros]
        pairs = (
            [(x_all, y_all)]
            if len(micros) == 1
            else list(zip(x_all.split(sizes), y_all.split(sizes), strict=True))
        )
        # One optimiser step per global batch. Each micro-batch's loss (a mean over its
        # images) is weighted by its share of the rank's batch, so the summed gradient is the
        # gradient of the whole batch's mean loss (accumulation_steps: 1 = no weighting at
        # all, bit for bit the plain step).
        self.optimizer.zero_grad(set_to_none=True)
        rank_batch = sum(sizes)
        for k, (x, y) in enumerate(pairs):
            # DDP: all-reduce once per optimiser step, after the last micro-batch
            sync = (
                self.ddp_model.no_sync()
                if self.ddp_model is not None and not epoch.frozen and k < len(micros) - 1
                else nullcontext()
            )
            with sync:
                with torch.autocast(
                    device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
                ):
                    logits = epoch.model(x)
                loss = self.criterion(logits.float(), y)
                self._check_finite(loss, epoch, step)
                scaled = loss if len(micros) == 1 else loss * (len(x) / rank_batch)
                self.scaler.scale(scaled).backward()
            epoch.loss_sum += loss.detach() * len(x)
            epoch.seen += len(x)
        if epoch.frozen and world > 1:
            _all_reduce_mean_grads(self.head_params, world)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        epoch.schedule.step()
        return loss

    def _check_finite(self, loss: torch.Tensor, epoch: _Epoch, step: int) -> None:
        """The NaN guard: a non-finite loss on any rank stops every rank, naming where; the
        state saved after the last completed epoch (`epoch.index` of them) is kept."""
        finite = (
            distributed.all_finite(bool(torch.isfinite(loss)), self.device)
            if self.world > 1
            else bool(torch.isfinite(loss))
        )
        if finite:
            return
        raise FloatingPointError(
            f"{self.name}: training loss is {loss.item()} at epoch "
            f"{epoch.index + 1} step {step + 1} (stage {epoch.stage.name}); "
            "training stopped. The last good state (end of epoch "
            f"{epoch.index}) is kept at "
            f"{self.state_path or '(nowhere: resume is off)'}. Try a lower "
            "training.optimizer.lr, amp: false, or check the input images."
        )

    # ---- evaluation ----------------------------------------------------------------------

    def _validate(self, stage: Stage, index: int) -> tuple[dict[str, float], float, float]:
        """The validation pass: metrics, mean loss, and the monitored macro AUROC over the
        stage's targets (NaN when no target has both classes in the val split). Runs the
        unwrapped model: no DDP sync, identical on every rank."""
        probs, val_loss = predict_probabilities(
            self.model,
            self.data.val_images,
            self.device,
            batch_size=self.cfg.eval_batch_size,
            dtype=self.dtype,
            channels_last=self.channels_last,
            labels=self.data.val_labels,
            criterion=self.criterion,
            progress_desc=f"{self.name} epoch {index + 1} validation" if self.show_bar else None,
        )
        metrics = validation_metrics(probs, self.data.val_labels)
        aurocs = [metrics[f"val_auroc_{FINDINGS[k]}"] for k in stage.targets]
        aurocs = [a for a in aurocs if not math.isnan(a)]
        monitored = float(np.mean(aurocs)) if aurocs else float("nan")
        return metrics, val_loss, monitored

    # ---- the result ----------------------------------------------------------------------

    def _metadata(
        self, progress: _FitState, stage: Stage, cfg: TrainingParams, fingerprint: str
    ) -> dict[str, Any]:
        """The checkpoint metadata of the best weights `progress` holds (stage: the last one)."""
        return {
            "model_spec": dict(self.spec),
            "findings": list(FINDINGS),
            "normalisation": dict(getattr(self.model, "normalisation", NORMALISATION)),
            "scales": list(self.spec["scales"]),
            "input_size": self.data.size,
            "train_params": cfg.model_dump(),
            "epoch": int(progress.best_epoch),
            "metric": float(progress.best_metric),
            "metric_name": _metric_name(stage),
            "stage": stage.name,
            "pos_weight": self.pos_weight.tolist() if self.pos_weight is not None else None,
            # the per-finding constants of the main stages' loss (weights, offsets, margins)
            "loss_constants": self.main_criterion.constants(),
            "world_size": self.world,
            "training_id": progress.training_id,
            "fingerprint": fingerprint,
            "image_cache": self.settings["data"],
        }

    def _keep_finished(
        self,
        fingerprint: str,
        settings: dict[str, Any],
        progress: _FitState,
        metadata: dict[str, Any],
    ) -> Path:
        """Write a finished state (kept for reruns to reuse); returns its path."""
        assert self.store is not None  # callers check
        return self.store.save(
            fingerprint,
            {
                "finished": True,
                "settings": settings,
                "training_id": metadata["training_id"],
                "best_state": progress.best_state,
                "metadata": metadata,
                "history": progress.history,
            },
        )

    def _keep_main_result(self, progress: _FitState) -> None:
        """At the end of the main stages of a cRT run: keep their result as the finished
        training of the same configuration without cRT. Rerunning without cRT, or with other
        cRT settings, then reuses it instead of training the trunk again."""
        if self.rank != 0 or self.store is None or self.main is None:
            return
        fingerprint, settings = self.main
        metadata = self._metadata(
            progress,
            self.stages[progress.stage_index],
            decoupling.main_training_config(self.cfg),
            fingerprint,
        )
        # its own training id: another result than the cRT model's, derived from the cRT
        # run's id so that a resumed run writes the same
        metadata["training_id"] = hashlib.sha256(
            f"{progress.training_id}:main".encode()
        ).hexdigest()[:12]
        path = self._keep_finished(fingerprint, settings, progress, metadata)
        logger.info(
            "%s: main training finished, classifier re-training (cRT) follows; the main result "
            "is kept at %s (a run without cRT, or with other cRT settings, reuses it)",
            self.name,
            path,
        )

    def _finish(self, progress: _FitState) -> FitResult:
        """Best weights + metadata + history; the finished state is kept for reruns."""
        metadata = self._metadata(progress, self.stages[-1], self.cfg, self.fingerprint)
        if self.store is not None:
            # kept, not deleted: if the checkpoint's catalog save fails, or a later model or
            # stage dies, the rerun reuses this result instead of training again
            path = self._keep_finished(self.fingerprint, self.settings, progress, metadata)
            logger.info("%s: training finished; result kept at %s for reruns", self.name, path)
        history_frame = pd.DataFrame(progress.history)
        history_frame["training_id"] = progress.training_id
        return FitResult(progress.best_state, metadata, history_frame)
