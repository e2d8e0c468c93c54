"""The training data path: image-cache arrays to batches on the device.

Why a module of its own: the loop (`engine`) decides *what* to train on and when; this module
is *how* images get there -- the per-epoch sample order (a pure function of seed and epoch, so a
resume and every DDP rank agree), the global batches and each rank's micro-batches, the loader
threads that read ahead from the memory-mapped cache, and the conversion to float batches on the
device (pinned, asynchronous copies on CUDA). Everything here is deterministic given its
arguments; the bit-exact resume contract (tests/test_training_resume_ddp.py) depends on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → `device`; on CUDA from pinned memory, asynchronously (the loader threads
    pin training batches, so the training thread does not wait for that copy either)."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def to_batch(
    images: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """uint8 `[B, S, S]` → float `[B, 1, S, S]` in `[0, 1]` on `device` (converted there)."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        # slices of the cache's read-only memmap are copied (torch refuses non-writable
        # arrays); fancy-indexed training batches already are copies
        images = np.ascontiguousarray(images)
        x = torch.from_numpy(images if images.flags.writeable else images.copy())
    x = _to_device(x, device).unsqueeze(1).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize `[B, C, H, W]` to `size` x `size` exactly as the models' `Preprocess` does
    (bilinear, `align_corners=False`, antialiased when shrinking): fed this, a model of that
    scale skips its own resize. Normalisation and this resize commute (the interpolation
    weights sum to one), so resize-then-normalise equals normalise-then-resize up to rounding.
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
    out = F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
    )
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def train_input_size(model: nn.Module, cache_size: int) -> int | None:
    """The side to resize training batches to *before* augmentation, or None (augment at the
    cache size). A single-scale model smaller than the cache (the 224/299 px baselines on a
    448 px cache) is augmented at its own size: 4x fewer pixels to resample, and the model's
    internal resize becomes a no-op. A multi-scale model is augmented at the cache size, so
    that every scale sees the same augmented image."""
    scales = [int(s) for s in getattr(model, "scales", [])]
    if len(scales) == 1 and scales[0] < int(cache_size):
        return scales[0]
    return None


def _fetch(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, pin: bool = False
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    order = np.sort(idx)  # sorted reads are sequential in the memmap
    x, y = images[order], labels[order]
    if pin:  # page-locked here, in the loader thread, not in the training thread
        return torch.from_numpy(x).pin_memory(), torch.from_numpy(y).pin_memory()
    return x, y


def _prefetch(
    jobs: list[np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    threads: int,
    *,
    pin: bool = False,
) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]:
    """Yield batches in order, reading ahead from the memmap while the current one trains.

    `threads` loader threads keep `threads + 1` batches in flight: every thread reading one,
    plus one finished batch waiting (1 thread: 2 in flight, as before this rule).
    """
    if threads <= 0:
        for idx in jobs:
            yield _fetch(images, labels, idx)
        return
    depth = threads + 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = deque(
            pool.submit(_fetch, images, labels, jobs[i], pin) for i in range(min(depth, len(jobs)))
        )
        for i in range(len(jobs)):
            batch = pending.popleft().result()
            if i + depth < len(jobs):
                pending.append(pool.submit(_fetch, images, labels, jobs[i + depth], pin))
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


def batches_for(
    order: np.ndarray, batch_size: int, world: int, accumulation: int = 1
) -> list[np.ndarray]:
    """Global batches; a short last batch is kept only if it splits evenly into
    `accumulation` micro-batches times `world` ranks (DDP averages per-rank means) with >= 2
    samples per rank and micro-batch (BatchNorm cannot train on one)."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    parts = world * accumulation
    if out and len(out[-1]) < batch_size:
        r = len(out[-1])
        if r % parts or r // parts < 2:
            out.pop()
    return out


def micro_batches(batch: np.ndarray, world: int, rank: int, accumulation: int) -> list[np.ndarray]:
    """This rank's share of one global batch, as `accumulation` micro-batches.

    The global batch is sorted (sequential reads in the memmap), cut into `accumulation`
    global micro-batches of consecutive images, and each of those split evenly over the ranks:
    N processes see the same global micro-batches (and, with synchronised BatchNorm, the same
    statistics) as one process. Concatenated, a rank's micro-batches are sorted, so the rank
    reads, augments and splits its whole share at once: one process with any accumulation
    trains on exactly the images and augmentation draws of `accumulation_steps: 1`.
    """
    out = []
    for micro in np.split(np.sort(batch), accumulation):
        share = len(micro) // world
        out.append(micro[rank * share : (rank + 1) * share])
    return out


@dataclass
class TrainingData:
    """The train and val arrays of the image cache (memmaps and float32 label matrices)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    size: int  # the cache's square side

    @classmethod
    def from_cache(cls, cache: Any, name: str) -> TrainingData:
        train, val = cache.split("train"), cache.split("val")
        data = cls(
            train.images,
            np.asarray(train.labels, dtype=np.float32),
            val.images,
            np.asarray(val.labels, dtype=np.float32),
            int(cache.size),
        )
        if len(data.train_labels) < 2 or len(data.val_labels) < 1:
            raise ValueError(
                f"{name}: the image cache needs >= 2 train and >= 1 val images "
                f"(has {len(data.train_labels)} / {len(data.val_labels)})"
            )
        return data
