"""Smoke tests for bench/ scripts: they run end to end for a second or two (no timed asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    assert len(cost) == 6 and all(r["gflops_per_image"] > 0 for r in cost)
    by = {(r["env"], tuple(r["scales"])): r["gflops_per_image"] for r in cost}
    # the two single-scale baselines of each environment, read from conf/base and conf/nih
    assert set(by) == {
        ("conf/base", (64,)),
        ("conf/base", (128,)),
        ("conf/base", (64, 128)),
        ("conf/nih", (224,)),
        ("conf/nih", (448,)),
        ("conf/nih", (224, 448)),
    }
    for env, small, large in (("conf/base", 64, 128), ("conf/nih", 224, 448)):
        multi = by[(env, (small, large))]
        assert multi > 4 * by[(env, (small,))]  # against the smallest scale: ~5x
        assert 1.1 < multi / by[(env, (large,))] < 1.4  # against the ablation's scale: ~1.25x
    ablation = [r for r in cost if "ablation" in r["role"]]
    assert [tuple(r["scales"]) for r in ablation] == [(128,), (448,)]
    assert all(r["images_per_s"] is None for r in cost)  # --quick: GFLOPs only, no timing
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
        "--loader-seconds",
        "0.2",
        "--training-sections",
        "gpu",
        "--step-timeout",
        "240",
        "--doc",
        str(doc),
        "--results-dir",
        str(tmp_path / "results"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert "my profile notes" in text and "old\n" not in text
    assert "## 1. Data path" in text and "cache_loader" in text and "Data-path ratio" in text
    assert "gamma: [1.0, 1.0]" in text  # the data-path bench says which policy it uses
    assert "## 2. Raw delivery" in text and "raw delivery ratio (cache_prefetch" in text
    assert "## 3. Augmentation" in text and "noise only" in text and "conf/nih" in text
    assert "## 6. GPU" in text and "python bench/run_all.py --gpu" in text
    assert "bash bench/gpu_check.sh" in text
    assert "Machine" in text and "CPU:" in text
    if "GPU: none" in text:
        assert "no CUDA device: GPU figures not measured" in text
    assert list((tmp_path / "results").glob("*/data_path.jsonl"))
    assert list((tmp_path / "results").glob("*/loader.jsonl"))
    assert list((tmp_path / "results").glob("*/benchmarks.md"))  # a copy with the results
    assert list((tmp_path / "results").glob("*/training.log"))  # each step's log
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


# ------------------------------------------------------------------------------------------
# bench_loader.py (raw delivery, augmentation cost), the multi-scale cost ratios, run_all's
# timeout, gpu_epoch.py's CLI and bench/gpu_check.sh (issue 11, items 8 and 9)
# ------------------------------------------------------------------------------------------


def test_bench_loader_help() -> None:
    done = run_bench("bench_loader.py", "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--quick" in done.stdout and "--loader-threads" in done.stdout


@pytest.mark.slow
def test_bench_loader_quick_delivery_and_augment(tmp_path: Path) -> None:
    out = tmp_path / "loader.jsonl"
    done = run_bench("bench_loader.py", "--quick", "--seconds", "0.2", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    delivery = [r for r in records if r["section"] == "delivery"]
    augment = [r for r in records if r["section"] == "augment"]
    # one cache row per loader_threads setting of conf/base (1) and conf/nih (4), one per-item
    assert sorted(r["loader_threads"] for r in delivery if r["case"] == "cache_prefetch") == [1, 4]
    (per_item,) = [r for r in delivery if r["case"] == "per_item_png"]
    assert per_item["ratio_vs_per_item"] == pytest.approx(1.0)
    for r in delivery:
        assert r["images_per_s"] > 0 and r["batches"] >= 1 and r["ratio_vs_per_item"] > 0
        assert r["batch_dtype"] == "uint8" and r["batch_shape"] == [r["batch"], 64, 64]
    assert {r["case"] for r in augment} == {
        "conf/base full policy",
        "conf/nih full policy",
        "conf/nih geometric only",
        "conf/nih photometric only",
        "conf/nih noise only",
    }
    for r in augment:
        assert r["ms_per_batch"] > 0 and r["images_per_s"] > 0 and r["device"] == "cpu"
        assert r["ms_per_batch_min"] <= r["ms_per_batch"]
    full = {r["env"]: r["policy"] for r in augment if r["part"] == "full policy"}
    assert full["conf/base"]["gamma"] == [0.9, 1.1] and full["conf/nih"]["noise_std"] == 0.01
    assert "| section" in done.stderr


def test_run_all_cost_section_states_both_single_scale_ratios() -> None:
    run_all = _bench_module("run_all")

    def row(env: str, role: str, scales: list[int], gflops: float) -> dict:
        return {
            "section": "cost",
            "case": f"resnet50 {scales}",
            "env": env,
            "role": role,
            "scales": scales,
            "input": 448,
            "gflops_per_image": gflops,
            "params_m": 23.5,
            "images_per_s": None,
        }

    rows = [
        row("conf/nih", "single smallest scale", [224], 8.02),
        row("conf/nih", "single-scale ablation (resnet_single_scale)", [448], 32.07),
        row("conf/nih", "multi-scale (multiscale_resnet)", [224, 448], 40.09),
    ]
    text = "\n".join(run_all.cost_section(rows))
    assert "multi-scale [224, 448] / single [224] (its smallest scale): **5.00x GFLOPs**" in text
    assert (
        "multi-scale [224, 448] / conf/nih's single-scale ablation `resnet_single_scale` [448]: "
        "**1.25x GFLOPs**"
    ) in text


def test_run_all_delivery_section_reports_the_ratio_against_the_goal() -> None:
    run_all = _bench_module("run_all")
    common = {"section": "delivery", "source": "s", "size": 448, "batch": 64, "cache_rows": 9}
    rows = [
        {**common, "case": "cache_prefetch", "loader_threads": 1, "workers": 0,
         "images_per_s": 4000.0, "ratio_vs_per_item": 100.0},
        {**common, "case": "cache_prefetch", "loader_threads": 4, "workers": 0,
         "images_per_s": 2000.0, "ratio_vs_per_item": 50.0},
        {**common, "case": "per_item_png", "loader_threads": None, "workers": 2,
         "images_per_s": 40.0, "ratio_vs_per_item": 1.0},
    ]  # fmt: skip
    text = "\n".join(run_all.delivery_section(rows))
    assert "448 px: raw delivery ratio (cache_prefetch / per_item_png) 50x to 100x" in text
    assert "goal >= 50x: met" in text
    rows[1]["ratio_vs_per_item"] = 12.0
    assert "goal >= 50x: NOT met" in "\n".join(run_all.delivery_section(rows))


def test_run_all_step_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A hanging bench step (here: a child holding the output pipe) cannot hang run_all."""
    run_all = _bench_module("run_all")
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    log = tmp_path / "step.log"
    seconds, _, failure = run_all.run_step(
        [sys.executable, "-c", script], dict(os.environ), timeout=3, log=log
    )
    assert failure is not None and "timed out" in failure
    assert seconds < 60
    assert "timed out" in log.read_text()
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    for _ in range(50):  # gone, or a zombie waiting for init to reap it
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"{stat.parent.name}: the grandchild survived the step timeout")


@pytest.mark.slow
def test_gpu_epoch_cli_runs_a_few_steps_of_fit_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "steps.jsonl"
    done = run_bench(
        "gpu_epoch.py",
        "--device",
        "cpu",
        "--model",
        "smoke",
        "--steps",
        "12",
        "--val",
        "8",
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["steps"] == 12 and row["train_images"] == 96 and row["mode"] == "cpu"
    assert row["steady_images_per_s"] > 0 and row["nih_epoch_min_steady"] > 0
    assert "img/s after 10 warm-up steps" in done.stdout


def test_gpu_epoch_cli_says_no_cuda_and_exits_0_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-CUDA path does not apply")
    done = run_bench("gpu_epoch.py", "--steps", "3", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA" in done.stdout


@pytest.mark.slow
def test_gpu_check_script_skips_cleanly_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench/gpu_check.sh would run the real check")
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=600,  # the CPU path trains 12 smoke steps: ~2.5 min at load 6 on 2 cores
        env={**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "no CUDA" in done.stdout and "SKIPPED" in done.stdout
    assert "[gpu_check] CPU path passed" in done.stdout
    assert "no CUDA" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.slow
def test_profile_loader_parts_quick(tmp_path: Path) -> None:
    out = tmp_path / "parts.jsonl"
    done = run_bench("profile_loader_parts.py", "--quick", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    item, steps = records[0], records[1:]
    assert item["section"] == "per_item" and item["decode_ms_median"] > 0
    assert item["resize_ms_median"] > 0
    names = {r["step"] for r in steps}
    assert {"affine_grid", "grid_sample", "gamma", "whole augmenter (conf/nih policy)"} <= names
    assert all(r["ms_median"] >= 0 and r["ms_min"] <= r["ms_median"] for r in steps)
    assert "decode median" in done.stdout


def test_bench_phantom_quick(tmp_path: Path) -> None:
    """docs/phantom.md's figures come from this script: it runs and reports every finding."""
    out = tmp_path / "phantom.jsonl"
    done = run_bench(
        "bench_phantom.py", "--patients", "40", "--timing-films", "2", "--output", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    renders = [r for r in records if r["section"] == "render"]
    assert {r["px"] for r in renders} == {128, 256}
    assert all(r["ms_per_film_median"] > 0 for r in renders)
    linear = [r for r in records if r["section"] == "linear"]
    from rare_cxr.findings import FINDINGS

    assert [r["finding"] for r in linear] == list(FINDINGS)
    scored = [r["auroc"] for r in linear if r["auroc"] == r["auroc"]]  # NaN: one class only
    assert scored and all(0.0 <= a <= 1.0 for a in scored)


@pytest.mark.slow
def test_bench_pos_weight_quick(tmp_path: Path) -> None:
    out = tmp_path / "pos_weight.jsonl"
    done = run_bench("bench_pos_weight.py", "--quick", "--seeds", "0", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in records] == ["cap 100", "uncapped"]
    assert records[0]["rare_pos_weight"] == 100.0 < records[1]["rare_pos_weight"]
    assert all(0.0 <= r["auroc_rare"] <= 1.0 and r["quick"] for r in records)
    assert "| case" in done.stderr
