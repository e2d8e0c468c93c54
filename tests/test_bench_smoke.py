"""Smoke tests for bench/ scripts: they run end to end for a second or two (no timed asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run a bench/ script as a user would (its own process, one thread: smoke sizes)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


@pytest.mark.slow
def test_bench_data_path_quick(tmp_path: Path) -> None:
    out = tmp_path / "data_path.jsonl"
    done = run_bench("bench_data_path.py", "--quick", "--seconds", "0.3", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {r["case"]: r for r in records}
    assert set(cases) == {"cache_build", "cache_inline", "cache_loader", "per_item"}
    assert all(r["images_per_s"] > 0 for r in records)
    assert "machine" in records[0] and records[0]["machine"]["cores"] >= 1
    assert "ratio_vs_per_item" in cases["cache_loader"]
    assert "| case" in done.stderr  # the human table


def test_bench_data_path_help() -> None:
    done = run_bench("bench_data_path.py", "--help", timeout=120)
    assert done.returncode == 0
    assert "--seconds" in done.stdout and "--quick" in done.stdout and "--workers" in done.stdout


def test_bench_training_help() -> None:
    done = run_bench("bench_training.py", "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--quick" in done.stdout and "--gpu" in done.stdout and "--only" in done.stdout


@pytest.mark.slow
def test_bench_training_quick_cost_and_gpu_notice(tmp_path: Path) -> None:
    out = tmp_path / "training.jsonl"
    done = run_bench(
        "bench_training.py", "--quick", "--gpu", "--only", "cost,gpu", "--output", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cost = [r for r in records if r["section"] == "cost"]
    assert len(cost) == 4 and all(r["gflops_per_image"] > 0 for r in cost)
    single, multi = cost[2], cost[3]  # resnet50 [224] vs [224, 448]
    assert multi["gflops_per_image"] > 4 * single["gflops_per_image"]
    if not records[-1]["machine"]["gpu"]:
        assert "CUDA is not available" in done.stderr
    assert "| section" in done.stderr


def test_run_all_help() -> None:
    done = run_bench("run_all.py", "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--quick" in done.stdout and "--gpu" in done.stdout and "--doc" in done.stdout


@pytest.mark.slow
def test_run_all_quick_writes_doc_to_given_path(tmp_path: Path) -> None:
    """run_all --quick regenerates a doc at --doc (never the real docs/benchmarks.md), keeps the
    hand-written section, and says plainly when there is no GPU."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "old\n<!-- BEGIN HAND-WRITTEN: kept verbatim by bench/run_all.py -->\n"
        "my profile notes\n<!-- END HAND-WRITTEN -->\n"
    )
    real_doc = ROOT / "docs" / "benchmarks.md"
    before = real_doc.read_text() if real_doc.exists() else None
    done = run_bench(
        "run_all.py",
        "--quick",
        "--data-seconds",
        "0.2",
        "--training-sections",
        "gpu",
        "--doc",
        str(doc),
        "--results-dir",
        str(tmp_path / "results"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert "my profile notes" in text and "old\n" not in text
    assert "## 1. Data path" in text and "cache_loader" in text and "Data-path ratio" in text
    assert "## 4. GPU" in text and "python bench/run_all.py --gpu" in text
    assert "Machine" in text and "CPU:" in text
    if "GPU: none" in text:
        assert "no CUDA device: GPU figures not measured" in text
    assert list((tmp_path / "results").glob("*/data_path.jsonl"))
    assert (real_doc.read_text() if real_doc.exists() else None) == before


def _bench_module(name: str):
    """Import a bench/ script as a module (bench/ is not a package; scripts import siblings)."""
    import importlib

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_gpu_epoch_synthetic_cache_opens_with_the_project_reader(tmp_path: Path) -> None:
    from rare_cxr.findings import FINDINGS
    from rare_cxr.image_cache import ImageCache

    gpu_epoch = _bench_module("gpu_epoch")
    gpu_epoch.write_synthetic_cache(tmp_path / "cache", n_train=300, n_val=7, size=16, seed=3)
    cache = ImageCache(tmp_path / "cache")
    train = cache.split("train")
    assert cache.size == 16 and cache.split_names == ["train", "val"]
    assert train.images.shape == (300, 16, 16) and train.images.dtype.name == "uint8"
    assert train.labels.shape == (300, len(FINDINGS))
    assert len(cache.split("val")) == 7
    assert train.images.std() > 50  # pixels were written, not left at zero


def test_gpu_epoch_nih_config_is_the_resolved_nih_environment() -> None:
    training, model, policy = _bench_module("gpu_epoch").nih_training_config()
    assert model["backbone"] == "resnet50" and model["scales"] == [224, 448]
    assert training["amp"] in ("auto", True) and training["batch_size"] == 64
    assert "loader_threads" in training  # base keys survive the soft merge
    assert policy["rotation_degrees"] > 0


def test_utilisation_window_keeps_only_samples_inside_the_training_steps() -> None:
    sampler = _bench_module("gpu_epoch").UtilisationSampler()
    sampler.samples = [(0.5, 10.0), (1.0, 90.0), (2.0, 95.0), (3.0, 20.0)]
    assert sampler.window(1.0, 2.0) == [90.0, 95.0]


@pytest.mark.slow
def test_bench_epoch_section_runs_the_project_loop_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "training.jsonl"
    done = run_bench(
        "bench_training.py",
        "--quick",
        "--only",
        "epoch",
        "--epoch-device",
        "cpu",
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["section"] == "epoch" and row["mode"] == "cpu"
    assert row["steps"] == 6  # 48 train images / batch 8: the whole epoch ran through `fit`
    assert row["images_per_s"] > 0 and row["nih_epoch_min"] > 0
    assert row["gpu_util_mean"] is None  # no utilisation figure without a GPU


def test_run_all_renders_gpu_epoch_rows() -> None:
    run_all = _bench_module("run_all")
    epoch = {
        "section": "epoch",
        "case": "resnet50 [224]",
        "mode": "amp+channels_last",
        "device": "NVIDIA H100 80GB HBM3",
        "batch": 256,
        "input": 224,
        "train_images": 32768,
        "images_per_s": 3100.0,
        "gpu_util_mean": 93.5,
        "gpu_util_median": 97.0,
        "peak_mem_gib": 21.4,
        "nih_epoch_min": 0.6,
    }
    lines = "\n".join(run_all.gpu_section([], [epoch], {"gpu": epoch["device"]}, True))
    assert "NVIDIA H100 80GB HBM3" in lines and "3,100.0" in lines and "93.5" in lines
    assert "No GPU" not in lines
    none = "\n".join(run_all.gpu_section([], [], {"gpu": None}, False))
    assert "No GPU was available" in none
