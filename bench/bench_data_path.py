"""Data path benchmark: images/s delivered to a training loop, cache + batched augmentation
versus the usual per-item PIL decode + torchvision transforms in a DataLoader.

Both paths deliver float [B, 1, S, S] batches in [0, 1], augmented with the same kind of
policy, from the same images, with the same number of worker processes:

* `per_item`: DataLoader over a Dataset whose __getitem__ decodes the 1024^2 PNG with PIL
  (rare_cxr.imaging.load_grayscale), resizes it to S, and applies torchvision v2 per-sample
  transforms (RandomAffine, RandomHorizontalFlip, ColorJitter) — what most peers do.
* `cache_loader`: the same DataLoader/workers, but each worker gathers a whole random batch
  of uint8 rows from the image-cache memmap; the main process applies BatchAugmenter.
* `cache_inline`: no workers at all — index the memmap in the training loop.

Plus the one-off cost of building the cache (decode + resize + write), per image.
Real NIH PNGs from ../shared/data/nih14-sample are used when present (replicated to
`--images` items); otherwise phantom-like synthetic 1024^2 PNGs are generated.

    .venv/bin/python bench/bench_data_path.py                 # ~1-2 min
    .venv/bin/python bench/bench_data_path.py --quick         # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, format_table, machine_info  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = (
    Path(os.environ.get("RARE_CXR_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    / "nih14-sample"
    / "images"
)

# The policy of BOTH paths of this comparison (not conf/base's): rotation, scale, translation,
# brightness and contrast as in conf/base and conf/nih (parameters_augmentation.yml), but
# hflip_probability 0.5 (they have 0.0), gamma off [1, 1] (they have [0.9, 1.1]) and noise off
# (they have noise_std 0.01), so that the per-item torchvision v2 path below (RandomAffine,
# RandomHorizontalFlip, ColorJitter brightness/contrast: no gamma, no noise) does the same work.
# bench/bench_loader.py times BatchAugmenter with the configured conf/base and conf/nih policies.
POLICY: dict[str, Any] = {
    "rotation_degrees": 7.0,
    "scale": [0.92, 1.08],
    "translate": 0.04,
    "hflip_probability": 0.5,
    "brightness": [0.9, 1.1],
    "contrast": [0.9, 1.1],
    "gamma": [1.0, 1.0],
    "noise_std": 0.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=12.0,
        help="measurement time per loader (after a warm-up batch)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=2000,
        help="items in the benchmark dataset (source PNGs are replicated)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes for both loaders and the cache build (default: usable cores)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="cache / training image side")
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help=f"folder of PNGs (default: {DEFAULT_SAMPLE} if present, else synthetic)",
    )
    parser.add_argument(
        "--build-images",
        type=int,
        default=None,
        help="images decoded to time the cache build (default: all distinct "
        "source PNGs, at most --images)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="append JSON lines here too (stdout always gets them)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test mode: tiny synthetic images, ~1 s per loader",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 0.5)
        args.images = min(args.images, 64)
        args.size = min(args.size, 64)
        args.batch_size = min(args.batch_size, 8)
        if args.workers is None:
            args.workers = 1
    if args.workers is None:
        from common import usable_cores

        args.workers = usable_cores()
    return args


# ------------------------------------------------------------------------------------------
# Source images
# ------------------------------------------------------------------------------------------


def synthetic_pngs(folder: Path, count: int, side: int) -> list[Path]:
    """Phantom-like chest films: bright body ellipse, two dark lungs, noise (PNG-realistic
    entropy, so decode cost resembles a real radiograph's)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    paths = []
    for k in range(count):
        body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.48) ** 2 < 1
        lung_l = ((xx - 0.33) / 0.12) ** 2 + ((yy - 0.48) / 0.25) ** 2 < 1
        lung_r = ((xx - 0.67) / 0.12) ** 2 + ((yy - 0.48) / 0.25) ** 2 < 1
        img = 40 + 150 * body - 90 * (lung_l | lung_r) + rng.normal(0, 12, (side, side))
        path = folder / f"{k + 1:08d}_000.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def source_paths(args: argparse.Namespace, scratch: Path) -> tuple[list[Path], str]:
    folder = args.source or (None if args.quick else DEFAULT_SAMPLE)
    if folder is not None and folder.is_dir():
        files = sorted(folder.glob("*.png"))
        if files:
            return files, f"real PNGs from {folder} ({len(files)} distinct)"
    side = 128 if args.quick else 1024
    count = 8 if args.quick else 32
    return synthetic_pngs(scratch / "synthetic", count, side), (
        f"synthetic phantom-like {side}^2 PNGs ({count} distinct)"
    )


# ------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------


class PerItemDataset:
    """The usual approach: decode + resize + per-sample torchvision v2 transforms per item."""

    def __init__(self, paths: list[str], size: int) -> None:
        from torchvision.transforms import v2

        self.paths = paths
        self.size = size
        self.transform = v2.Compose(
            [
                v2.RandomAffine(
                    degrees=POLICY["rotation_degrees"],
                    translate=(POLICY["translate"], POLICY["translate"]),
                    scale=tuple(POLICY["scale"]),
                ),
                v2.RandomHorizontalFlip(POLICY["hflip_probability"]),
                v2.ColorJitter(brightness=0.1, contrast=0.1),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        from rare_cxr.imaging import load_grayscale

        gray = Image.fromarray(load_grayscale(self.paths[i]))
        gray = gray.resize((self.size, self.size), Image.Resampling.BILINEAR)
        tensor = torch.from_numpy(np.asarray(gray).copy()).float().div_(255).unsqueeze(0)
        return self.transform(tensor)


class CacheBatches:
    """Map-style dataset whose item is a whole random batch of uint8 rows from the memmap."""

    def __init__(self, npy: str, batch_size: int, n_batches: int, seed: int = 0) -> None:
        self.npy = npy
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.seed = seed
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self.n_batches))

    def __getitem__(self, i: int):
        import torch

        if self._images is None:  # open lazily: each worker maps the file itself
            self._images = np.load(self.npy, mmap_mode="r")
        rng = np.random.default_rng((self.seed, i))
        index = np.sort(rng.choice(len(self._images), self.batch_size, replace=False))
        return torch.from_numpy(self._images[index])


def _init_worker(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Epoch after epoch (epoch boundaries, e.g. worker restarts, are part of the cost)."""
    while True:
        yield from batches


def measure(batches: Iterable[Any], seconds: float, to_float=None, augment=None) -> dict:
    """Images/s a consumer sees: time from the first delivered batch to `seconds` later."""
    iterator: Iterator[Any] = forever(batches)
    start_up = time.perf_counter()
    first = next(iterator)  # warm-up: worker start-up and first decode are reported apart
    first_batch_s = time.perf_counter() - start_up
    del first
    images = 0
    checksum = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(iterator)
        if to_float is not None:
            batch = to_float(batch)
        if augment is not None:
            batch = augment(batch)
        checksum += float(batch[:, :, ::16, ::16].sum())  # the "training loop" touches it
        images += batch.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "images": images,
        "seconds": round(elapsed, 3),
        "images_per_s": images / elapsed if elapsed else 0.0,
        "first_batch_s": round(first_batch_s, 3),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from torch.utils.data import DataLoader

    from rare_cxr.augment import BatchAugmenter
    from rare_cxr.findings import FINDINGS
    from rare_cxr.image_cache import plan_image_cache

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-path-") as tmp:
        scratch = Path(tmp)
        files, source = source_paths(args, scratch)
        paths = [str(files[i % len(files)]) for i in range(args.images)]
        common = {
            "bench": "data_path",
            "source": source,
            "items": len(paths),
            "size": args.size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "policy": POLICY,
        }

        # 1. one-off cache build: decode every distinct file once (replicas would only
        #    re-measure the same decode), timed end to end including pool start-up and fsync
        n_build = args.build_images or min(len(files), len(paths))
        build_ids = [f"{i + 1:08d}_000.png" for i in range(n_build)]
        build_paths = [str(files[i % len(files)]) for i in range(n_build)]
        frame = {"image_id": build_ids, "patient_id": list(range(n_build)), "split": "train"}
        import pandas as pd

        labels = pd.DataFrame(frame).drop(columns="split")
        for finding in FINDINGS:
            labels[finding] = 0
        index = pd.DataFrame({"image_id": build_ids, "path": build_paths, "status": "ok"})
        plan = plan_image_cache(
            pd.DataFrame(frame), index, labels, size=args.size, workers=args.workers
        )
        started = time.perf_counter()
        plan.build(scratch / "cache")
        build_s = time.perf_counter() - started
        results.append(
            {
                **common,
                "case": "cache_build",
                "images": n_build,
                "seconds": round(build_s, 3),
                "images_per_s": n_build / build_s,
                "ms_per_image": 1000 * build_s / n_build,
                "ms_per_image_per_worker": 1000 * build_s * args.workers / n_build,
            }
        )

        # the benchmark cache holds `--images` rows: replicate the decoded rows
        decoded = np.load(scratch / "cache" / "train.npy", mmap_mode="r")
        big = np.lib.format.open_memmap(
            scratch / "bench.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(len(paths), args.size, args.size),
        )
        for start in range(0, len(paths), 512):
            rows = np.arange(start, min(start + 512, len(paths))) % len(decoded)
            big[start : start + len(rows)] = decoded[rows]
        big.flush()
        del big, decoded

        augmenter = BatchAugmenter(POLICY)
        generator = torch.Generator().manual_seed(0)

        def to_float(batch: torch.Tensor) -> torch.Tensor:
            return batch.unsqueeze(1).float().div_(255)

        def augment(batch: torch.Tensor) -> torch.Tensor:
            return augmenter(batch, generator=generator)

        n_batches = 10**6  # effectively endless; the clock stops the loop
        loader_kwargs = {
            "num_workers": args.workers,
            "worker_init_fn": _init_worker,
            "persistent_workers": False,
        }
        if args.workers:
            loader_kwargs["prefetch_factor"] = 4

        # 2a. cache, no workers: the training loop indexes the memmap itself
        inline = CacheBatches(str(scratch / "bench.npy"), args.batch_size, n_batches)
        results.append(
            {
                **common,
                "case": "cache_inline",
                "workers": 0,
                **measure(inline, args.seconds, to_float, augment),
            }
        )
        # 2b. cache, same DataLoader workers as the per-item path
        cache_loader = DataLoader(
            CacheBatches(str(scratch / "bench.npy"), args.batch_size, n_batches),
            batch_size=None,
            **loader_kwargs,
        )
        results.append(
            {
                **common,
                "case": "cache_loader",
                **measure(cache_loader, args.seconds, to_float, augment),
            }
        )
        # 3. per-item decode + resize + torchvision v2 per sample
        per_item = DataLoader(
            PerItemDataset(paths, args.size),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            **loader_kwargs,
        )
        results.append({**common, "case": "per_item", **measure(per_item, args.seconds)})

    per_item_rate = results[-1]["images_per_s"] or float("nan")
    for r in results:
        if r["case"] != "cache_build":
            r["ratio_vs_per_item"] = r["images_per_s"] / per_item_rate
    return results


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    machine = machine_info()
    results = [{**r, "machine": machine} for r in run(args)]
    emit(results, args.output)
    print(file=sys.stderr)
    print(
        f"# data path — {machine['cpu']}, {machine['cores']} cores, gpu={machine['gpu']}, "
        f"{results[0]['source']}, {results[0]['items']} items, {args.size}px, "
        f"batch {args.batch_size}, {args.workers} worker(s)",
        file=sys.stderr,
    )
    print(
        format_table(
            results,
            [
                "case",
                "workers",
                "images_per_s",
                "ratio_vs_per_item",
                "first_batch_s",
                "ms_per_image",
            ],
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
