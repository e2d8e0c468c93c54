"""Run every benchmark and regenerate docs/benchmarks.md from the results of this one run.

Runs, in order, each as its own process (so one's threads/workers never disturb another):

1. bench/bench_data_path.py   cache-backed loader + BatchAugmenter vs per-item PIL + DataLoader,
                              and the one-off cache build cost per image;
2. bench/bench_loader.py      raw delivery rate (uint8 batches, no augmentation, no model) of the
                              engine's memmap prefetch vs per-item PNG decode + resize, and the
                              per-batch cost of BatchAugmenter alone (conf/base, conf/nih);
3. bench/bench_training.py    project training loop vs a minimal hand-written loop (overhead
                              ratio), cost of multi-scale (GFLOPs, img/s), and the GPU section
                              (AMP + channels_last vs fp32; one epoch through the real loader),
                              which without a CUDA device records
                              "no CUDA device: GPU figures not measured".

JSON lines and each step's log go to bench/results/<timestamp>/ (gitignored; `--results-dir`);
the doc is rewritten from them, keeping the hand-written section between the HAND-WRITTEN
markers of the existing doc. No step can hang the run: `--step-timeout` kills a step's whole
process group (DataLoader workers included), the other steps still run, and a run with a failed
step writes its doc into the results folder instead of `--doc` and exits 1.

    .venv/bin/python bench/run_all.py              # full run, several minutes on 2 CPU cores
    .venv/bin/python bench/run_all.py --gpu        # on a CUDA machine: also fill the GPU section
    .venv/bin/python bench/run_all.py --quick --doc /tmp/b.md   # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- BEGIN HAND-WRITTEN: kept verbatim by bench/run_all.py -->"
END = "<!-- END HAND-WRITTEN -->"
NO_GPU = "no CUDA device: GPU figures not measured"
DEFAULT_NOTES = """## Notes and profile findings

(Hand-written: profile findings and before/after figures go here; `bench/run_all.py` keeps this
section verbatim when it regenerates the rest of the file.)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (~1 min)")
    parser.add_argument(
        "--gpu", action="store_true", help="run the GPU section (needs CUDA; else noted as absent)"
    )
    parser.add_argument(
        "--doc", type=Path, default=DEFAULT_DOC, help=f"markdown to regenerate ({DEFAULT_DOC})"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=BENCH / "results",
        help="JSON lines go to a timestamped folder under this one",
    )
    parser.add_argument(
        "--data-seconds", type=float, default=None, help="bench_data_path --seconds per loader"
    )
    parser.add_argument(
        "--training-sections",
        default="overhead,cost,gpu,epoch",
        help="bench_training --only (default: all); the smoke test uses 'gpu' to stay short",
    )
    parser.add_argument(
        "--loader-sections",
        default="delivery,augment",
        help="bench_loader --only (default: all; '' skips bench_loader)",
    )
    parser.add_argument(
        "--loader-seconds", type=float, default=None, help="bench_loader --seconds per loader"
    )
    parser.add_argument(
        "--epoch-fraction",
        type=float,
        default=None,
        help="bench_training --epoch-fraction (shorter GPU epochs, e.g. 0.5 in bench/gpu_check.sh)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=None,
        help="seconds one bench script may run before its process group is killed (default: "
        "no limit)",
    )
    return parser.parse_args(argv)


def _rel(path: Path) -> str:
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


_CURRENT: subprocess.Popen[str] | None = None  # the running step, for the SIGTERM handler


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the step and everything it started (its own session: DataLoader workers,
    nvidia-smi), so no grandchild keeps the output pipes open."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _CURRENT is not None and _CURRENT.poll() is None:
        _kill_group(_CURRENT)
    raise SystemExit(128 + signum)


def run_step(
    cmd: list[str],
    env: dict[str, str],
    *,
    timeout: float | None = None,
    log: Path | None = None,
) -> tuple[float, str, str | None]:
    """Run one bench script; its stderr (the human table) is echoed, and kept in `log`.

    Returns (seconds, the command as shown, None or why it failed). The script runs in a
    session of its own; on timeout that whole process group is killed."""
    global _CURRENT  # noqa: PLW0603 - the one running step, for the SIGTERM handler
    shown = " ".join(_rel(Path(c)) if c.endswith(".py") or "/" in c else c for c in cmd)
    print(f"\n$ {shown}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _CURRENT = proc
    failure = None
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        _, stderr = proc.communicate()
        failure = f"timed out after {timeout:.0f} s (process group killed)"
    finally:
        _CURRENT = None
    print(stderr, file=sys.stderr, end="", flush=True)
    if failure is None and proc.returncode != 0:
        failure = f"failed with exit code {proc.returncode}"
    if failure:
        print(f"{shown}: {failure}", file=sys.stderr, flush=True)
    if log is not None:
        log.write_text(f"$ {shown}\n{stderr}" + (f"\n{failure}\n" if failure else ""))
    return time.perf_counter() - started, shown, failure


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def preserved_notes(doc: Path) -> str:
    if doc.exists():
        text = doc.read_text()
        if BEGIN in text and END in text:
            return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    return DEFAULT_NOTES


def _f(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def data_path_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(data path not measured)"]
    by_case = {r["case"]: r for r in rows}
    first = rows[0]
    out = [
        f"Source: {first['source']}; {first['items']} items at {first['size']} px, batch "
        f"{first['batch_size']}, {first['workers']} worker process(es) for both DataLoaders.",
        "",
    ]
    if first.get("policy"):
        out += [
            f"Augmentation policy of both paths (the bench's own, not conf/base's): "
            f"`{_policy_text(first['policy'])}`. It differs from conf/base and conf/nih "
            "(hflip 0.0, gamma [0.9, 1.1], noise_std 0.01) so that the torchvision v2 per-item "
            "path (RandomAffine, RandomHorizontalFlip, ColorJitter brightness/contrast) does the "
            "same work; section 3 times the configured policies.",
            "",
        ]
    table = [
        {
            "case": r["case"],
            "workers": r["workers"],
            "img/s": _f(r["images_per_s"]),
            "ratio vs per_item": _f(r.get("ratio_vs_per_item"), 2),
            "first batch (s)": _f(r.get("first_batch_s"), 2),
        }
        for r in rows
        if r["case"] != "cache_build"
    ]
    out.append(format_table(table, list(table[0])) if table else "")
    build = by_case.get("cache_build")
    if build:
        out += [
            "",
            f"One-off cache build: {build['images']} distinct PNGs in {build['seconds']} s = "
            f"**{build['ms_per_image']:.1f} ms/image** with {build['workers']} worker(s) "
            f"({build['ms_per_image_per_worker']:.1f} ms/image per worker; decode + resize + "
            "write, pool start-up included).",
        ]
    if "cache_loader" in by_case and "per_item" in by_case:
        out += [
            "",
            f"**Data-path ratio (cache_loader / per_item): "
            f"{by_case['cache_loader']['ratio_vs_per_item']:.1f}x** "
            f"({by_case['cache_loader']['images_per_s']:,.0f} vs "
            f"{by_case['per_item']['images_per_s']:,.0f} img/s, same images, same workers).",
        ]
    return out


def _policy_text(policy: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in policy.items() if k not in ("enabled",))


DELIVERY_GOAL = 50.0  # issue 11: cache delivery >= 50x the per-item PNG loader


def delivery_section(rows: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in rows if r.get("section") == "delivery"]
    if not rows:
        return ["(raw delivery not measured)"]
    first = rows[0]
    per_item = next((r for r in rows if r["case"] == "per_item_png"), {})
    out = [
        f"Source: {first['source']}; cache of {first['cache_rows']} rows (the decoded PNGs "
        f"repeated) in the page cache; batch {first['batch']}; per-item loader with "
        f"{per_item.get('workers', '?')} worker process(es). The consumer only takes each uint8 "
        "batch: no float conversion, no augmentation, no model.",
        "",
    ]
    table = [
        {
            "case": r["case"],
            "px": r["size"],
            "batch": r["batch"],
            "loader threads / workers": r["loader_threads"]
            if r["case"] == "cache_prefetch"
            else f"{r['workers']} workers",
            "img/s": _f(r["images_per_s"]),
            "ratio vs per_item_png": _f(r.get("ratio_vs_per_item"), 1),
            "first batch (s)": _f(r.get("first_batch_s"), 2),
        }
        for r in rows
    ]
    out.append(format_table(table, list(table[0])))
    out.append("")
    for size in sorted({r["size"] for r in rows}):
        cache = [r for r in rows if r["size"] == size and r["case"] == "cache_prefetch"]
        if not cache or not all(r.get("ratio_vs_per_item") for r in cache):
            continue
        low = min(cache, key=lambda r: r["ratio_vs_per_item"])
        high = max(cache, key=lambda r: r["ratio_vs_per_item"])
        ratios = (
            f"{low['ratio_vs_per_item']:,.0f}x"
            if low is high
            else f"{low['ratio_vs_per_item']:,.0f}x to {high['ratio_vs_per_item']:,.0f}x "
            f"(loader_threads {low['loader_threads']} / {high['loader_threads']})"
        )
        met = "met" if low["ratio_vs_per_item"] >= DELIVERY_GOAL else "NOT met"
        out.append(
            f"- **{size} px: raw delivery ratio (cache_prefetch / per_item_png) {ratios}** "
            f"-- goal >= {DELIVERY_GOAL:.0f}x: {met}."
        )
    return out


def augment_section(rows: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in rows if r.get("section") == "augment"]
    if not rows:
        return ["(augmentation cost not measured)"]
    policies = {r["env"]: r["policy"] for r in rows if r["part"] == "full policy"}
    out = []
    if len({json.dumps(p, sort_keys=True) for p in policies.values()}) == 1:
        out.append(
            f"Policy ({' and '.join(sorted(policies))} resolve to the same one): "
            f"`{_policy_text(next(iter(policies.values())))}`."
        )
    else:
        out += [f"Policy of {env}: `{_policy_text(p)}`." for env, p in sorted(policies.items())]
    first = rows[0]
    threads = first.get("threads")
    out += [
        "",
        f"`BatchAugmenter` alone on float [B, 1, S, S] batches already in memory, each "
        f"environment's `training.batch_size`; {first['reps']} timed rounds after a warm-up, all "
        "cases interleaved in every round; median (and fastest) call"
        + (f"; {threads} torch thread(s) on CPU." if threads else "."),
        "",
    ]
    table = [
        {
            "device": r["device"],
            "policy": r["env"],
            "part": r["part"],
            "px": r["size"],
            "batch": r["batch"],
            "ms/batch (median)": _f(r["ms_per_batch"], 1),
            "ms/batch (min)": _f(r["ms_per_batch_min"], 1),
            "img/s": _f(r["images_per_s"]),
        }
        for r in rows
    ]
    out.append(format_table(table, list(table[0])))
    return out


def overhead_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(training overhead not measured)"]
    table = [
        {
            "model": r["case"],
            "batch": r["batch"],
            "cache px": r["input"],
            "project img/s": _f(r["images_per_s"], 2),
            "minimal img/s": _f(r["minimal_images_per_s"], 2),
            "ratio (goal >= 0.95)": _f(r["ratio"], 3),
        }
        for r in rows
    ]
    return [
        "Median epoch of each loop over three alternating rounds (ABBA) after an untimed "
        "warm-up; validation is "
        "outside the timed epoch in both.",
        "",
        format_table(table, list(table[0])),
    ]


def cost_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(multi-scale cost not measured)"]
    table = [
        {
            "env": r.get("env", ""),
            "model": r["case"],
            "role": r.get("role", ""),
            "cache px": r["input"],
            "GFLOPs/img": _f(r["gflops_per_image"], 2),
            "params (M)": _f(r["params_m"], 2),
            "CPU inference img/s": _f(r.get("images_per_s"), 2),
        }
        for r in rows
    ]
    out = [
        "Forward GFLOPs per image with `rare_cxr.evaluation.cost.gflops_per_image` (the "
        "reporting pipeline's cost figure; torch.utils.flop_counter, multiply-add = 2 FLOPs) at "
        "the environment's image-cache size, and CPU inference img/s (rough). Models and scales "
        "are read from conf/base and conf/nih.",
        "",
        format_table(table, list(table[0])),
        "",
        "Multi-scale against single-scale, against each of the two single-scale models (the "
        "GFLOPs ratio is the machine-independent figure):",
        "",
    ]
    for env in dict.fromkeys(r.get("env") for r in rows):
        group = [r for r in rows if r.get("env") == env]
        multi = next((r for r in group if str(r.get("role", "")).startswith("multi")), None)
        if env is None or multi is None:
            continue
        for r in group:
            if r is multi:
                continue
            what = (
                f"{env}'s single-scale ablation `resnet_single_scale` {r['scales']}"
                if "ablation" in r["role"]
                else f"single {r['scales']} (its smallest scale)"
            )
            speed = (
                "; CPU inference img/s multi / single "
                f"{multi['images_per_s'] / r['images_per_s']:.2f}x"
                if multi.get("images_per_s") and r.get("images_per_s")
                else ""
            )
            out.append(
                f"- {env}: multi-scale {multi['scales']} / {what}: "
                f"**{multi['gflops_per_image'] / r['gflops_per_image']:.2f}x GFLOPs**{speed}"
            )
    return out


def gpu_section(
    rows: list[dict[str, Any]],
    epoch_rows: list[dict[str, Any]],
    machine: dict[str, Any],
    asked: bool,
) -> list[str]:
    measured = [r for r in rows if r.get("case") != "skipped"]
    epochs = [r for r in epoch_rows if r.get("case") != "skipped" and r.get("mode") != "cpu"]
    targets = (
        "Targets (issues 5 and 11): ResNet-50 at 224 >= 3,000 img/s on an H100 with AMP + "
        "channels_last, the loader keeping GPU utilisation >= 90%; also the conf/nih "
        "multi-scale ResNet-50's img/s and peak memory, and one full NIH epoch (112,120 "
        "images) extrapolated."
    )
    command = (
        "To fill it, on a CUDA machine (one short call, < 8 min, results under `$OUT` when "
        "set): `bash bench/gpu_check.sh` -- it runs `pytest -m gpu`, a few conf/nih training "
        "steps (`bench/gpu_epoch.py`) and `python bench/run_all.py --gpu`; or run "
        "`python bench/run_all.py --gpu` alone."
    )
    if not measured and not epochs:
        why = (
            f"**Not measured yet. No GPU was available in this session ({NO_GPU}).**"
            if not machine.get("gpu")
            else f"A GPU ({machine['gpu']}) was present but the GPU section was not requested."
        )
        return [why, "", targets, "", command]
    lines: list[str] = []
    if measured:
        table = [
            {
                "model": r["case"],
                "mode": r["mode"],
                "batch": r["batch"],
                "px": r["input"],
                "train img/s": _f(r["images_per_s"]),
                "peak GiB": _f(r["peak_mem_gib"], 2),
                "NIH epoch (min)": _f(112_120 / r["images_per_s"] / 60, 1),
            }
            for r in measured
        ]
        lines += [
            f"GPU: {measured[0]['device']}. (a) Model + optimiser only, on synthetic batches "
            "already in GPU memory: the ceiling the loader has to feed.",
            "",
            format_table(table, list(table[0])),
            "",
        ]
    if epochs:
        table = [
            {
                "model": r["case"],
                "batch": r["batch"],
                "cache px": r["input"],
                "train images": r["train_images"],
                "train img/s (epoch)": _f(r["images_per_s"]),
                "train img/s (after warm-up)": _f(r.get("steady_images_per_s")),
                "GPU util mean %": _f(r["gpu_util_mean"]),
                "GPU util median %": _f(r["gpu_util_median"]),
                "peak GiB": _f(r["peak_mem_gib"], 2),
                "NIH epoch (min)": _f(r.get("nih_epoch_min_steady") or r["nih_epoch_min"], 1),
            }
            for r in epochs
        ]
        lines += [
            f"GPU: {epochs[0]['device']}. (b) One epoch of the project's `fit` (the training "
            "node's loop) fed from an on-disk synthetic image cache through the real loader "
            "path (memmap gather, pinned copy, `BatchAugmenter` on device with the conf/nih "
            "policy, AMP + channels_last); utilisation sampled by nvidia-smi every 100 ms "
            "between the 10th and the last training step; the NIH epoch uses the img/s after "
            "the 10 warm-up steps.",
            "",
            format_table(table, list(table[0])),
            "",
        ]
    return [*lines, targets]


def render(
    machine: dict[str, Any],
    *,
    commands: list[tuple[str, float]],
    data_rows: list[dict[str, Any]],
    training_rows: list[dict[str, Any]],
    notes: str,
    results_dir: str,
    quick: bool,
    gpu_asked: bool,
    loader_rows: list[dict[str, Any]] | None = None,
    failures: list[str] | None = None,
    invocation: str | None = None,
) -> str:
    loader_rows = loader_rows or []
    overhead = [r for r in training_rows if r.get("section") == "overhead"]
    cost = [r for r in training_rows if r.get("section") == "cost"]
    gpu = [r for r in training_rows if r.get("section") == "gpu"]
    epoch = [r for r in training_rows if r.get("section") == "epoch"]
    invocation = invocation or (
        "python bench/run_all.py" + (" --quick" if quick else "") + (" --gpu" if gpu_asked else "")
    )
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/run_all.py: edit only the HAND-WRITTEN section; the rest is "
        "rewritten on every run. -->",
        "",
        f"Measured {machine['date']}{' (--quick smoke sizes: not representative)' if quick else ''}"
        ".",
        "",
        *([f"**Incomplete run: {'; '.join(failures)}.**", ""] if failures else []),
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} usable cores, "
        f"{machine.get('memory_gib', '?')} GiB RAM",
        f"- GPU: {machine.get('gpu') or 'none'}",
        f"- Python {machine['python']}, torch {machine.get('torch')}, "
        f"torchvision {machine.get('torchvision')}, {machine['platform']}",
        "",
        "## Commands",
        "",
        "```",
        invocation,
        *(f"  {cmd}    # {seconds:.0f} s" for cmd, seconds in commands),
        "```",
        "",
        f"Raw JSON lines (with the machine on every line) and each step's log: `{results_dir}/` "
        "(gitignored).",
        "",
        "## 1. Data path: cache-backed loader vs per-item PIL decode (augmented batches)",
        "",
        "`cache_loader`: DataLoader workers gather random uint8 batches from the image-cache "
        "memmap, the main process converts and applies `BatchAugmenter`; `cache_inline`: the "
        "same without workers; `per_item`: PIL decode of the PNG + resize + torchvision v2 "
        "per-sample transforms in a DataLoader with the same workers.",
        "",
        *data_path_section(data_rows),
        "",
        "## 2. Raw delivery: the engine's memmap prefetch vs per-item PNG decode",
        "",
        "`cache_prefetch`: the training engine's own batch path (`epoch_order` -> "
        "`batches_for` -> `_prefetch`/`_fetch`: sorted gather from the read-only memmap of an "
        "on-disk cache opened with `ImageCache`, read ahead by `loader_threads` threads), as "
        "`fit` iterates it; `per_item_png`: a torch DataLoader whose workers decode and resize "
        "each PNG (`rare_cxr.image_cache.decode_resized`, the pixels the cache stores) into "
        "uint8 batches. `bench/bench_loader.py --only delivery`.",
        "",
        *delivery_section(loader_rows),
        "",
        "## 3. Augmentation on its own: `BatchAugmenter` per batch",
        "",
        *augment_section(loader_rows),
        "",
        "## 4. Training step: project loop vs minimal PyTorch loop (CPU)",
        "",
        *overhead_section(overhead),
        "",
        "## 5. Cost of multi-scale",
        "",
        *cost_section(cost),
        "",
        "## 6. GPU",
        "",
        *gpu_section(gpu, epoch, machine, gpu_asked),
        "",
        BEGIN,
        notes.rstrip("\n"),
        END,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    out_dir = args.results_dir / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    data_out, training_out = out_dir / "data_path.jsonl", out_dir / "training.jsonl"
    loader_out = out_dir / "loader.jsonl"
    env = {**os.environ}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    data_cmd = [sys.executable, str(BENCH / "bench_data_path.py"), "--output", str(data_out)]
    loader_cmd = [sys.executable, str(BENCH / "bench_loader.py"), "--output", str(loader_out)]
    loader_cmd += ["--only", args.loader_sections]
    training_cmd = [
        sys.executable,
        str(BENCH / "bench_training.py"),
        "--output",
        str(training_out),
        "--only",
        args.training_sections,
    ]
    if args.quick:
        data_cmd.append("--quick")
        loader_cmd.append("--quick")
        training_cmd.append("--quick")
    if args.data_seconds is not None:
        data_cmd += ["--seconds", str(args.data_seconds)]
    if args.loader_seconds is not None:
        loader_cmd += ["--seconds", str(args.loader_seconds)]
    if args.epoch_fraction is not None:
        training_cmd += ["--epoch-fraction", str(args.epoch_fraction)]
    if args.gpu:
        training_cmd.append("--gpu")
        loader_cmd += ["--aug-devices", "cpu,cuda"]

    steps = [("data_path", data_cmd)]
    if args.loader_sections.strip():
        steps.append(("loader", loader_cmd))
    steps.append(("training", training_cmd))
    commands, failures = [], []
    for name, cmd in steps:
        seconds, shown, failure = run_step(
            cmd, env, timeout=args.step_timeout, log=out_dir / f"{name}.log"
        )
        shown = shown.replace(str(out_dir), _rel(out_dir))
        commands.append((shown, seconds))
        if failure:
            failures.append(f"`{shown}` {failure}")

    machine = machine_info()
    training_rows = read_jsonl(training_out)
    if not any(r.get("section") == "gpu" for r in training_rows) and not machine.get("gpu"):
        print(f"GPU section: {NO_GPU}.", file=sys.stderr)
    shown_argv = " ".join(sys.argv[1:] if argv is None else argv)
    doc_text = render(
        machine,
        commands=commands,
        data_rows=read_jsonl(data_out),
        training_rows=training_rows,
        loader_rows=read_jsonl(loader_out),
        notes=preserved_notes(args.doc),
        results_dir=_rel(out_dir),
        quick=args.quick,
        gpu_asked=args.gpu,
        failures=failures,
        invocation=f"python bench/run_all.py {shown_argv}".rstrip(),
    )
    # a run with a failed step never replaces the doc: it is written next to the results
    doc = out_dir / "benchmarks.md" if failures else args.doc
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(doc_text)
    if not failures and doc.resolve() != (out_dir / "benchmarks.md").resolve():
        (out_dir / "benchmarks.md").write_text(doc_text)  # a copy travels with the results
    print(f"\nwrote {_rel(doc)} and {_rel(out_dir)}/", file=sys.stderr)
    if failures:
        print("incomplete run: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
