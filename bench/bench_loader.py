"""Loader benchmark: raw delivery rate of the image-cache loader vs per-item PNG decode, and the
per-batch cost of `BatchAugmenter` on its own (issue 11, item 8).

Sections (JSON lines on stdout / --output, a table on stderr):

delivery   images/s of *uint8 batches handed to the consumer*, no augmentation, no model, no
           float conversion:
           * `cache_prefetch`: the training engine's own path, `rare_cxr.training.engine`'s
             `epoch_order` -> `batches_for` -> `_prefetch`/`_fetch` (sorted fancy-index gather
             from the read-only memmap of a real on-disk cache opened with `ImageCache`, read
             ahead by `loader_threads` threads), epoch after epoch, exactly as `fit` iterates it;
           * `per_item_png`: a torch DataLoader whose workers decode each PNG and resize it
             (`rare_cxr.image_cache.decode_resized`: the very pixels the cache stores) and
             collate uint8 batches, shuffled, `--workers` processes.
           The cache rows are the decoded source PNGs repeated to `--cache-rows`; the file was
           just written, so it is in the OS page cache (as a 22.5 GB NIH cache is after its
           first epoch on a 128 GB machine). Ratio = cache / per-item img/s, same batch size.
augment    ms per batch and img/s of `BatchAugmenter` alone on float [B, 1, S, S] batches, with
           the conf/base and conf/nih augmentation policies (as `kedro run [--env nih]` resolves
           them) at each `--aug-sizes` side and each environment's `training.batch_size`; plus
           the nih policy split into its geometric / photometric / noise parts (where the time
           goes). Median of `--aug-reps` timed calls after a warm-up call.

    .venv/bin/python bench/bench_loader.py                     # ~2 min on 2 cores
    .venv/bin/python bench/bench_loader.py --quick             # smoke test, seconds
    .venv/bin/python bench/bench_loader.py --only augment --aug-devices cpu,cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, env_parameters, format_table, machine_info, usable_cores  # noqa: E402

SECTIONS = ("delivery", "augment")
PER_ITEM_LENGTH = 100_000


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="delivery: measured seconds per loader"
    )
    parser.add_argument(
        "--sizes", type=_int_list, default=[224, 448], help="delivery: cache sides (px)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="delivery batch (conf/nih training.batch_size)"
    )
    parser.add_argument("--cache-rows", type=int, default=2048, help="delivery: rows in the cache")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="delivery: per-item DataLoader worker processes (default: usable cores)",
    )
    parser.add_argument(
        "--loader-threads",
        type=_int_list,
        default=None,
        help="delivery: engine prefetch threads to measure (default: conf/base's and conf/nih's "
        "training.loader_threads)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="folder of PNGs (default: the NIH sample if present, else synthetic 1024^2)",
    )
    parser.add_argument("--aug-sizes", type=_int_list, default=[128, 448], help="augment: sides")
    parser.add_argument("--aug-reps", type=int, default=7, help="augment: timed calls per case")
    parser.add_argument(
        "--aug-devices", default="cpu", help="augment: devices, e.g. cpu or cpu,cuda"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the augment section (default: usable cores)",
    )
    parser.add_argument("--output", type=Path, default=None, help="append JSON lines here too")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if sections - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(sections - set(SECTIONS))}")
    args.sections = sections
    if args.quick:
        args.seconds = min(args.seconds, 0.5)
        args.sizes = [min(s, 64) for s in args.sizes][:1]
        args.batch_size = min(args.batch_size, 8)
        args.cache_rows = min(args.cache_rows, 64)
        args.aug_sizes = [min(s, 32) for s in args.aug_sizes][:1]
        args.aug_reps = min(args.aug_reps, 2)
        if args.workers is None:
            args.workers = 1
    if args.workers is None:
        args.workers = usable_cores()
    if args.threads is None:
        args.threads = usable_cores()
    return args


# ------------------------------------------------------------------------------------------
# delivery
# ------------------------------------------------------------------------------------------


class PerItemPNG:
    """The usual per-item dataset: decode + resize one PNG per __getitem__, uint8 [S, S]."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from rare_cxr.image_cache import decode_resized

        # PIL hands back a read-only array; the copy is part of delivering a batch
        return torch.from_numpy(decode_resized(self.paths[i], self.size).copy())


def _init_worker(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def engine_batches(
    cache: Any, batch_size: int, threads: int, *, pin: bool = False, seed: int = 0
) -> Iterator[Any]:
    """Training batches exactly as `rare_cxr.training.fit` iterates them (one process),
    epoch after epoch: epoch order -> global batches -> this rank's share -> `_prefetch`."""
    import inspect

    from rare_cxr.training import engine

    train = cache.split("train")
    images, labels = train.images, np.asarray(train.labels, dtype=np.float32)
    # `pin` (page-locked in the loader thread, as fit does on CUDA) where the engine has it
    extra = {"pin": pin} if "pin" in inspect.signature(engine._prefetch).parameters else {}
    epoch = 0
    while True:
        jobs = engine.batches_for(engine.epoch_order(len(labels), seed, epoch, None), batch_size, 1)
        if hasattr(engine, "micro_batches"):  # the rank's share, as one sorted array
            jobs = [np.concatenate(engine.micro_batches(j, 1, 0, 1)) for j in jobs]
        for xb, _ in engine._prefetch(jobs, images, labels, threads, **extra):
            yield xb
        epoch += 1


def _forever(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from batches


def measure_delivery(batches: Iterator[Any], seconds: float) -> dict[str, Any]:
    """img/s seen by a consumer that only takes each batch (no conversion, no model)."""
    started = time.perf_counter()
    first = next(batches)  # start-up (pool, worker spawn, first decode) reported apart
    first_batch_s = time.perf_counter() - started
    dtype, shape = str(first.dtype), list(first.shape)
    del first
    images = batches_taken = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        images += int(batch.shape[0])
        batches_taken += 1
    elapsed = time.perf_counter() - start
    return {
        "images": images,
        "batches": batches_taken,
        "seconds": round(elapsed, 3),
        "images_per_s": images / elapsed if elapsed else 0.0,
        "first_batch_s": round(first_batch_s, 3),
        "batch_dtype": dtype.replace("torch.", ""),
        "batch_shape": shape,
    }


def section_delivery(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench_data_path import source_paths
    from gpu_epoch import write_synthetic_cache
    from torch.utils.data import DataLoader

    from rare_cxr.image_cache import ImageCache, decode_resized

    threads_list = args.loader_threads or sorted(
        {int(env_parameters(e)["training"]["loader_threads"]) for e in ("base", "nih")}
    )
    import torch

    pin = torch.cuda.is_available()  # fit pins training batches when it trains on CUDA
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        scratch = Path(tmp)
        files, source = source_paths(args, scratch)
        # the per-item dataset is long enough that no epoch (worker restart) ends inside the
        # window, however many workers: it is only a list of paths to the same PNGs
        paths = [str(files[i % len(files)]) for i in range(PER_ITEM_LENGTH)]
        for size in args.sizes:
            common = {
                "section": "delivery",
                "source": source,
                "size": size,
                "batch": args.batch_size,
                "cache_rows": args.cache_rows,
            }
            decoded = np.stack([decode_resized(str(f), size) for f in files])
            cache_dir = scratch / f"cache_{size}"
            write_synthetic_cache(cache_dir, args.cache_rows, 1, size, pixels=decoded)
            cache = ImageCache(cache_dir)
            for threads in threads_list:
                batches = engine_batches(cache, args.batch_size, threads, pin=pin)
                rows.append(
                    {
                        **common,
                        "case": "cache_prefetch",
                        "loader_threads": threads,
                        "workers": 0,
                        "pinned": pin,
                        **measure_delivery(batches, args.seconds),
                    }
                )
            loader_kwargs: dict[str, Any] = {
                "num_workers": args.workers,
                "worker_init_fn": _init_worker,
                "persistent_workers": False,
            }
            if args.workers:
                loader_kwargs["prefetch_factor"] = 4
            per_item = DataLoader(
                PerItemPNG(paths, size),
                batch_size=args.batch_size,
                shuffle=True,
                drop_last=True,
                **loader_kwargs,
            )
            # the per-item loader needs longer: a batch of 64 decodes takes ~0.5-1 s per worker
            rows.append(
                {
                    **common,
                    "case": "per_item_png",
                    "loader_threads": None,
                    "workers": args.workers,
                    **measure_delivery(_forever(per_item), args.seconds * 1.5),
                }
            )
            reference = rows[-1]["images_per_s"] or float("nan")
            for r in rows:
                if r["size"] == size:
                    r["ratio_vs_per_item"] = r["images_per_s"] / reference
            del cache
    return rows


# ------------------------------------------------------------------------------------------
# augment
# ------------------------------------------------------------------------------------------


def _parts(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The policy split into parts that each switch the others off."""
    geometric = {"rotation_degrees", "scale", "translate", "hflip_probability", "padding_mode"}
    photometric = {"brightness", "contrast", "gamma"}
    off: dict[str, Any] = {
        "rotation_degrees": 0.0,
        "scale": [1.0, 1.0],
        "translate": 0.0,
        "hflip_probability": 0.0,
        "brightness": [1.0, 1.0],
        "contrast": [1.0, 1.0],
        "gamma": [1.0, 1.0],
        "noise_std": 0.0,
    }

    def only(keys: set[str]) -> dict[str, Any]:
        return {**policy, **{k: v for k, v in off.items() if k not in keys}}

    return {
        "geometric only": only(geometric),
        "photometric only": only(photometric),
        "noise only": only({"noise_std"}),
    }


def section_augment(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case is timed once per round, round after round (interleaved), so that load from
    other processes on a shared machine falls on all cases alike; the median round counts."""
    import torch

    from rare_cxr.augment import BatchAugmenter

    torch.set_num_threads(args.threads)
    envs = {e: env_parameters(e) for e in ("base", "nih")}
    rows: list[dict[str, Any]] = []
    for device in [d.strip() for d in args.aug_devices.split(",") if d.strip()]:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("augment: CUDA is not available -- cuda rows skipped.", file=sys.stderr)
            continue
        dev = torch.device(device)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        cases: list[dict[str, Any]] = []
        for size in args.aug_sizes:
            per_size = []
            for env, params in envs.items():
                batch = int(params["training"]["batch_size"])
                batch = min(batch, 4) if args.quick else batch
                per_size.append((f"conf/{env}", "full policy", dict(params["augmentation"]), batch))
            nih_policy, nih_batch = per_size[-1][2], per_size[-1][3]
            per_size += [("conf/nih", part, p, nih_batch) for part, p in _parts(nih_policy).items()]
            for env, part, policy, batch in per_size:
                cases.append(
                    {
                        "env": env,
                        "part": part,
                        "size": size,
                        "batch": batch,
                        "policy": policy,
                        "augmenter": BatchAugmenter(policy),
                        "x": torch.rand(batch, 1, size, size, device=dev),
                        # on the batch's device, as `fit` draws augmentation
                        "generator": torch.Generator(device=dev).manual_seed(0),
                        "times": [],
                    }
                )
        for rep in range(args.aug_reps + 1):  # round 0 is the warm-up
            for case in cases:
                t0 = time.perf_counter()
                case["augmenter"](case["x"], generator=case["generator"])
                sync()
                if rep:
                    case["times"].append(time.perf_counter() - t0)
        for case in cases:
            median = statistics.median(case["times"])
            rows.append(
                {
                    "section": "augment",
                    "case": f"{case['env']} {case['part']}",
                    "env": case["env"],
                    "part": case["part"],
                    "device": device if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                    "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                    "size": case["size"],
                    "batch": case["batch"],
                    "ms_per_batch": round(1000 * median, 2),
                    "ms_per_batch_min": round(1000 * min(case["times"]), 2),
                    "images_per_s": round(case["batch"] / median, 1),
                    "reps": len(case["times"]),
                    "policy": case["policy"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    if "delivery" in args.sections:
        rows += section_delivery(args)
    if "augment" in args.sections:
        rows += section_augment(args)
    emit([{**r, "quick": args.quick, "machine": machine} for r in rows], args.output)
    print(
        f"\n# loader — {machine['cpu']}, {machine['cores']} cores, gpu={machine['gpu']}",
        file=sys.stderr,
    )
    columns = [
        "section",
        "case",
        "device",
        "size",
        "batch",
        "loader_threads",
        "workers",
        "images_per_s",
        "ratio_vs_per_item",
        "ms_per_batch",
        "first_batch_s",
    ]
    print(format_table(rows, columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
