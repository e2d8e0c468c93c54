"""Where the time goes in the two loaders of bench_loader.py (the notes of docs/benchmarks.md).

* per item: PNG decode (`rare_cxr.imaging.load_grayscale`) and PIL resize, per image, in this
  process (what one DataLoader worker does per image);
* `BatchAugmenter` on one float [B, 1, S, S] batch: each of its steps timed on its own (out of
  place, so slightly dearer than inside the augmenter, which works in place), then the whole
  augmenter; all steps interleaved round after round, median and fastest of `--reps` rounds.

    .venv/bin/python bench/profile_loader_parts.py            # NIH sample PNGs, 448 px, batch 64
    .venv/bin/python bench/profile_loader_parts.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, env_parameters, machine_info, usable_cores  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40, help="PNGs decoded")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (usable cores)")
    parser.add_argument("--source", type=Path, default=None, help="folder of PNGs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="append JSON lines here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.batch, args.reps = 4, 32, 4, 2
    args.threads = args.threads or usable_cores()
    return args


def per_item(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from bench_data_path import source_paths
    from PIL import Image

    from rare_cxr.image_cache import RESAMPLE
    from rare_cxr.imaging import load_grayscale

    files, source = source_paths(args, scratch)
    decode, resize = [], []
    for path in [files[i % len(files)] for i in range(args.images)]:
        t0 = time.perf_counter()
        gray = load_grayscale(str(path))
        t1 = time.perf_counter()
        Image.fromarray(gray).resize((args.size, args.size), RESAMPLE)
        resize.append(time.perf_counter() - t1)
        decode.append(t1 - t0)
    return {
        "section": "per_item",
        "source": source,
        "images": len(decode),
        "source_shape": list(gray.shape),
        "size": args.size,
        "decode_ms_median": round(1000 * statistics.median(decode), 2),
        "resize_ms_median": round(1000 * statistics.median(resize), 2),
    }


def augment_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from rare_cxr.augment import (
        BatchAugmenter,
        adjust_brightness,
        adjust_contrast,
        adjust_gamma,
        affine_matrices,
    )

    torch.set_num_threads(args.threads)
    policy = dict(env_parameters("nih")["augmentation"])
    b, s = args.batch, args.size
    x = torch.rand(b, 1, s, s)
    augmenter = BatchAugmenter(policy)
    gen = torch.Generator().manual_seed(0)
    p = augmenter.sample_parameters(b, gen, x.device)
    theta = affine_matrices(p["angle"], p["scale"], p["tx"], p["ty"], p["flip"], height=s, width=s)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    pad = policy["padding_mode"]
    steps = {
        "sample_parameters": lambda: augmenter.sample_parameters(b, gen, x.device),
        "affine_grid": lambda: F.affine_grid(theta, list(x.shape), align_corners=False),
        "grid_sample": lambda: F.grid_sample(
            x, grid, mode="bilinear", padding_mode=pad, align_corners=False
        ),
        "brightness": lambda: adjust_brightness(x, p["brightness"]),
        "contrast": lambda: adjust_contrast(x, p["contrast"]),
        "gamma": lambda: adjust_gamma(x, p["gamma"]),
        "noise draw (randn)": lambda: torch.randn(x.shape, generator=gen),
        "clamp": lambda: x.clamp(0.0, 1.0),
        "whole augmenter (conf/nih policy)": lambda: augmenter(x, generator=gen),
        "uint8 -> float / 255": lambda: (x * 255).to(torch.uint8).float().div_(255),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return [
        {
            "section": "augment_step",
            "step": name,
            "size": s,
            "batch": b,
            "threads": torch.get_num_threads(),
            "ms_median": round(1000 * statistics.median(t), 2),
            "ms_min": round(1000 * min(t), 2),
        }
        for name, t in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp:
        rows = [per_item(args, Path(tmp)), *augment_steps(args)]
    emit([{**r, "machine": machine} for r in rows], args.output, stream=None)
    item = rows[0]
    print(
        f"# {machine['cpu']}, {machine['cores']} cores; {item['source']}\n"
        f"per item ({item['images']} PNGs of {item['source_shape']}): decode median "
        f"{item['decode_ms_median']} ms, resize to {item['size']} median "
        f"{item['resize_ms_median']} ms"
    )
    for r in rows[1:]:
        print(
            f"{r['step']:<36} [{r['batch']}, 1, {r['size']}, {r['size']}] "
            f"median {r['ms_median']:>9.1f} ms  min {r['ms_min']:>9.1f} ms  ({r['threads']} thr)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
