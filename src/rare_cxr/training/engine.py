"""The training loop shared by every model: data from the image cache, augmentation on device,
Adam + schedule, balanced BCE/focal loss, early stopping on validation macro AUROC, resume,
AMP/channels_last/compile on GPU, DDP, and a NaN guard.

`fit` is a plain function of (model spec, image cache, augmenter, training parameters) so it can
run inside the Kedro node, in DDP worker processes, in the benchmark and in tests alike.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rare_cxr.findings import FINDINGS
from rare_cxr.models import NORMALISATION, build_model, validate_model_spec
from rare_cxr.training import checkpointing, distributed
from rare_cxr.training.config import validate_training_params
from rare_cxr.training.losses import MultiLabelLoss, balanced_pos_weight
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
    name: str  # "single", or "common" then "all"/"rare" for two-stage transfer
    epochs: int
    targets: list[int]  # finding indices the loss and the monitored metric use
    frozen_epochs: int = 0


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


def amp_dtype(cfg: Mapping[str, Any], device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it (no scaler needed), else fp16; None = full fp32."""
    enabled = cfg["amp"] if cfg["amp"] != "auto" else device.type == "cuda"
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def to_batch(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 `[B, S, S]` → float `[B, 1, S, S]` in `[0, 1]` on `device` (converted there)."""
    # slices of the cache's read-only memmap are copied (torch refuses non-writable arrays);
    # fancy-indexed training batches already are copies
    images = np.ascontiguousarray(images)
    x = torch.from_numpy(images if images.flags.writeable else images.copy())
    x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
    x = x.unsqueeze(1).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fetch(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    order = np.sort(idx)  # sorted reads are sequential in the memmap
    return images[order], labels[order]


def _prefetch(
    jobs: list[np.ndarray], images: np.ndarray, labels: np.ndarray, threads: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batches, reading the next one from the memmap while the current one trains."""
    if threads <= 0:
        for idx in jobs:
            yield _fetch(images, labels, idx)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(_fetch, images, labels, jobs[i]) for i in range(min(2, len(jobs)))]
        for i in range(len(jobs)):
            batch = futures[i].result()
            if i + 2 < len(jobs):
                futures.append(pool.submit(_fetch, images, labels, jobs[i + 2]))
            yield batch


def sample_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Oversampling weight per image: (1 / prevalence of its rarest finding) ** power.

    Images without findings use the "No Finding" prevalence. power=0 is uniform sampling,
    power=1 equalises findings; 0.5 is a compromise that does not repeat Hernia cases 500x.
    """
    prevalence = labels.mean(axis=0).clip(min=1.0 / len(labels))
    no_finding = max((labels.sum(axis=1) == 0).mean(), 1.0 / len(labels))
    inv = np.where(labels > 0, 1.0 / prevalence, 0.0).max(axis=1)
    inv = np.where(inv > 0, inv, 1.0 / no_finding)
    return inv**power


def epoch_order(n: int, seed: int, epoch: int, weights: np.ndarray | None) -> np.ndarray:
    """The epoch's sample order, a pure function of (seed, epoch): identical on every rank and
    after a resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is None:
        return torch.randperm(n, generator=gen).numpy()
    w = torch.as_tensor(weights, dtype=torch.float64)
    return torch.multinomial(w, n, replacement=True, generator=gen).numpy()


def batches_for(order: np.ndarray, batch_size: int, world: int) -> list[np.ndarray]:
    """Global batches; a short last batch is kept only if every rank gets >= 2 samples of it
    (BatchNorm cannot train on one) and it splits evenly (DDP averages per-rank means)."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if out and len(out[-1]) < batch_size:
        r = len(out[-1])
        if r % world or r // world < 2:
            out.pop()
    return out


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
) -> tuple[np.ndarray, float]:
    """Sigmoid probabilities `[N, 14]` (and mean loss when labels are given), in eval mode."""
    was_training = model.training
    model.eval()
    probs, loss_sum, n = [], 0.0, 0
    for start in range(0, len(images), batch_size):
        x = to_batch(images[start : start + batch_size], device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
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
    model.train(was_training)
    out = np.concatenate(probs) if probs else np.zeros((0, len(FINDINGS)), np.float32)
    return out.astype(np.float32), (loss_sum / n if n and labels is not None else float("nan"))


def plan_stages(cfg: Mapping[str, Any], train_labels: np.ndarray) -> list[Stage]:
    """One stage, or the two-stage rare-finding transfer of the issue (§4)."""
    all_idx = list(range(len(FINDINGS)))
    tr = cfg["transfer"]
    if not tr["two_stage"]:
        return [Stage("single", cfg["epochs"], all_idx)]
    rare = sorted(FINDINGS.index(n) for n in tr["rare_findings"])
    common = [i for i in all_idx if i not in rare]
    second = all_idx if tr["stage2_targets"] == "all" else rare
    return [
        Stage("common", tr["stage1_epochs"], common),
        Stage(tr["stage2_targets"], cfg["epochs"], second, tr["frozen_trunk_epochs"]),
    ]


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
    }
)


def data_fingerprint(cache: Any) -> dict[str, Any]:
    """What the training data is: the image cache's pixel and label fingerprints.

    A built `ImageCache` records both (hashes of file names, sizes, mtimes and label tables);
    other cache-like objects (tests, benchmarks) are hashed from their train/val arrays.
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


def training_settings(
    spec: Mapping[str, Any],
    cfg: Mapping[str, Any],
    cache: Any,
    augment: Augment | None,
    world: int,
) -> dict[str, Any]:
    """Everything a training's result depends on (the fingerprinted settings)."""
    policy = getattr(augment, "policy", None)
    return {
        "model": dict(spec),
        "training": {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS},
        "data": data_fingerprint(cache),
        "augmentation": dict(policy) if isinstance(policy, Mapping) else repr(augment),
        "processes": world,
        "findings": list(FINDINGS),
    }


def _head_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.head().parameters()}


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def fit(
    model_spec: Mapping[str, Any],
    cache: Any,
    augment: Augment | None,
    params: Mapping[str, Any] | None,
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
    params: Mapping[str, Any] | None,
    *,
    callbacks: TrainingCallbacks | None,
    rank: int,
    world: int,
    state_store: checkpointing.TrainingStateStore | None,
) -> FitResult | None:
    spec = validate_model_spec(model_spec)
    cfg = validate_training_params(params)
    callbacks = callbacks or TrainingCallbacks()
    name = spec["name"]
    if cfg["batch_size"] % world:
        raise ValueError(
            f"training.batch_size ({cfg['batch_size']}) must be divisible by the "
            f"number of DDP processes ({world})"
        )
    train, val = cache.split("train"), cache.split("val")
    train_images, train_labels = train.images, np.asarray(train.labels, dtype=np.float32)
    val_images, val_labels = val.images, np.asarray(val.labels, dtype=np.float32)
    if len(train_labels) < 2 or len(val_labels) < 1:
        raise ValueError(
            f"{name}: the image cache needs >= 2 train and >= 1 val images "
            f"(has {len(train_labels)} / {len(val_labels)})"
        )

    # ---- training state: reuse a finished training, or resume an unfinished one -----------
    settings = training_settings(spec, cfg, cache, augment, world)
    fp = checkpointing.fingerprint(settings)
    store = state_store
    if store is None and cfg["resume_dir"]:
        store = checkpointing.TrainingStateStore(Path(cfg["resume_dir"]) / name)
    if not cfg["resume"]:
        store = None
    state = store.load(fp, settings) if store is not None else None
    if state is not None and state.get("finished"):
        if cfg["reuse_finished"]:
            if rank == 0:
                logger.info(
                    "%s: training already finished for this configuration (%s, best epoch %s): "
                    "reusing its result, no epoch is trained (training.reuse_finished=false "
                    "trains again)",
                    name,
                    store.path(fp),
                    state["metadata"].get("epoch"),
                )
            if rank != 0:
                return None
            history_frame = pd.DataFrame(state["history"])
            history_frame["training_id"] = state["metadata"].get("training_id")
            return FitResult(dict(state["best_state"]), dict(state["metadata"]), history_frame)
        logger.info("%s: training.reuse_finished is false: training again", name)
        state = None
    state_path = store.path(fp) if store is not None else None

    device = resolve_device(cfg["device"], rank)
    if world > 1:
        distributed.init_process_group(rank, world, device)
    seed_everything(cfg["seed"], cfg["deterministic"])
    dtype = amp_dtype(cfg, device)
    channels_last = (cfg["channels_last"] is True) or (
        cfg["channels_last"] == "auto" and device.type == "cuda"
    )

    model = build_model(spec).to(device)
    if world > 1 and cfg["sync_batchnorm"]:
        # before the optimiser is built: conversion creates new BatchNorm parameter objects
        model = distributed.convert_sync_batchnorm(model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pos_weight = (
        balanced_pos_weight(train_labels, cfg["loss"]["pos_weight_cap"])
        if cfg["loss"]["balanced"]
        else None
    )
    criterion = MultiLabelLoss(pos_weight, cfg["loss"]["name"], cfg["loss"]["focal_gamma"]).to(
        device
    )
    head_ids = _head_parameter_ids(model)
    head_params = [p for p in model.parameters() if id(p) in head_ids]
    trunk_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.Adam(
        [
            {"params": trunk_params, "lr_multiplier": 1.0},
            {"params": head_params, "lr_multiplier": 1.0},
        ],
        lr=cfg["optimizer"]["lr"],
        weight_decay=cfg["optimizer"]["weight_decay"],
        eps=cfg["optimizer"]["eps"],
    )
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    stages = plan_stages(cfg, train_labels)
    weights = (
        sample_weights(train_labels, cfg["oversample_rare"]["power"])
        if cfg["oversample_rare"]["enabled"]
        else None
    )

    # ---- resume --------------------------------------------------------------------------
    training_id = uuid.uuid4().hex[:12]
    stage_i, epoch_in_stage, global_epoch = 0, 0, 0
    best_metric, best_state, best_epoch, bad_epochs = float("nan"), None, -1, 0
    history: list[dict[str, Any]] = []
    schedule_state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        checkpointing.set_rng_state(state["rng"])
        stage_i, epoch_in_stage = state["stage_index"], state["epoch_in_stage"]
        global_epoch = state["global_epoch"]
        best_metric, best_state = state["best_metric"], state["best_state"]
        best_epoch, bad_epochs = state["best_epoch"], state["bad_epochs"]
        history = list(state["history"])
        schedule_state = state["schedule"]
        training_id = str(state.get("training_id") or training_id)
        if rank == 0:
            logger.info(
                "%s: resuming from %s at epoch %d (stage %s)",
                name,
                state_path,
                global_epoch + 1,
                stages[stage_i].name,
            )

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg["compile"]:
        train_model = torch.compile(train_model)

    show_bar = cfg["progress_bar"] and rank == 0
    n_train = len(train_labels)
    last_good_epoch = global_epoch
    while stage_i < len(stages):
        stage = stages[stage_i]
        mask = torch.zeros(len(FINDINGS), device=device)
        mask[stage.targets] = 1.0
        criterion.set_mask(None if len(stage.targets) == len(FINDINGS) else mask)
        steps_per_epoch = len(batches_for(np.arange(n_train), cfg["batch_size"], world))
        schedule = LRSchedule(
            optimizer, cfg["optimizer"]["lr"], cfg["schedule"], steps_per_epoch, stage.epochs
        )
        if schedule_state is not None:
            schedule.load_state_dict(schedule_state)
            schedule_state = None
        metric_name = "val_macro_auroc" + (
            "" if len(stage.targets) == len(FINDINGS) else f"_{stage.name}"
        )
        stop = False
        while epoch_in_stage < stage.epochs and not stop:
            optimizer.param_groups[0]["lr_multiplier"] = (
                0.0 if epoch_in_stage < stage.frozen_epochs else 1.0
            )
            schedule.apply()
            # Every random draw of an epoch derives from (seed, epoch): a resumed epoch replays
            # exactly what the interrupted one would have done.
            torch.manual_seed(cfg["seed"] * 7919 + global_epoch)
            aug_gen = torch.Generator().manual_seed(  # CPU: same draws on any device
                cfg["seed"] * 104_729 + global_epoch * 131 + rank
            )
            jobs = batches_for(
                epoch_order(n_train, cfg["seed"], global_epoch, weights), cfg["batch_size"], world
            )
            rank_jobs = [j[rank * (len(j) // world) : (rank + 1) * (len(j) // world)] for j in jobs]
            train_model.train()
            loss_sum = torch.zeros((), device=device)
            seen = 0
            t0 = time.perf_counter()
            bar = tqdm(
                total=len(rank_jobs),
                disable=not show_bar,
                leave=False,
                unit="batch",
                desc=f"{name} epoch {global_epoch + 1} [{stage.name}]",
            )
            for step, (xb, yb) in enumerate(
                _prefetch(rank_jobs, train_images, train_labels, cfg["loader_threads"])
            ):
                x = to_batch(xb, device, channels_last)
                y = torch.from_numpy(yb).to(device, non_blocking=True)
                if augment is not None:
                    x = augment(x, generator=aug_gen)
                with torch.autocast(
                    device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ):
                    logits = train_model(x)
                loss = criterion(logits.float(), y)
                finite = (
                    distributed.all_finite(bool(torch.isfinite(loss)), device)
                    if world > 1
                    else bool(torch.isfinite(loss))
                )
                if not finite:
                    bar.close()
                    raise FloatingPointError(
                        f"{name}: training loss is {loss.item()} at epoch {global_epoch + 1} "
                        f"step {step + 1} (stage {stage.name}); training stopped. The last good "
                        f"state (end of epoch {last_good_epoch}) is kept at "
                        f"{state_path or '(nowhere: resume is off)'}. Try a lower "
                        "training.optimizer.lr, amp: false, or check the input images."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                loss_sum += loss.detach() * len(x)
                seen += len(x)
                if show_bar:
                    rate = seen * world / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
                    bar.update()
                if callbacks.on_step:
                    callbacks.on_step(global_epoch, step)
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            train_loss = float(loss_sum) / max(seen, 1)
            if world > 1:
                t = torch.tensor([train_loss], device=device)
                torch.distributed.all_reduce(t)
                train_loss = float(t) / world

            eval_model = model  # unwrapped: no DDP sync, identical on every rank
            probs, val_loss = predict_probabilities(
                eval_model,
                val_images,
                device,
                batch_size=cfg["eval_batch_size"],
                dtype=dtype,
                channels_last=channels_last,
                labels=val_labels,
                criterion=criterion,
            )
            metrics = validation_metrics(probs, val_labels)
            aurocs = [metrics[f"val_auroc_{FINDINGS[k]}"] for k in stage.targets]
            aurocs = [a for a in aurocs if not math.isnan(a)]
            monitored = float(np.mean(aurocs)) if aurocs else float("nan")
            schedule.epoch_end(monitored)
            row = {
                "epoch": global_epoch + 1,
                "stage": stage.name,
                "train_loss": train_loss,
                "val_loss": val_loss,
                **metrics,
                "lr": schedule.lr,
                "img_per_s": seen * world / max(elapsed, 1e-9),
            }
            history.append(row)
            improved = best_state is None or (
                not math.isnan(monitored) and (math.isnan(best_metric) or monitored > best_metric)
            )
            if improved:
                best_metric, best_epoch, bad_epochs = monitored, global_epoch + 1, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            stop = bad_epochs >= cfg["patience"]
            global_epoch += 1
            epoch_in_stage += 1
            next_stage, next_epoch = (stage_i, epoch_in_stage)
            if stop or epoch_in_stage >= stage.epochs:
                next_stage, next_epoch = stage_i + 1, 0
            logger.info(
                "%s epoch %d [%s]: train_loss %.4f val_loss %.4f %s %.4f (best %.4f @ %d) "
                "lr %.2e %.1f img/s%s",
                name,
                global_epoch,
                stage.name,
                train_loss,
                val_loss,
                metric_name,
                monitored,
                best_metric,
                best_epoch,
                schedule.lr,
                row["img_per_s"],
                " -- early stop" if stop else "",
            )
            if next_stage > stage_i and next_stage < len(stages):
                # stage 2 starts from the best stage-1 weights, with a fresh optimiser state,
                # schedule and early-stopping record
                model.load_state_dict(best_state)
                optimizer.state.clear()
                best_metric, best_state, best_epoch, bad_epochs = float("nan"), None, -1, 0
            if rank == 0 and store is not None:
                store.save(
                    fp,
                    {
                        "finished": False,
                        "settings": settings,
                        "training_id": training_id,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "schedule": schedule.state_dict() if next_stage == stage_i else None,
                        "rng": checkpointing.rng_state(),
                        "stage_index": next_stage,
                        "epoch_in_stage": next_epoch,
                        "global_epoch": global_epoch,
                        "best_metric": best_metric,
                        "best_state": best_state,
                        "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "history": history,
                    },
                )
            last_good_epoch = global_epoch
            if callbacks.on_epoch_end:
                callbacks.on_epoch_end(global_epoch, row)
        stage_i, epoch_in_stage = stage_i + 1, 0

    distributed.barrier()
    if rank != 0:
        return None
    final_stage = stages[-1]
    metadata = {
        "model_spec": dict(spec),
        "findings": list(FINDINGS),
        "normalisation": dict(NORMALISATION),
        "scales": list(spec["scales"]),
        "input_size": int(cache.size),
        "train_params": copy.deepcopy(dict(cfg)),
        "epoch": int(best_epoch),
        "metric": float(best_metric),
        "metric_name": "val_macro_auroc"
        + ("" if len(final_stage.targets) == len(FINDINGS) else f"_{final_stage.name}"),
        "stage": final_stage.name,
        "pos_weight": pos_weight.tolist() if pos_weight is not None else None,
        "world_size": world,
        "training_id": training_id,
        "fingerprint": fp,
        "image_cache": settings["data"],
    }
    if store is not None:
        # kept, not deleted: if the checkpoint's catalog save fails, or a later model or stage
        # dies, the rerun reuses this result instead of training again
        store.save(
            fp,
            {
                "finished": True,
                "settings": settings,
                "training_id": training_id,
                "best_state": best_state,
                "metadata": metadata,
                "history": history,
            },
        )
        logger.info("%s: training finished; result kept at %s for reruns", name, store.path(fp))
    history_frame = pd.DataFrame(history)
    history_frame["training_id"] = training_id
    return FitResult(best_state, metadata, history_frame)
