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


def write_synthetic_cache(
    path: Path,
    n_train: int,
    n_val: int,
    size: int,
    seed: int = 0,
    *,
    pixels: np.ndarray | None = None,
) -> None:
    """A cache folder in `rare_cxr.image_cache` format: meta.json, <split>.npy and .parquet.

    Pixels are random, or the rows of `pixels` (uint8 [K, size, size], e.g. decoded PNGs)
    repeated cyclically."""
    rng = np.random.default_rng(seed)
    if pixels is not None and pixels.shape[1:] != (size, size):
        raise ValueError(f"pixels have shape {pixels.shape}, expected [K, {size}, {size}]")
    path.mkdir(parents=True, exist_ok=True)
    prevalence = np.array([NIH_PREVALENCE[f] for f in FINDINGS])
    counts = {"train": n_train, "val": n_val}
    for split, n in counts.items():
        images = np.lib.format.open_memmap(
            path / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
        )
        for start in range(0, n, 256):  # chunks: never the whole array in memory
            stop = min(start + 256, n)
            if pixels is None:
                images[start:stop] = rng.integers(0, 256, (stop - start, size, size), np.uint8)
            else:
                images[start:stop] = pixels[np.arange(start, stop) % len(pixels)]
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
        "fingerprint": f"synthetic-bench-{seed}-{n_train}-{n_val}-{size}"
        + ("" if pixels is None else f"-pixels{len(pixels)}"),
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
    # steady state: the steps after the warm-up ones (cuDNN autotuning, allocator growth);
    # `images_per_s` is fit's own whole-epoch figure, warm-up included
    steady = (
        batch * (len(step_times) - 1 - WARMUP_STEPS) / (step_times[-1] - step_times[WARMUP_STEPS])
        if len(step_times) > WARMUP_STEPS + 1 and step_times[-1] > step_times[WARMUP_STEPS]
        else None
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
        "steady_images_per_s": round(steady, 1) if steady else None,
        "nih_epoch_min_steady": round(NIH_TOTAL_IMAGES / steady / 60, 2) if steady else None,
        "cache_write_s": round(cache_write_s, 1),
        "gpu_util_mean": round(float(np.mean(window)), 1) if window else None,
        "gpu_util_median": round(float(np.median(window)), 1) if window else None,
        "gpu_util_samples": len(window),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
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


def section_epoch(quick: bool, device: str, fraction: float = 1.0) -> list[dict[str, Any]]:
    """conf/nih multi-scale ResNet-50 (cache 448) and plain ResNet-50 at 224 (cache 224);
    `fraction` scales the training images of each epoch (a shorter GPU check)."""
    if quick:  # smoke sizes: tiny images, a handful of steps, any device
        cases = [("resnet18", [32, 64], 64, 48, 8, 8)]
    else:
        cases = [
            ("resnet50", [224, 448], 448, 16_384, 1024, 64),  # conf/nih model and batch
            ("resnet50", [224], 224, 32_768, 1024, 256),  # NVIDIA's ResNet-50 figure's batch
        ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rare_cxr_bench_epoch_") as tmp:
        for backbone, scales, size, n_default, n_val, batch in cases:
            n_train = (  # whole batches, and enough steps for the warm-up window
                n_default
                if quick
                else max(4 * WARMUP_STEPS, round(n_default * fraction / batch)) * batch
            )
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


def main(argv: list[str] | None = None) -> int:
    """A few steps of the conf/nih training (the GPU check's step b): img/s and peak memory."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import emit, machine_info

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=40, help="training steps (first 10 warm-up)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument(
        "--model",
        default="nih",
        choices=["nih", "resnet50-224", "smoke"],
        help="nih: conf/nih's multiscale_resnet (resnet50 [224, 448], cache 448, its batch); "
        "resnet50-224: plain ResNet-50 at 224 (batch 256); smoke: resnet18 [32, 64], cache 64, "
        "batch 8 (CPU smoke test)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default: as --model says")
    parser.add_argument("--size", type=int, default=None, help="cache side (default: per model)")
    parser.add_argument("--val", type=int, default=256, help="validation images")
    parser.add_argument("--output", default=None, help="append the JSON line here too")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA: CUDA is not available on this machine -- nothing measured.")
        return 0
    training, model, _ = nih_training_config()
    if args.model == "nih":
        backbone, scales = str(model["backbone"]), [int(s) for s in model["scales"]]
        size, batch = max(scales), int(training["batch_size"])
    elif args.model == "resnet50-224":
        backbone, scales, size, batch = "resnet50", [224], 224, 256
    else:
        backbone, scales, size, batch = "resnet18", [32, 64], 64, 8
    size, batch = args.size or size, args.batch or batch
    with tempfile.TemporaryDirectory(prefix="rare_cxr_gpu_steps_") as tmp:
        row = run_epoch(
            case=f"{backbone} {scales} ({args.model})",
            backbone=backbone,
            scales=scales,
            cache_size=size,
            n_train=args.steps * batch,
            n_val=args.val,
            batch=batch,
            device=args.device,
            workdir=Path(tmp),
        )
    emit([{**row, "machine": machine_info()}], args.output, stream=None)
    print(
        f"{row['case']} on {row['device']} ({row['mode']}), batch {batch}, cache {size} px, "
        f"{row['steps']} steps: {row['images_per_s']:,.1f} img/s over the epoch, "
        f"{row['steady_images_per_s'] or float('nan'):,.1f} img/s after {WARMUP_STEPS} warm-up "
        f"steps; peak memory {row['peak_mem_gib']} GiB allocated / "
        f"{row['peak_reserved_gib']} GiB reserved; GPU utilisation mean "
        f"{row['gpu_util_mean']} % ({row['gpu_util_samples']} samples); one NIH epoch "
        f"({NIH_TOTAL_IMAGES:,} images) ~ {row['nih_epoch_min_steady']} min at the steady rate"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
