"""One training epoch of the project's own loop fed from an on-disk image cache (issue 5, §4).

Why this exists next to the in-memory GPU section: a GPU figure measured on batches that
already sit in GPU memory says nothing about whether the *loader* keeps up. Here every batch
takes the path a real NIH run takes: sorted gather from the cache's read-only memmap (prefetch
thread) → pinned host copy → device → `BatchAugmenter` on device (the conf/nih policy) →
AMP + channels_last forward/backward → Adam, inside `rare_cxr.training.fit`, the function the
Kedro training node calls. Meanwhile `nvidia-smi` samples GPU utilisation every 100 ms; only
samples between the end of the warm-up steps and the last training step count, so model
start-up and validation do not dilute the figure.

The cache is synthetic (random pixels, labels at NIH prevalences) but written in the exact
on-disk format of `rare_cxr.image_cache` and opened with its reader (`ImageCache`), so the
memmap I/O is real. On CPU (`device="cpu"`) the same code runs for the smoke test; there is no
utilisation figure there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from rare_cxr.augment import BatchAugmenter, validate_policy
from rare_cxr.findings import FINDINGS, NIH_PREVALENCE, NIH_TOTAL_IMAGES
from rare_cxr.image_cache import FORMAT_VERSION, ImageCache
from rare_cxr.pipelines.training.nodes import split_training_overrides
from rare_cxr.training import TrainingCallbacks, fit

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 10  # excluded from the utilisation window: cuDNN autotuning, allocator growth


def write_synthetic_cache(path: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> None:
    """A cache folder in `rare_cxr.image_cache` format: meta.json, <split>.npy and .parquet."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    prevalence = np.array([NIH_PREVALENCE[f] for f in FINDINGS])
    counts = {"train": n_train, "val": n_val}
    for split, n in counts.items():
        images = np.lib.format.open_memmap(
            path / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
        )
        for start in range(0, n, 256):  # chunks: never the whole array in memory
            stop = min(start + 256, n)
            images[start:stop] = rng.integers(0, 256, (stop - start, size, size), dtype=np.uint8)
        images.flush()
        del images
        labels = (rng.random((n, len(FINDINGS))) < prevalence).astype(np.int8)
        table = pd.DataFrame(
            {"image_id": [f"{i:08d}_000.png" for i in range(n)], "patient_id": np.arange(n)}
        )
        table[list(FINDINGS)] = labels
        table.to_parquet(path / f"{split}.parquet", index=False)
    meta = {
        "format_version": FORMAT_VERSION,
        "size": size,
        "findings": list(FINDINGS),
        "counts": counts,
        "fingerprint": f"synthetic-bench-{seed}-{n_train}-{n_val}-{size}",
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2))


def nih_training_config() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(training params, multi-scale model spec, augmentation policy) exactly as
    `kedro run --env nih` resolves them (Kedro's own config loader and soft merge)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env="nih") as session:
        params = session.load_context().params
    return (
        dict(params["training"]),
        dict(params["multiscale_resnet"]["model"]),
        dict(params["augmentation"]),
    )


class UtilisationSampler:
    """GPU utilisation (%) samples with host timestamps, from `nvidia-smi -lms 100`."""

    def __init__(self, device_index: int = 0) -> None:
        self.samples: list[tuple[float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._index = device_index

    def __enter__(self) -> UtilisationSampler:
        if self.available:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={self._index}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                continue

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def window(self, start: float, stop: float) -> list[float]:
        return [u for t, u in self.samples if start <= t <= stop]


def run_epoch(
    *,
    case: str,
    backbone: str,
    scales: list[int],
    cache_size: int,
    n_train: int,
    n_val: int,
    batch: int,
    device: str,
    workdir: Path,
) -> dict[str, Any]:
    """Build the synthetic cache, train one epoch with the conf/nih settings, measure."""
    training, model, policy = nih_training_config()
    model, training = split_training_overrides(model, training)  # as the training node does
    model_spec = {**model, "name": "bench_epoch", "backbone": backbone, "scales": scales}
    model_spec["pretrained"] = "none"  # weights do not change speed; no download on the device
    cache_dir = workdir / f"cache_{cache_size}_{n_train}"
    t0 = time.perf_counter()
    write_synthetic_cache(cache_dir, n_train, n_val, cache_size)
    cache_write_s = time.perf_counter() - t0
    params = OmegaConf.to_container(
        OmegaConf.merge(
            training,
            {
                "epochs": 1,
                "patience": 1,
                "batch_size": batch,
                "eval_batch_size": max(batch, 64),
                "device": device,
                "devices": 1,
                "transfer": {"two_stage": False},
                "resume": False,
                "resume_dir": str(workdir / "resume"),
                "progress_bar": False,
            },
        )
    )
    step_times: list[float] = []

    def on_step(epoch: int, step: int) -> None:
        step_times.append(time.perf_counter())

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    augmenter = BatchAugmenter(validate_policy(policy))
    with UtilisationSampler() if cuda else _NoSampler() as sampler:
        result = fit(
            model_spec,
            ImageCache(cache_dir),
            augmenter,
            params,
            callbacks=TrainingCallbacks(on_step=on_step),
        )
    assert result is not None
    row = result.history.iloc[-1]
    images_per_s = float(row["img_per_s"])
    window = (
        sampler.window(step_times[WARMUP_STEPS], step_times[-1])
        if len(step_times) > WARMUP_STEPS + 1
        else []
    )
    out: dict[str, Any] = {
        "section": "epoch",
        "case": case,
        "mode": "amp+channels_last" if cuda else "cpu",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch": batch,
        "input": cache_size,
        "scales": scales,
        "train_images": n_train,
        "steps": len(step_times),
        "images_per_s": round(images_per_s, 1),
        "nih_epoch_min": round(NIH_TOTAL_IMAGES / images_per_s / 60, 2),
        "cache_write_s": round(cache_write_s, 1),
        "gpu_util_mean": round(float(np.mean(window)), 1) if window else None,
        "gpu_util_median": round(float(np.median(window)), 1) if window else None,
        "gpu_util_samples": len(window),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out


class _NoSampler:
    def __enter__(self) -> _NoSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def window(self, start: float, stop: float) -> list[float]:
        return []


def section_epoch(quick: bool, device: str) -> list[dict[str, Any]]:
    """conf/nih multi-scale ResNet-50 (cache 448) and plain ResNet-50 at 224 (cache 224)."""
    if quick:  # smoke sizes: tiny images, a handful of steps, any device
        cases = [("resnet18", [32, 64], 64, 48, 8, 8)]
    else:
        cases = [
            ("resnet50", [224, 448], 448, 16_384, 1024, 64),  # conf/nih model and batch
            ("resnet50", [224], 224, 32_768, 1024, 256),  # NVIDIA's ResNet-50 figure's batch
        ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rare_cxr_bench_epoch_") as tmp:
        for backbone, scales, size, n_train, n_val, batch in cases:
            rows.append(
                run_epoch(
                    case=f"{backbone} {scales}",
                    backbone=backbone,
                    scales=scales,
                    cache_size=size,
                    n_train=n_train,
                    n_val=n_val,
                    batch=batch,
                    device=device,
                    workdir=Path(tmp),
                )
            )
    return rows
