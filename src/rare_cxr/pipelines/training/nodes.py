"""Nodes of the `training` pipeline (reused per model by `baselines` through namespaces).

`train_model` validates everything, then trains (in this process, in `devices: N` spawned DDP
workers, or as one rank of a `torchrun` launch) and returns the best-on-validation checkpoint
and the per-epoch history; its training state (resume, reuse of a finished training) lives in
the catalog entry `<model>.training_state`. `predict` rebuilds the model from the checkpoint
alone and writes probabilities for the validation and test splits, each row stamped with the
checkpoint version, training id and image-cache fingerprint it came from (run lineage: the
reporting pipeline checks that what it combines belongs together).
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
from rare_cxr.models import MIN_INPUT, build_model, validate_model_spec
from rare_cxr.models.factory import ModelSpec
from rare_cxr.parameters import plain
from rare_cxr.processes import exit_with_parent
from rare_cxr.training import distributed
from rare_cxr.training.checkpointing import TrainingStateStore
from rare_cxr.training.config import TrainingParams, merge_overrides, training_params
from rare_cxr.training.engine import (
    FitResult,
    TrainingCallbacks,
    amp_dtype,
    data_fingerprint,
    fit,
    predict_probabilities,
    resolve_device,
)
from rare_cxr.training.listeners import with_listeners

logger = logging.getLogger(__name__)

PREDICTION_SPLITS = ("val", "test")
# Lineage columns of the predictions table (see `predict`).
LINEAGE_COLUMNS = ("checkpoint_version", "training_id", "image_cache_fingerprint")


def make_augmenter(policy: Mapping[str, Any] | None):
    """The colleague-owned `BatchAugmenter` for the policy (None or disabled → no augmentation)."""
    if policy is None:
        return None
    from rare_cxr.augment import BatchAugmenter

    return BatchAugmenter(policy)


def _ddp_worker(rank: int, job: dict[str, Any]) -> None:
    world, spec, cache = job["world"], job["spec"], job["cache"]
    policy, params, out_path = job["policy"], job["params"], job["out_path"]
    store = TrainingStateStore(job["state_dir"]) if job["state_dir"] else None
    exit_with_parent()  # a killed run must not leave DDP workers training (and saving) on
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        result = fit(
            spec, cache, make_augmenter(policy), params, rank=rank, world=world, state_store=store
        )
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


def fit_spawned(
    spec, cache, policy, params, world: int, *, state_store: TrainingStateStore | None = None
) -> FitResult:
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
                    "state_dir": str(state_store.folder) if state_store is not None else None,
                },
            ),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        obj = torch.load(out, map_location="cpu", weights_only=True)
    return FitResult(obj["state_dict"], obj["metadata"], pd.DataFrame(obj["history"]))


def split_training_overrides(
    model: Mapping[str, Any] | ModelSpec, training: Mapping[str, Any] | TrainingParams | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate a model block's optional `training:` overrides and merge them into `training`.

    Every model shares one protocol (`params:training`), "unless a parameter says otherwise":
    `<model>.model.training` is that parameter (e.g. a smaller learning rate for VGG16, which
    collapses to constant outputs from scratch at the shared rate). Nested blocks merge key by
    key, so `{optimizer: {lr: 1e-4}}` keeps the shared weight decay.
    """
    if isinstance(model, ModelSpec):  # as Kedro passes it (typed parameters)
        overrides = model.training.model_dump(exclude_unset=True) if model.training else {}
        model = model.as_dict()
    else:
        model = dict(model)
        overrides = model.pop("training", None) or {}
        if isinstance(overrides, TrainingParams):  # `dict()` of a typed spec keeps the model
            overrides = overrides.model_dump(exclude_unset=True)
    if not isinstance(overrides, Mapping):
        name = model.get("name", model.get("architecture"))
        raise ValueError(f"{name}.model.training: expected a mapping of overrides")
    return model, merge_overrides(plain(training) or {}, overrides)


def model_training_params(
    model: Mapping[str, Any] | ModelSpec, training: Mapping[str, Any] | TrainingParams | None
) -> tuple[dict[str, Any], TrainingParams]:
    """(model spec, the training protocol this model uses), the protocol validated exactly once:
    the shared block as Kedro handed it when the model overrides nothing, else the merged block
    (new data: validated here, with its overrides' keys named)."""
    spec, merged = split_training_overrides(model, training)
    has_overrides = isinstance(model, ModelSpec) and model.training is not None
    if not isinstance(model, ModelSpec):
        has_overrides = bool(dict(model).get("training"))
    if isinstance(training, TrainingParams) and not has_overrides:
        return spec, training
    return spec, training_params(merged)


def check_scales_fit_cache(spec: Mapping[str, Any], image_cache: Any) -> None:
    """A scale larger than the image cache is an error naming both parameters: the model would
    only upsample the cached pixels, so that "high-resolution" branch sees no new information.

    One exception: a scale equal to the architecture's minimum input (`MIN_INPUT`, e.g.
    Inception-v3's 75 px) is allowed above the cache size, with a warning -- the network cannot
    run on fewer pixels, so upsampling is the only way to use it on a small (test) cache.
    """
    size = int(image_cache.size)
    too_large = [s for s in spec["scales"] if s > size]
    if not too_large:
        return
    minimum = MIN_INPUT.get(spec["architecture"], 0)
    where = f"{spec['name']}.model.scales"
    if all(s <= minimum for s in too_large):
        logger.warning(
            "%s %s: %s px is above image_cache.size (%d px), but it is %s's minimum input: "
            "the cached images are upsampled to it (no new detail; use image_cache.size >= %d "
            "for a real run)",
            where,
            spec["scales"],
            too_large,
            size,
            spec["architecture"],
            max(too_large),
        )
        return
    raise ValueError(
        f"{where} {spec['scales']}: scale(s) {too_large} px exceed image_cache.size ({size} px); "
        "the model would only upsample the cached pixels, so that scale sees no new detail. "
        f"Set image_cache.size to at least {max(too_large)} (parameters_augmentation.yml; the "
        f"cache is rebuilt) or lower {where}"
    )


def train_model(
    image_cache: Any,
    augmentation_policy: Mapping[str, Any] | None,
    model: ModelSpec,
    training: TrainingParams,
    training_state: TrainingStateStore | None = None,
    *,
    callbacks: TrainingCallbacks | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train one model; returns (checkpoint `{"state_dict", "metadata"}`, history DataFrame).

    Parameters are validated before the image cache is touched. `training_state` is the
    catalog's `<model>.training_state` folder: an interrupted training resumes from it, and a
    finished one of the same configuration is returned at once (a rerun after a failure later
    in the pipeline trains nothing twice). Under `torchrun`, ranks other than 0 exit the process
    after training, so only rank 0 writes catalog entries (run
    `torchrun ... -m rare_cxr --pipelines training` so no other stage runs on every rank).
    """
    model, cfg = model_training_params(model, training)
    spec = validate_model_spec(model)
    check_scales_fit_cache(spec, image_cache)
    if training_state is not None and cfg.resume_dir is not None:
        raise ValueError(
            "training.resume_dir is set, but in a Kedro run the training state lives in the "
            f"catalog entry {spec['name']}.training_state ({training_state.folder}); remove "
            "training.resume_dir from the parameters (or change that entry's path)"
        )
    augment = make_augmenter(augmentation_policy)  # validates the policy up front
    seeds = seed_list(cfg)
    torchrun = distributed.launched_by_torchrun()
    results: list[FitResult | None] = []
    for i, seed in enumerate(seeds):
        if len(seeds) > 1:
            logger.info("%s: seed %d (%d of %d)", spec["name"], seed, i + 1, len(seeds))
        one = cfg.model_copy(update={"seed": seed})
        # plus any epoch listener a hook registered (experiment tracking); unchanged without one
        seed_callbacks = with_listeners(callbacks, spec["name"], seed)
        if torchrun:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            results.append(
                fit(
                    spec,
                    image_cache,
                    augment,
                    one,
                    callbacks=seed_callbacks,
                    rank=rank,
                    world=world,
                    state_store=training_state,
                )
            )
        elif cfg.devices > 1:
            results.append(
                fit_spawned(
                    spec,
                    image_cache,
                    augmentation_policy,
                    one,
                    cfg.devices,
                    state_store=training_state,
                )
            )
        else:
            results.append(
                fit(
                    spec,
                    image_cache,
                    augment,
                    one,
                    callbacks=seed_callbacks,
                    state_store=training_state,
                )
            )
    if torchrun and int(os.environ["RANK"]) != 0:
        distributed.destroy()
        raise SystemExit(0)
    return combine_seeds(seeds, [r for r in results if r is not None])


def seed_list(cfg: TrainingParams) -> list[int]:
    """The seeds a model is trained with: `seed, seed + 1, ..., seed + n_seeds - 1`."""
    return [cfg.seed + i for i in range(cfg.n_seeds)]


def combine_seeds(
    seeds: list[int], results: list[FitResult]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """One checkpoint and one history for all seeds of a model.

    The first seed is the *primary* model: its weights are the checkpoint's `state_dict`, so
    everything that needs one model (cost, Grad-CAM, inference) keeps working unchanged. The
    other seeds' weights ride along in `seed_state_dicts`, and `metadata["per_seed"]` names each
    seed's training id, best epoch and metric. The history gains a `seed` column.
    """
    if len(results) != len(seeds):
        raise RuntimeError(f"expected {len(seeds)} training results, got {len(results)}")
    primary = results[0]
    metadata = {
        **primary.metadata,
        "seeds": list(seeds),
        "per_seed": {
            str(seed): {
                k: r.metadata.get(k) for k in ("training_id", "epoch", "metric", "fingerprint")
            }
            for seed, r in zip(seeds, results, strict=True)
        },
    }
    checkpoint: dict[str, Any] = {"state_dict": primary.state_dict, "metadata": metadata}
    if len(seeds) > 1:
        checkpoint["seed_state_dicts"] = {
            str(seed): r.state_dict for seed, r in zip(seeds[1:], results[1:], strict=True)
        }
    history = pd.concat(
        [r.history.assign(seed=seed) for seed, r in zip(seeds, results, strict=True)],
        ignore_index=True,
    )
    return checkpoint, history


def checkpoint_seeds(checkpoint: Mapping[str, Any]) -> list[int]:
    """The seeds a checkpoint holds, primary first (one for checkpoints without seeds)."""
    meta = checkpoint["metadata"]
    if meta.get("seeds"):
        return [int(s) for s in meta["seeds"]]
    return [int(meta.get("train_params", {}).get("seed", 0))]


def seed_training_id(checkpoint: Mapping[str, Any], seed: int) -> str:
    meta = checkpoint["metadata"]
    per_seed = meta.get("per_seed") or {}
    return str((per_seed.get(str(seed)) or {}).get("training_id") or meta.get("training_id"))


def load_checkpoint_model(
    checkpoint: Mapping[str, Any], seed: int | None = None
) -> torch.nn.Module:
    """Rebuild a model from a checkpoint alone (spec from metadata, no pretrained download);
    `seed` picks one of several seeds (default: the primary one)."""
    meta = checkpoint["metadata"]
    if list(meta.get("findings", [])) != list(FINDINGS):
        raise ValueError(
            "checkpoint findings differ from rare_cxr.findings.FINDINGS; "
            "it was trained with another finding order"
        )
    seeds = checkpoint_seeds(checkpoint)
    if seed is None or seed == seeds[0]:
        weights = checkpoint["state_dict"]
    elif str(seed) in (checkpoint.get("seed_state_dicts") or {}):
        weights = checkpoint["seed_state_dicts"][str(seed)]
    else:
        raise ValueError(f"checkpoint has no seed {seed}; it holds seeds {seeds}")
    model = build_model(meta["model_spec"], load_weights=False)
    trained_with = meta.get("normalisation") or {}
    now = getattr(model, "normalisation", None) or {}
    for key in ("mean", "std"):
        if key in trained_with and key in now and trained_with[key] != now[key]:
            raise ValueError(
                f"checkpoint {meta.get('model_spec', {}).get('name')} was trained with input "
                f"normalisation {key}={trained_with[key]}, but this version of rare-cxr feeds "
                f"{key}={now[key]} to a {meta['model_spec'].get('architecture')}: its "
                "predictions would be wrong. Retrain the model (its training state fingerprint "
                "changed, so `kedro run` trains it again)."
            )
    model.load_state_dict(weights)
    return model


def cache_fingerprint_text(image_cache: Any) -> str:
    """One string for the image cache's pixels + labels (what predictions record)."""
    fp = data_fingerprint(image_cache)
    return ":".join(str(fp[k]) for k in sorted(fp) if k != "size") + f":{fp['size']}px"


def predict(
    checkpoint: Mapping[str, Any], image_cache: Any, training: TrainingParams
) -> pd.DataFrame:
    """Probabilities for the val and test splits, for every seed of the checkpoint: image_id,
    patient_id, split, seed, 14 findings, then the lineage columns `checkpoint_version`,
    `training_id` (of that seed's training), `image_cache_fingerprint`."""
    cfg = training_params(training)
    device = resolve_device(cfg.device)
    dtype = amp_dtype(cfg, device)
    name = checkpoint["metadata"].get("model_spec", {}).get("name", "model")
    seeds = checkpoint_seeds(checkpoint)
    frames = []
    for seed in seeds:
        model = load_checkpoint_model(checkpoint, seed).to(device)
        for split in PREDICTION_SPLITS:
            if split not in image_cache.split_names:
                logger.warning("image cache has no %r split; no predictions for it", split)
                continue
            part = image_cache.split(split)
            probs, _ = predict_probabilities(
                model,
                part.images,
                device,
                batch_size=cfg.eval_batch_size,
                dtype=dtype,
                channels_last=False,
                tta_hflip=cfg.tta_hflip,
                progress_desc=(
                    f"{name} predict {split}" + (f" seed {seed}" if len(seeds) > 1 else "")
                    if cfg.progress_bar
                    else None
                ),
            )
            frame = pd.DataFrame(probs.astype("float64"), columns=list(FINDINGS))
            frame.insert(0, "seed", seed)
            frame.insert(0, "split", split)
            frame.insert(0, "patient_id", part.table["patient_id"].to_numpy())
            frame.insert(0, "image_id", part.table["image_id"].astype(str).to_numpy())
            frame["training_id"] = seed_training_id(checkpoint, seed)
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    meta = checkpoint["metadata"]
    out.insert(out.columns.get_loc("training_id"), "checkpoint_version", "")
    out["checkpoint_version"] = str(meta.get("checkpoint_version") or "unversioned")
    out["image_cache_fingerprint"] = cache_fingerprint_text(image_cache)
    return out
