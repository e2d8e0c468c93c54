"""Phantom facts quoted in docs/phantom.md: rendering cost per film, and how far a linear model
on 32-px thumbnails gets per finding (which findings are "global" enough for a linear model and
which need a convolutional, multi-scale one).

    python bench/bench_phantom.py [--patients 600] [--output bench/results/phantom.jsonl]

Rendering: `render_image` timed on one thread for `--timing-films` films at 128 and 256 px
(median ms/film; cohort sampling excluded). Linear model: a phantom of `--patients` patients
(conf/base's other parameters) rendered at 128 px, average-pooled to 32 px, standardised; one
scikit-learn `LogisticRegression` (C=1.0) per finding, trained on the phantom's own
train_val patients and scored by AUROC on its test patients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, env_parameters, machine_info  # noqa: E402

from rare_cxr.findings import FINDINGS  # noqa: E402
from rare_cxr.phantom.cohort import sample_cohort, split_patients  # noqa: E402
from rare_cxr.phantom.params import validate_params  # noqa: E402
from rare_cxr.phantom.render import render_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def base_params(**overrides: object):
    return validate_params({**env_parameters("base")["phantom"], **overrides})


def time_rendering(n_films: int) -> list[dict]:
    plans = sample_cohort(base_params())[:n_films]
    rows = []
    for size in (128, 256):
        render_image(plans[0], size)  # warm-up
        times = []
        for plan in plans:
            start = time.perf_counter()
            render_image(plan, size)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "section": "render",
                "px": size,
                "films": len(plans),
                "ms_per_film_median": 1000 * statistics.median(times),
                "ms_per_film_min": 1000 * min(times),
            }
        )
    return rows


def linear_model(n_patients: int) -> list[dict]:
    params = base_params(n_patients=n_patients)
    plans = sample_cohort(params)
    test_patients = split_patients(params, plans)
    x = np.stack(
        [render_image(p, 128).astype(np.float32).reshape(32, 4, 32, 4).mean((1, 3)) for p in plans]
    ).reshape(len(plans), -1)
    y = np.array([[f in p.recorded for f in FINDINGS] for p in plans], dtype=int)
    is_test = np.array([p.patient_id in test_patients for p in plans])
    scaler = StandardScaler().fit(x[~is_test])
    x_train, x_test = scaler.transform(x[~is_test]), scaler.transform(x[is_test])
    rows = []
    for j, finding in enumerate(FINDINGS):
        y_train, y_test = y[~is_test, j], y[is_test, j]
        if len(set(y_train)) < 2 or len(set(y_test)) < 2:
            auroc = float("nan")
        else:
            model = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
            auroc = float(roc_auc_score(y_test, model.decision_function(x_test)))
        rows.append(
            {
                "section": "linear",
                "finding": finding,
                "auroc": auroc,
                "test_positives": int(y_test.sum()),
                "test_films": int(is_test.sum()),
                "train_films": int((~is_test).sum()),
                "patients": n_patients,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--timing-films", type=int, default=40)
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/phantom.jsonl")
    args = parser.parse_args()
    rows = time_rendering(args.timing_films) + linear_model(args.patients)
    machine = machine_info()
    emit([{**row, "machine": machine} for row in rows], args.output)


if __name__ == "__main__":
    main()
