"""Smoke tests for bench/ scripts: they run end to end for a second or two (no timed asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_data_path_quick(tmp_path: Path) -> None:
    out = tmp_path / "data_path.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_data_path.py"),
            "--quick",
            "--seconds",
            "0.3",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {r["case"]: r for r in records}
    assert set(cases) == {"cache_build", "cache_inline", "cache_loader", "per_item"}
    assert all(r["images_per_s"] > 0 for r in records)
    assert "machine" in records[0] and records[0]["machine"]["cores"] >= 1
    assert "ratio_vs_per_item" in cases["cache_loader"]
    assert "| case" in done.stderr  # the human table


def test_bench_data_path_help() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_data_path.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0
    assert "--seconds" in done.stdout and "--quick" in done.stdout and "--workers" in done.stdout


def test_bench_training_help() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_training.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--quick" in done.stdout and "--gpu" in done.stdout and "--only" in done.stdout


@pytest.mark.slow
def test_bench_training_quick_cost_and_gpu_notice(tmp_path: Path) -> None:
    out = tmp_path / "training.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_training.py"),
            "--quick",
            "--gpu",
            "--only",
            "cost,gpu",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
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
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run_all.py"),
            "--quick",
            "--data-seconds",
            "0.2",
            "--training-sections",
            "gpu",
            "--doc",
            str(doc),
            "--results-dir",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
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
