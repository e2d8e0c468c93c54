"""Nodes of the `training` pipeline (reused per model by `baselines` through namespaces).

`train_model` validates everything, then trains (in this process, in `devices: N` spawned DDP
workers, or as one rank of a `torchrun` launch) and returns the best-on-validation checkpoint
and the per-epoch history. `predict` rebuilds the model from the checkpoint alone and writes
probabilities for the validation and test splits.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.multiprocessing as mp

from rare_cxr.findings import FINDINGS
from rare_cxr.models import build_model, validate_model_spec
from rare_cxr.training import distributed
from rare_cxr.training.config import validate_training_params
from rare_cxr.training.engine import (
    FitResult,
    TrainingCallbacks,
    amp_dtype,
    fit,
    predict_probabilities,
    resolve_device,
)

logger = logging.getLogger(__name__)

PREDICTION_SPLITS = ("val", "test")


def make_augmenter(policy: Mapping[str, Any] | None):
    """The colleague-owned `BatchAugmenter` for the policy (None or disabled → no augmentation)."""
    if policy is None:
        return None
    from rare_cxr.augment import BatchAugmenter

    return BatchAugmenter(policy)


def _ddp_worker(rank: int, job: dict[str, Any]) -> None:
    world, spec, cache = job["world"], job["spec"], job["cache"]
    policy, params, out_path = job["policy"], job["params"], job["out_path"]
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        result = fit(spec, cache, make_augmenter(policy), params, rank=rank, world=world)
        if rank == 0 and result is not None:
            torch.save(
                {
                    "state_dict": result.state_dict,
                    "metadata": result.metadata,
                    "history": result.history.to_dict(orient="list"),
                },
                out_path,
            )
    finally:
        distributed.destroy()


def fit_spawned(spec, cache, policy, params, world: int) -> FitResult:
    """`devices: N`: train in N spawned processes (gloo on CPU, NCCL on GPUs); rank 0's result
    comes back through a temporary file (loaded with weights_only=True)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(distributed.free_port())
    with tempfile.TemporaryDirectory(prefix="rare-cxr-ddp-") as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.start_processes(
            _ddp_worker,
            args=(
                {
                    "world": world,
                    "spec": spec,
                    "cache": cache,
                    "policy": policy,
                    "params": params,
                    "out_path": out,
                },
            ),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        obj = torch.load(out, map_location="cpu", weights_only=True)
    return FitResult(obj["state_dict"], obj["metadata"], pd.DataFrame(obj["history"]))


def split_training_overrides(
    model: Mapping[str, Any], training: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate a model block's optional `training:` overrides and merge them into `training`.

    Every model shares one protocol (`params:training`), "unless a parameter says otherwise":
    `<model>.model.training` is that parameter (e.g. a smaller learning rate for VGG16, which
    collapses to constant outputs from scratch at the shared rate). Nested blocks merge key by
    key, so `{optimizer: {lr: 1e-4}}` keeps the shared weight decay.
    """
    model = dict(model)
    overrides = model.pop("training", None) or {}
    if not isinstance(overrides, Mapping):
        name = model.get("name", model.get("architecture"))
        raise ValueError(f"{name}.model.training: expected a mapping of overrides")

    def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    return model, merge(training or {}, overrides)


def train_model(
    image_cache: Any,
    augmentation_policy: Mapping[str, Any] | None,
    model: Mapping[str, Any],
    training: Mapping[str, Any],
    callbacks: TrainingCallbacks | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train one model; returns (checkpoint `{"state_dict", "metadata"}`, history DataFrame).

    Parameters are validated before the image cache is touched. Under `torchrun`, ranks other
    than 0 exit the process after training, so only rank 0 writes catalog entries (run
    `torchrun ... -m rare_cxr --pipelines training` so no other stage runs on every rank).
    """
    model, training = split_training_overrides(model, training)
    spec = validate_model_spec(model)
    cfg = validate_training_params(training)
    augment = make_augmenter(augmentation_policy)  # validates the policy up front
    if distributed.launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        result = fit(spec, image_cache, augment, cfg, callbacks=callbacks, rank=rank, world=world)
        if rank != 0:
            distributed.destroy()
            raise SystemExit(0)
    elif cfg["devices"] > 1:
        result = fit_spawned(spec, image_cache, augmentation_policy, cfg, cfg["devices"])
    else:
        result = fit(spec, image_cache, augment, cfg, callbacks=callbacks)
    assert result is not None
    checkpoint = {"state_dict": result.state_dict, "metadata": result.metadata}
    return checkpoint, result.history


def load_checkpoint_model(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    """Rebuild a model from a checkpoint alone (spec from metadata, no pretrained download)."""
    meta = checkpoint["metadata"]
    if list(meta.get("findings", [])) != list(FINDINGS):
        raise ValueError(
            "checkpoint findings differ from rare_cxr.findings.FINDINGS; "
            "it was trained with another finding order"
        )
    model = build_model(meta["model_spec"], load_weights=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def predict(
    checkpoint: Mapping[str, Any], image_cache: Any, training: Mapping[str, Any]
) -> pd.DataFrame:
    """Probabilities for the val and test splits: image_id, patient_id, split, 14 findings."""
    cfg = validate_training_params(training)
    device = resolve_device(cfg["device"])
    model = load_checkpoint_model(checkpoint).to(device)
    dtype = amp_dtype(cfg, device)
    frames = []
    for split in PREDICTION_SPLITS:
        if split not in image_cache.split_names:
            logger.warning("image cache has no %r split; no predictions for it", split)
            continue
        part = image_cache.split(split)
        probs, _ = predict_probabilities(
            model,
            part.images,
            device,
            batch_size=cfg["eval_batch_size"],
            dtype=dtype,
            channels_last=False,
            tta_hflip=cfg["tta_hflip"],
        )
        frame = pd.DataFrame(probs.astype("float64"), columns=list(FINDINGS))
        frame.insert(0, "split", split)
        frame.insert(0, "patient_id", part.table["patient_id"].to_numpy())
        frame.insert(0, "image_id", part.table["image_id"].astype(str).to_numpy())
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
