"""The test split of the predictions as arrays, aligned across seeds and models: what every
reporting node that computes a statistic starts from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation import metrics
from rare_cxr.findings import FINDINGS


def _seed_thresholds(thresholds: Mapping[str, Any], seed: int | None) -> dict[str, float]:
    chosen = (thresholds.get("per_seed") or {}).get(str(seed)) or thresholds["thresholds"]
    return {f: metrics.from_json_number(chosen.get(f)) for f in FINDINGS}


def _test_table(
    predictions: pd.DataFrame, labels: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, patient ids, y, scores) of the primary seed's test rows."""
    ids, patients, y, s = metrics.split_arrays(predictions, labels, "test")
    if len(y) == 0:
        raise ValueError("predictions: no 'test' rows; the report is computed on test")
    return ids, patients, y, s


def _seed_arrays(
    predictions: pd.DataFrame,
    thresholds: Mapping[str, Any],
    labels: pd.DataFrame,
    seeds: list[int | None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, patient ids, y [N,F], scores [S,N,F], thresholds [S,F]) on sorted test ids."""
    scores, cutoffs, ids, patients, y = [], [], None, None, None
    for seed in seeds:
        seed_ids, seed_patients, seed_y, seed_s = metrics.split_arrays(
            predictions, labels, "test", seed
        )
        order = np.argsort(seed_ids, kind="mergesort")
        if ids is None:
            ids, patients, y = seed_ids[order], seed_patients[order], seed_y[order]
        elif not np.array_equal(seed_ids[order], ids):
            raise ValueError("test images differ between seeds of one model")
        scores.append(seed_s[order])
        t = _seed_thresholds(thresholds, seed)
        cutoffs.append([t[f] for f in FINDINGS])
    return ids, patients, y, np.stack(scores), np.asarray(cutoffs, dtype=float)


def _test_arrays(labels: pd.DataFrame, predictions: Mapping[str, pd.DataFrame]):
    """Common test labels and per-model scores, aligned on the first model's image order."""
    scores, y, reference = {}, None, None
    for model, p in predictions.items():
        ids, _, yy, s = metrics.split_arrays(p, labels, "test")
        order = np.argsort(ids, kind="mergesort")
        if y is None:
            y, reference = yy[order], ids[order]
        elif not np.array_equal(ids[order], reference):
            raise ValueError(
                f"{model}.predictions: test images differ from the other models'; "
                "curves must compare models on the same images (same image cache)"
            )
        scores[model] = s[order]
    return (y if y is not None else np.zeros((0, len(FINDINGS)))), scores
