"""Before/after figures for issue 11 items 3 (frozen trunk) and 6 (GPU data path), side by side.

"Before" is the training engine (`rare_cxr/training/engine.py`) and augmenter
(`rare_cxr/augment.py`) of a git revision -- by default a97c438, the commit these changes start
from -- read with `git show` (read-only) into modules of their own; "after" is the working tree.
Both run in this one process, in alternating rounds (A B B A ...), on the same data; every
ratio is the median (with min and max) of per-round ratios, the two cases of a round having
run back to back under the same machine load. Validation is outside every timed epoch (the
engine's own `img_per_s` column).

Sections (JSON lines on stdout / --output, a table on stderr):

frozen        img/s of the frozen-trunk epoch (two-stage transfer, stage 2's first epoch) of
              a tiny CPU model, whole engine. Before: trunk in train mode, full backward, lr 0;
              after: trunk in eval mode without gradients, backward through the head only.
frozen_step   the same two frozen steps alone, alternating step by step (robust to a machine
              whose load changes within seconds): before = `model.train()`, full backward,
              Adam with the trunk's lr 0 (what the old engine ran); after = the engine's
              `set_trunk_frozen` on its `trunk_modules`.
single_scale  (a) one batch of the conf/nih augmentation at NIH sizes (64 x 448 px, a 224 px
              single-scale model): before = augment at 448 then the model's resize to 224;
              after = resize to 224, then augment. (b) one epoch of a single-scale model below
              the cache size (resnet18 [64] on a 128 px cache), whole engine, second epoch.
noise         CPU cost of the full-resolution noise draw of one 64 x 448 px batch (what a CPU
              generator costs every step of a GPU run before this change).
prefetch      batches/s of the engine's `_prefetch` with loader_threads 4, reading from a
              memmap stand-in with a SIMULATED latency per read (sleep) and a simulated
              training step (sleep): before = 2 batches in flight, after = threads + 1.
accumulation  (after only) img/s of a second epoch with accumulation_steps 2 and 4 vs 1, same
              global batch.

GPU figures need a CUDA machine (`--device cuda`); the engine sections then run there.

Usage: python bench/bench_engine_changes.py [--quick] [--before-rev REV] [--device cpu|cuda]
                                             [--only frozen,single_scale,...] [--output F]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import SyntheticSplit, emit, format_table, machine_info  # noqa: E402

from rare_cxr.augment import BatchAugmenter  # noqa: E402
from rare_cxr.findings import FINDINGS  # noqa: E402
from rare_cxr.training import engine as engine_after  # noqa: E402

SECTIONS = ("frozen", "frozen_step", "single_scale", "noise", "prefetch", "accumulation")
# conf/nih/parameters_augmentation.yml (the policy both the NIH run and this bench use)
NIH_POLICY = {
    "rotation_degrees": 7.0,
    "scale": [0.92, 1.08],
    "translate": 0.04,
    "brightness": [0.9, 1.1],
    "contrast": [0.9, 1.1],
    "gamma": [0.9, 1.1],
    "noise_std": 0.01,
}


def load_before(rev: str, path: str, name: str) -> ModuleType:
    """The module at `path` as of git revision `rev`, as a module called `name`."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


class _Cache:
    """Synthetic image cache with the ImageCache API (random pixels, two learnable findings)."""

    def __init__(self, n_train: int, n_val: int, size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size = size
        self.findings = list(FINDINGS)
        self.split_names = ["train", "val"]
        self._splits = {}
        for name, n in (("train", n_train), ("val", n_val)):
            labels = (rng.random((n, len(FINDINGS))) < 0.3).astype(np.float32)
            images = rng.integers(0, 255, size=(n, size, size), dtype=np.uint8)
            self._splits[name] = SyntheticSplit(images, labels)

    def split(self, name: str) -> SyntheticSplit:
        return self._splits[name]


def _params(device: str, **over: Any) -> dict[str, Any]:
    params = {
        "device": device,
        "epochs": 1,
        "patience": 5,
        "batch_size": 32,
        "eval_batch_size": 64,
        "progress_bar": False,
        "resume": False,
        "loader_threads": 1,
        "optimizer": {"lr": 1e-3},
        "schedule": {"name": "constant", "warmup_epochs": 0},
    }
    params.update(over)
    return params


def _spec(scales: list[int]) -> dict[str, Any]:
    return {
        "name": "bench",
        "architecture": "multiscale_resnet",
        "backbone": "resnet18",
        "scales": scales,
        "pretrained": "none",
    }


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def alternate(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each case `rounds` times in A B B A order (then B A A B ...); all values kept."""
    names = list(cases)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            out[name].append(cases[name]())
    return out


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios: the two cases of a round ran back to back,
    so a load change between rounds cancels out of their ratio."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def _row(section: str, case: str, values: list[float], unit: str, **extra: Any) -> dict:
    return {
        "section": section,
        "case": case,
        "median": statistics.median(values),
        "unit": unit,
        "values": [round(v, 4) for v in values],
        **extra,
    }


# ---------------------------------------------------------------- sections


def section_frozen(before: ModuleType, args) -> list[dict]:
    size = 64
    cache = _Cache(n_train=32 if args.quick else 128, n_val=32, size=size)
    spec = _spec([size])
    params = _params(
        args.device,
        transfer={
            "two_stage": True,
            "rare_findings": ["Hernia", "Pneumonia"],
            "stage1_epochs": 1,
            "stage2_targets": "all",
            "frozen_trunk_epochs": 1,
        },
    )

    def frozen_epoch(module: ModuleType) -> Callable[[], float]:
        def run() -> float:
            history = module.fit(spec, cache, None, params).history
            assert history["stage"].tolist() == ["common", "all"]
            return float(history["img_per_s"].iloc[1])  # stage 2's first epoch: the frozen one

        return run

    load0 = _load()
    values = alternate(
        {"before": frozen_epoch(before), "after": frozen_epoch(engine_after)}, args.rounds
    )
    ratio = paired_ratio(values["after"], values["before"])
    what = f"resnet18 [{size}] on a {size} px cache, batch 32, {len(cache.split('train').labels)}"
    extra = {"model": what + " train images", "load_avg": [load0, _load()]}
    return [
        _row("frozen", "before", values["before"], "img/s", **extra),
        _row("frozen", "after", values["after"], "img/s", ratio_after_vs_before=ratio, **extra),
    ]


def section_frozen_step(args) -> list[dict]:
    from rare_cxr.models import build_model
    from rare_cxr.training.losses import MultiLabelLoss

    size, batch = 64, 32
    torch.manual_seed(0)
    model = build_model(_spec([size])).to(args.device)
    criterion = MultiLabelLoss(None)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 1, size, size), generator=gen).to(args.device)
    y = (torch.rand((batch, len(FINDINGS)), generator=gen) < 0.3).float().to(args.device)
    head = {id(p) for p in model.head().parameters()}
    trunk_params = [p for p in model.parameters() if id(p) not in head]
    head_params = [p for p in model.parameters() if id(p) in head]
    optimizer = torch.optim.Adam([{"params": trunk_params, "lr": 0.0}, {"params": head_params}])
    trunk = engine_after.trunk_modules(model)

    def step() -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def before() -> float:
        model.train()
        engine_after.set_trunk_frozen(trunk, trunk_params, False)
        return step()

    def after() -> float:
        model.train()
        engine_after.set_trunk_frozen(trunk, trunk_params, True)
        return step()

    before(), after()  # warm-up
    load0 = _load()
    n = 6 if args.quick else 40
    values = alternate({"before": before, "after": after}, n)
    ratio = paired_ratio(values["before"], values["after"])
    extra = {
        "model": f"resnet18 [{size}], batch {batch}, one step",
        "rounds": n,
        "load_avg": [load0, _load()],
    }
    return [
        _row("frozen_step", "before", values["before"], "s/step", **extra),
        _row(
            "frozen_step",
            "after",
            values["after"],
            "s/step",
            speedup_after_vs_before=ratio,
            **extra,
        ),
    ]


def section_single_scale(before: ModuleType, before_augment: ModuleType, args) -> list[dict]:
    rows = []
    # (a) augmentation + resize of one NIH-sized batch
    n = 8 if args.quick else 64
    device = torch.device(args.device)
    x = torch.rand((n, 1, 448, 448), generator=torch.Generator().manual_seed(0)).to(device)
    old_aug = before_augment.BatchAugmenter(NIH_POLICY)
    new_aug = BatchAugmenter(NIH_POLICY)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def old() -> float:
        gen = torch.Generator().manual_seed(1)  # before: CPU generator, whatever the device
        sync()
        t0 = time.perf_counter()
        y = old_aug(x, generator=gen)
        F.interpolate(y, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        sync()
        return time.perf_counter() - t0

    def new() -> float:
        gen = torch.Generator(device=device).manual_seed(1)
        sync()
        t0 = time.perf_counter()
        new_aug(engine_after.resize_batch(x, 224), generator=gen)
        sync()
        return time.perf_counter() - t0

    load0 = _load()
    values = alternate({"before": old, "after": new}, 2 * args.rounds)
    ratio = paired_ratio(values["before"], values["after"])
    extra = {"batch": f"{n} x 448 px -> 224 px, conf/nih policy", "load_avg": [load0, _load()]}
    rows.append(_row("single_scale_augment", "before", values["before"], "s/batch", **extra))
    rows.append(
        _row(
            "single_scale_augment",
            "after",
            values["after"],
            "s/batch",
            speedup_after_vs_before=ratio,
            **extra,
        )
    )

    # (b) whole engine, one epoch of a single-scale model below the cache size
    cache = _Cache(n_train=32 if args.quick else 128, n_val=32, size=128)
    spec = _spec([64])
    params = _params(args.device, epochs=2)

    def epoch(module: ModuleType, augmenter) -> Callable[[], float]:
        def run() -> float:  # the second epoch: warm (kernels chosen, memory allocated)
            return float(module.fit(spec, cache, augmenter, params).history["img_per_s"].iloc[1])

        return run

    load0 = _load()
    values = alternate(
        {"before": epoch(before, old_aug), "after": epoch(engine_after, new_aug)}, args.rounds
    )
    ratio = paired_ratio(values["after"], values["before"])
    extra = {
        "model": "resnet18 [64] on a 128 px cache, batch 32, conf/nih policy",
        "load_avg": [load0, _load()],
    }
    rows.append(_row("single_scale_epoch", "before", values["before"], "img/s", **extra))
    rows.append(
        _row(
            "single_scale_epoch",
            "after",
            values["after"],
            "img/s",
            ratio_after_vs_before=ratio,
            **extra,
        )
    )
    return rows


def section_noise(args) -> list[dict]:
    n = 8 if args.quick else 64
    gen = torch.Generator().manual_seed(0)

    def draw() -> float:
        t0 = time.perf_counter()
        torch.randn((n, 1, 448, 448), generator=gen)
        return time.perf_counter() - t0

    load0 = _load()
    values = [draw() for _ in range(2 * args.rounds + 1)]
    return [
        _row(
            "noise",
            "cpu randn",
            values,
            "s/batch",
            batch=f"{n} x 1 x 448 x 448 float32",
            torch_threads=torch.get_num_threads(),
            load_avg=[load0, _load()],
        )
    ]


class _SlowImages:
    """A memmap stand-in: every batch read takes `latency` seconds (sleep; releases the GIL)."""

    def __init__(self, n: int, size: int, latency: float) -> None:
        self.data = np.zeros((n, size, size), np.uint8)
        self.latency = latency

    def __getitem__(self, idx):
        time.sleep(self.latency)
        return self.data[idx]


def section_prefetch(before: ModuleType, args) -> list[dict]:
    threads, latency, step = 4, 0.04, 0.01
    n_batches = 10 if args.quick else 40
    images = _SlowImages(n_batches * 8, 8, latency)
    labels = np.zeros((n_batches * 8, len(FINDINGS)), np.float32)
    jobs = [np.arange(i * 8, (i + 1) * 8) for i in range(n_batches)]

    def throughput(module: ModuleType) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for _ in module._prefetch(jobs, images, labels, threads):
                time.sleep(step)  # the training step
            return n_batches / (time.perf_counter() - t0)

        return run

    load0 = _load()
    values = alternate(
        {"before": throughput(before), "after": throughput(engine_after)}, args.rounds
    )
    ratio = paired_ratio(values["after"], values["before"])
    extra = {
        "setup": f"loader_threads {threads}, simulated read {latency * 1e3:.0f} ms/batch, "
        f"simulated step {step * 1e3:.0f} ms/batch (sleeps, not disk or GPU)",
        "load_avg": [load0, _load()],
    }
    return [
        _row("prefetch", "before", values["before"], "batches/s", **extra),
        _row(
            "prefetch", "after", values["after"], "batches/s", ratio_after_vs_before=ratio, **extra
        ),
    ]


def section_accumulation(args) -> list[dict]:
    size = 64
    cache = _Cache(n_train=32 if args.quick else 128, n_val=32, size=size)
    spec = _spec([size])

    def epoch(accumulation: int) -> Callable[[], float]:
        params = _params(args.device, epochs=2, accumulation_steps=accumulation)

        def run() -> float:  # the second epoch: warm
            history = engine_after.fit(spec, cache, None, params).history
            return float(history["img_per_s"].iloc[1])

        return run

    load0 = _load()
    values = alternate({"1": epoch(1), "2": epoch(2), "4": epoch(4)}, args.rounds)
    extra = {
        "model": f"resnet18 [{size}] on a {size} px cache, global batch 32",
        "load_avg": [load0, _load()],
    }
    return [
        _row(
            "accumulation",
            f"accumulation_steps {k}",
            v,
            "img/s",
            ratio_vs_1=paired_ratio(v, values["1"]),
            **extra,
        )
        for k, v in values.items()
    ]


def _ratio_text(ratio: dict[str, float] | None) -> str:
    return "" if not ratio else f"{ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes, 1 round")
    parser.add_argument("--before-rev", default="a97c438", help="git revision of 'before'")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (7)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--output", default=None, help="append JSON lines to this file")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 7)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")

    before = load_before(args.before_rev, "src/rare_cxr/training/engine.py", "engine_before")
    before_augment = load_before(args.before_rev, "src/rare_cxr/augment.py", "augment_before")
    machine = {**machine_info(), "before_rev": args.before_rev, "device": args.device}
    rows: list[dict] = []
    if "frozen" in only:
        rows += section_frozen(before, args)
    if "frozen_step" in only:
        rows += section_frozen_step(args)
    if "single_scale" in only:
        rows += section_single_scale(before, before_augment, args)
    if "noise" in only:
        rows += section_noise(args)
    if "prefetch" in only:
        rows += section_prefetch(before, args)
    if "accumulation" in only:
        rows += section_accumulation(args)
    emit([{**r, "machine": machine} for r in rows], args.output)
    print(
        format_table(
            [
                {
                    **r,
                    "ratio (median [min, max] of rounds)": _ratio_text(
                        r.get("ratio_after_vs_before")
                        or r.get("speedup_after_vs_before")
                        or r.get("ratio_vs_1")
                    ),
                    "load": r.get("load_avg"),
                }
                for r in rows
            ],
            ["section", "case", "median", "unit", "ratio (median [min, max] of rounds)", "load"],
        ),
        file=sys.stderr,
    )
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), gpu {machine['gpu']}, before = {args.before_rev}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
