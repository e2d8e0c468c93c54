"""The power calculation that sizes conf/phantom_study (rare_cxr.evaluation.power)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rare_cxr.evaluation import power

ROOT = Path(__file__).resolve().parents[1]


def test_textbook_values():
    # z_0.975 + z_0.80 = 1.95996 + 0.84162
    assert power.z_sum(0.05, 0.80) == pytest.approx(2.80158, abs=1e-5)
    # a 95% interval of width 2 x 1.96 is one standard error
    assert power.se_from_interval(-1.959964, 1.959964) == pytest.approx(1.0, abs=1e-6)


def test_required_and_detectable_are_inverse():
    se0, n0 = 0.05, 40
    n = power.required_units(0.02, se0, n0)
    # n0 (2.80158 x 0.05 / 0.02)^2 = 40 x 49.05 = 1962.2 -> 1963
    assert n == math.ceil(40 * (2.8015817 * 0.05 / 0.02) ** 2)
    assert power.detectable_delta(n, se0, n0) <= 0.02 < power.detectable_delta(n - 1, se0, n0)
    # four times the units halve the detectable difference
    assert power.detectable_delta(4 * n0, se0, n0) == pytest.approx(
        power.detectable_delta(n0, se0, n0) / 2
    )


def test_the_ablation_pair_needs_422_test_patients():
    """docs/results.md's figures: SE0 from [-0.070, 0.080] on 33 test patients."""
    se0 = power.se_from_interval(-0.070, 0.080)
    assert se0 == pytest.approx(0.03827, abs=1e-5)
    assert power.required_units(0.03, se0, 33) == 422
    assert power.seed_sd([0.030, 0.206, -0.002]) == pytest.approx(0.11200, abs=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="alpha"):
        power.z_sum(0.0, 0.8)
    with pytest.raises(ValueError, match="interval"):
        power.se_from_interval(0.1, 0.1)
    with pytest.raises(ValueError, match="delta"):
        power.required_units(0.0, 0.1, 10)
    with pytest.raises(ValueError, match="two seeds"):
        power.seed_sd([0.1])


def test_bench_script_prints_the_sizing():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "power_ablation.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "-> 422" in done.stdout and "-> 800" in done.stdout
    assert "424 test patients" in done.stdout and "training films: ~700" in done.stdout
