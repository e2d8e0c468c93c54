"""Validation of `params:training`: every key checked before any work, errors name the key."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from rare_cxr.findings import FINDINGS

DEFAULTS: dict[str, Any] = {
    "seed": 42,
    # Train every model n_seeds times, with seeds seed, seed+1, ... (see docs/training.md).
    "n_seeds": 1,
    "device": "auto",
    "devices": 1,
    "epochs": 8,
    "patience": 3,
    "batch_size": 32,
    # Split every global batch into this many micro-batches and step the optimiser once per
    # global batch (gradient accumulation for small GPUs; see docs/training.md).
    "accumulation_steps": 1,
    "eval_batch_size": 64,
    "optimizer": {"lr": 1e-3, "weight_decay": 1e-4, "eps": 1e-8},
    "schedule": {
        "name": "cosine",
        "warmup_epochs": 1,
        "min_lr_ratio": 0.01,
        "plateau_factor": 0.5,
        "plateau_patience": 1,
    },
    "loss": {"name": "bce", "balanced": True, "pos_weight_cap": 100.0, "focal_gamma": 2.0},
    "oversample_rare": {"enabled": False, "power": 0.5},
    "transfer": {
        "two_stage": False,
        "rare_findings": ["Hernia", "Pneumonia", "Fibrosis", "Edema", "Emphysema"],
        "stage1_epochs": 4,
        "stage2_targets": "all",
        "frozen_trunk_epochs": 1,
    },
    "amp": "auto",
    "channels_last": "auto",
    "compile": False,
    "deterministic": False,
    "sync_batchnorm": True,
    "loader_threads": 1,
    "resume": True,
    # Reuse a finished training of the same fingerprint instead of training again.
    "reuse_finished": True,
    # Folder of training states for direct `fit` calls (tests, benchmarks). In a Kedro run the
    # folder is the catalog entry `<model>.training_state` and this key must stay unset.
    "resume_dir": None,
    "tta_hflip": False,
    "progress_bar": True,
}

_AUTO_BOOL = ("auto", True, False)


def _merge(base: dict[str, Any], over: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise ValueError(f"{where}.{key}: unknown parameter; known: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _int(cfg: Mapping[str, Any], key: str, where: str, minimum: int) -> None:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")


def _num(
    cfg: Mapping[str, Any],
    key: str,
    where: str,
    low: float,
    *,
    high: float | None = None,
    low_inclusive: bool = False,
) -> None:
    value = cfg[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = value >= low if low_inclusive else value > low
        ok = ok and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high else "")
        raise ValueError(f"{where}.{key}: expected a number {bound}, got {value!r}")


def validate_training_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge `params` over the defaults and check every value; the error names the key."""
    where = "training"
    cfg = _merge(DEFAULTS, params or {}, where)
    _int(cfg, "seed", where, 0)
    _int(cfg, "n_seeds", where, 1)
    _int(cfg, "devices", where, 1)
    _int(cfg, "epochs", where, 1)
    _int(cfg, "patience", where, 1)
    _int(cfg, "batch_size", where, 1)
    _int(cfg, "eval_batch_size", where, 1)
    _int(cfg, "accumulation_steps", where, 1)
    accumulation = cfg["accumulation_steps"]
    if cfg["batch_size"] % accumulation or cfg["batch_size"] // accumulation < 2:
        raise ValueError(
            f"{where}.accumulation_steps ({accumulation}) must divide {where}.batch_size "
            f"({cfg['batch_size']}) into micro-batches of at least 2 images each (BatchNorm "
            "cannot train on one image)"
        )
    _int(cfg, "loader_threads", where, 0)
    device = cfg["device"]
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "mps", "cuda") or device.startswith("cuda:")
    ):
        raise ValueError(f"{where}.device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    opt = cfg["optimizer"]
    _num(opt, "lr", f"{where}.optimizer", 0.0)
    _num(opt, "weight_decay", f"{where}.optimizer", 0.0, low_inclusive=True)
    _num(opt, "eps", f"{where}.optimizer", 0.0)
    sch = cfg["schedule"]
    if sch["name"] not in ("cosine", "plateau", "constant"):
        raise ValueError(
            f"{where}.schedule.name: expected cosine, plateau or constant, got {sch['name']!r}"
        )
    _int(sch, "warmup_epochs", f"{where}.schedule", 0)
    _num(sch, "min_lr_ratio", f"{where}.schedule", 0.0, high=1.0, low_inclusive=True)
    _num(sch, "plateau_factor", f"{where}.schedule", 0.0, high=1.0)
    _int(sch, "plateau_patience", f"{where}.schedule", 0)
    loss = cfg["loss"]
    if loss["name"] not in ("bce", "focal"):
        raise ValueError(f"{where}.loss.name: expected bce or focal, got {loss['name']!r}")
    if not isinstance(loss["balanced"], bool):
        raise ValueError(f"{where}.loss.balanced: expected true or false, got {loss['balanced']!r}")
    _num(loss, "pos_weight_cap", f"{where}.loss", 1.0, low_inclusive=True)
    _num(loss, "focal_gamma", f"{where}.loss", 0.0, low_inclusive=True)
    over = cfg["oversample_rare"]
    if not isinstance(over["enabled"], bool):
        raise ValueError(f"{where}.oversample_rare.enabled: expected true or false")
    _num(over, "power", f"{where}.oversample_rare", 0.0, high=1.0)
    tr = cfg["transfer"]
    if not isinstance(tr["two_stage"], bool):
        raise ValueError(f"{where}.transfer.two_stage: expected true or false")
    rare = tr["rare_findings"]
    if not isinstance(rare, list | tuple) or not rare:
        raise ValueError(f"{where}.transfer.rare_findings: expected a non-empty list of findings")
    for name in rare:
        if name not in FINDINGS:
            raise ValueError(
                f"{where}.transfer.rare_findings: unknown finding {name!r}; "
                f"expected names from {list(FINDINGS)}"
            )
    if len(set(rare)) == len(FINDINGS):
        raise ValueError(
            f"{where}.transfer.rare_findings: every finding is rare, stage 1 "
            "would have nothing to learn"
        )
    _int(tr, "stage1_epochs", f"{where}.transfer", 1)
    if tr["stage2_targets"] not in ("all", "rare"):
        raise ValueError(
            f"{where}.transfer.stage2_targets: expected all or rare, got {tr['stage2_targets']!r}"
        )
    _int(tr, "frozen_trunk_epochs", f"{where}.transfer", 0)
    for key in ("amp", "channels_last"):
        if cfg[key] not in _AUTO_BOOL:
            raise ValueError(f"{where}.{key}: expected auto, true or false, got {cfg[key]!r}")
    for key in (
        "compile",
        "deterministic",
        "sync_batchnorm",
        "resume",
        "reuse_finished",
        "tta_hflip",
        "progress_bar",
    ):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{where}.{key}: expected true or false, got {cfg[key]!r}")
    if cfg["resume_dir"] is not None and (
        not isinstance(cfg["resume_dir"], str) or not cfg["resume_dir"]
    ):
        raise ValueError(
            f"{where}.resume_dir: expected a folder path or null, got {cfg['resume_dir']!r}"
        )
    return cfg
