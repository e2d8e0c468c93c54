"""Run every benchmark and regenerate docs/benchmarks.md from the results of this one run.

Runs, in order, each as its own process (so one's threads/workers never disturb another):

1. bench/bench_data_path.py   cache-backed loader + BatchAugmenter vs per-item PIL + DataLoader,
                              and the one-off cache build cost per image;
2. bench/bench_training.py    project training loop vs a minimal hand-written loop (overhead
                              ratio), cost of multi-scale (GFLOPs, img/s), and the GPU section
                              (AMP + channels_last vs fp32), which without a CUDA device records
                              "no CUDA device: GPU figures not measured".

JSON lines go to bench/results/<timestamp>/ (gitignored); the doc is rewritten from them, keeping
the hand-written section between the HAND-WRITTEN markers of the existing doc.

    .venv/bin/python bench/run_all.py              # full run, a few minutes on 2 CPU cores
    .venv/bin/python bench/run_all.py --gpu        # on a CUDA machine: also fill the GPU section
    .venv/bin/python bench/run_all.py --quick --doc /tmp/b.md   # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
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
    return parser.parse_args(argv)


def _rel(path: Path) -> str:
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


def run_step(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run one bench script; its stderr (the human table) is echoed and returned."""
    shown = " ".join(_rel(Path(c)) if c.endswith(".py") or "/" in c else c for c in cmd)
    print(f"\n$ {shown}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    print(done.stderr, file=sys.stderr, end="", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{shown} failed with exit code {done.returncode}")
    return time.perf_counter() - started, shown


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
    single: dict[str, dict[str, Any]] = {}
    for r in rows:
        backbone = r["case"].split()[0]
        single.setdefault(backbone, r)  # the first case per backbone is its single scale
    table = []
    for r in rows:
        base = single[r["case"].split()[0]]
        table.append(
            {
                "model": r["case"],
                "cache px": r["input"],
                "GFLOPs/img": _f(r["gflops_per_image"], 2),
                "x single": _f(r["gflops_per_image"] / base["gflops_per_image"], 2),
                "params (M)": _f(r["params_m"], 2),
                "inference img/s": _f(r["images_per_s"], 2),
                "img/s vs single": _f(r["images_per_s"] / base["images_per_s"], 2),
            }
        )
    return [
        "Forward GFLOPs per image (torch.utils.flop_counter) and CPU inference img/s; "
        "`resnet50 [224, 448]` is the conf/nih model, `resnet50 [224]` its single-scale "
        "baseline.",
        "",
        format_table(table, list(table[0])),
    ]


def gpu_section(
    rows: list[dict[str, Any]],
    epoch_rows: list[dict[str, Any]],
    machine: dict[str, Any],
    asked: bool,
) -> list[str]:
    measured = [r for r in rows if r.get("case") != "skipped"]
    epochs = [r for r in epoch_rows if r.get("case") != "skipped" and r.get("mode") != "cpu"]
    targets = (
        "Targets (issue 5): ResNet-50 at 224 >= 3,000 img/s on an H100 with AMP + "
        "channels_last, the loader keeping GPU utilisation >= 90%; also the conf/nih "
        "multi-scale ResNet-50, peak memory, and one full NIH epoch (112,120 images) "
        "extrapolated."
    )
    command = "To fill it, on a CUDA machine: `python bench/run_all.py --gpu`."
    if not measured and not epochs:
        why = (
            f"**No GPU was available in this session ({NO_GPU}).**"
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
                "train img/s": _f(r["images_per_s"]),
                "GPU util mean %": _f(r["gpu_util_mean"]),
                "GPU util median %": _f(r["gpu_util_median"]),
                "peak GiB": _f(r["peak_mem_gib"], 2),
                "NIH epoch (min)": _f(r["nih_epoch_min"], 1),
            }
            for r in epochs
        ]
        lines += [
            f"GPU: {epochs[0]['device']}. (b) One epoch of the project's `fit` (the training "
            "node's loop) fed from an on-disk synthetic image cache through the real loader "
            "path (memmap gather, pinned copy, `BatchAugmenter` on device with the conf/nih "
            "policy, AMP + channels_last); utilisation sampled by nvidia-smi every 100 ms "
            "between the 10th and the last training step.",
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
) -> str:
    overhead = [r for r in training_rows if r.get("section") == "overhead"]
    cost = [r for r in training_rows if r.get("section") == "cost"]
    gpu = [r for r in training_rows if r.get("section") == "gpu"]
    epoch = [r for r in training_rows if r.get("section") == "epoch"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/run_all.py: edit only the HAND-WRITTEN section; the rest is "
        "rewritten on every run. -->",
        "",
        f"Measured {machine['date']}{' (--quick smoke sizes: not representative)' if quick else ''}"
        ".",
        "",
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
        "python bench/run_all.py" + (" --quick" if quick else "") + (" --gpu" if gpu_asked else ""),
        *(f"  {cmd}    # {seconds:.0f} s" for cmd, seconds in commands),
        "```",
        "",
        f"Raw JSON lines (with the machine on every line): `{results_dir}/` (gitignored).",
        "",
        "## 1. Data path: cache-backed loader vs per-item PIL decode",
        "",
        "`cache_loader`: DataLoader workers gather random uint8 batches from the image-cache "
        "memmap, the main process converts and applies `BatchAugmenter`; `cache_inline`: the "
        "same without workers; `per_item`: PIL decode of the PNG + resize + torchvision v2 "
        "per-sample transforms in a DataLoader with the same workers.",
        "",
        *data_path_section(data_rows),
        "",
        "## 2. Training step: project loop vs minimal PyTorch loop (CPU)",
        "",
        *overhead_section(overhead),
        "",
        "## 3. Cost of multi-scale",
        "",
        *cost_section(cost),
        "",
        "## 4. GPU",
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
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    out_dir = args.results_dir / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    data_out, training_out = out_dir / "data_path.jsonl", out_dir / "training.jsonl"
    env = {**os.environ}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    data_cmd = [sys.executable, str(BENCH / "bench_data_path.py"), "--output", str(data_out)]
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
        training_cmd.append("--quick")
    if args.data_seconds is not None:
        data_cmd += ["--seconds", str(args.data_seconds)]
    if args.gpu:
        training_cmd.append("--gpu")

    commands = []
    for cmd in (data_cmd, training_cmd):
        seconds, shown = run_step(cmd, env)
        commands.append((shown.replace(str(out_dir), _rel(out_dir)), seconds))

    machine = machine_info()
    training_rows = read_jsonl(training_out)
    if not any(r.get("section") == "gpu" for r in training_rows) and not machine.get("gpu"):
        print(f"GPU section: {NO_GPU}.", file=sys.stderr)
    doc_text = render(
        machine,
        commands=commands,
        data_rows=read_jsonl(data_out),
        training_rows=training_rows,
        notes=preserved_notes(args.doc),
        results_dir=_rel(out_dir),
        quick=args.quick,
        gpu_asked=args.gpu,
    )
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(doc_text)
    print(f"\nwrote {_rel(args.doc)} and {_rel(out_dir)}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
