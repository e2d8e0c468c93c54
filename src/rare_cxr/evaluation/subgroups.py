"""AUROC by patient subgroup (sex, age band, view), with patient-bootstrap intervals.

Why: a macro AUROC can hide a model that works on PA views of adults and fails on AP (bedside,
sicker patients) or on the elderly; NIH ChestX-ray14 is known to carry such shifts. Every
subgroup is evaluated on its own rows only, and its interval resamples the *patients of that
subgroup* (bootstrap.py's `patient_weights` on the subgroup's patient ids), so a subgroup's
interval never borrows patients from outside it.

Findings without positives or without negatives in a subgroup get NaN (and NaN intervals) and
stay in the table, so a reader sees "undefined" rather than a missing row.

Age bands are half-open intervals [e_i, e_{i+1}) over whole years, labelled by the inclusive
whole-year range "e_i-(e_{i+1}-1)" (edges [0, 18, 40] -> "0-17", "18-39"). The last band is
labelled open-ended "e_{-2}+" (edges [..., 80, 200] -> "80+"): the last edge is a plausibility
ceiling, not a boundary a reader cares about. Ages outside [e_0, e_{-1}) -- e.g. the impossible
ages such as 414 in the 2017 NIH file -- and missing ages are "unknown".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from rare_cxr.evaluation.bootstrap import (
    fixed_set_mean,
    patient_weights,
    percentile_interval,
    weighted_auroc,
)
from rare_cxr.evaluation.metrics import auroc
from rare_cxr.findings import FINDINGS

NAN = float("nan")
UNKNOWN = "unknown"
ATTRIBUTES = ("sex", "age", "view")
META_COLUMNS = ("sex", "age", "view", "patient_id")
COLUMNS = (
    "attribute",
    "subgroup",
    "finding",
    "n_images",
    "n_patients",
    "positives",
    "auroc",
    "ci_low",
    "ci_high",
    # additive (issue 18): resamples in which the row's statistic was undefined (no positive or
    # no negative patient of a finding drawn; for macro, of one finding of its fixed set),
    # left out of its interval
    "resamples_dropped",
)


def _check_edges(edges: Sequence[int]) -> list[int]:
    values = [int(e) for e in edges]
    if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(
            f"reporting.subgroups.age_edges: expected >= 2 strictly increasing whole years, "
            f"got {list(edges)!r}"
        )
    if values[0] < 0:
        raise ValueError(f"reporting.subgroups.age_edges: expected >= 0, got {list(edges)!r}")
    return values


def age_band_labels(edges: Sequence[int]) -> list[str]:
    """One label per band: "a-b" (inclusive whole years), the last one "a+" (module docstring)."""
    e = _check_edges(edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(e[:-2], e[1:-1], strict=True)]
    return [*labels, f"{e[-2]}+"]


def assign_age_bands(
    ages: Sequence[float] | np.ndarray | pd.Series, edges: Sequence[int]
) -> np.ndarray:
    """Band label per age (object array); missing, unparsable or out-of-range -> "unknown"."""
    e = np.asarray(_check_edges(edges), dtype=float)
    labels = np.array([*age_band_labels(edges), UNKNOWN], dtype=object)
    a = pd.to_numeric(pd.Series(np.asarray(ages, dtype=object)), errors="coerce").to_numpy(float)
    band = np.searchsorted(e, a, side="right") - 1  # [e_i, e_{i+1}) -> i
    inside = np.isfinite(a) & (a >= e[0]) & (a < e[-1])
    return labels[np.where(inside, band, len(labels) - 1)]


def _category(values: pd.Series) -> np.ndarray:
    """Strings with missing/blank -> "unknown" (sex and view are reported as recorded)."""
    text = values.astype("string").str.strip()
    return text.fillna(UNKNOWN).replace("", UNKNOWN).to_numpy(dtype=object)


def _ordered(values: np.ndarray, order: Sequence[str] | None = None) -> list[str]:
    """Subgroups present in the data: in `order` if given, else sorted; "unknown" last."""
    present = set(values.tolist())
    known = [v for v in order if v in present] if order else sorted(present - {UNKNOWN})
    return [*known, UNKNOWN] if UNKNOWN in present else known


def subgroup_masks(
    meta: pd.DataFrame, age_edges: Sequence[int], attributes: Sequence[str] = ATTRIBUTES
) -> list[tuple[str, str, np.ndarray]]:
    """(attribute, subgroup, row mask) of every subgroup present in `meta` (columns sex, age,
    view), attribute by attribute in `attributes` order: sex and view as recorded (sorted),
    age bands in band order; "unknown" last. The one definition of the report's subgroups
    (AUROC here, the underdiagnosis rate in `underdiagnosis.py`)."""
    values = {
        "sex": lambda: _category(meta["sex"]),
        "age": lambda: assign_age_bands(meta["age"].to_numpy(), age_edges),
        "view": lambda: _category(meta["view"]),
    }
    orders = {"sex": None, "age": age_band_labels(age_edges), "view": None}
    out = []
    for attribute in attributes:
        if attribute not in values:
            raise ValueError(f"subgroup attribute: expected one of {ATTRIBUTES}, got {attribute!r}")
        column = values[attribute]()
        out += [(attribute, g, column == g) for g in _ordered(column, orders[attribute])]
    return out


def subgroup_aurocs(
    y_true: np.ndarray,
    y_score: np.ndarray,
    meta: pd.DataFrame,
    *,
    age_edges: Sequence[int],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """AUROC per (attribute, subgroup, finding), plus a `macro` row per subgroup.

    `meta` has columns sex, age, view, patient_id, row-aligned with `y_true`/`y_score`
    ([N, 14] in FINDINGS order). Columns: attribute (sex/age/view), subgroup, finding (a
    FINDINGS name or `macro`), n_images, n_patients, positives, auroc, ci_low, ci_high.

    Only subgroups present in the data appear (age bands in band order, "unknown" last). For
    `macro`, auroc is the mean over findings defined in the subgroup, `positives` the positive
    labels summed over findings, and the interval takes that mean inside each resample over
    the same set of findings (`bootstrap.fixed_set_mean`: a resample that lost one of them is
    dropped and counted in `resamples_dropped`, as are undefined resamples of a finding). Each
    subgroup is bootstrapped with the same `seed` (bootstrap.py semantics), over its own
    patients only.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"reporting.bootstrap.confidence: expected in (0, 1), got {confidence!r}")
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(FINDINGS) or s.shape != y.shape:
        raise ValueError(
            f"y_true/y_score: expected matching [N, {len(FINDINGS)}] arrays, "
            f"got {y.shape} and {s.shape}"
        )
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(f"meta: missing column(s) {missing}")
    if len(meta) != len(y):
        raise ValueError(f"meta: expected {len(y)} rows aligned with y_true, got {len(meta)}")

    patients = meta["patient_id"].astype(str).to_numpy()
    rows = []
    for attribute, subgroup, mask in subgroup_masks(meta, age_edges):
        ys, ss, ps = y[mask], s[mask], patients[mask]
        point = np.array([auroc(ys[:, i], ss[:, i]) for i in range(len(FINDINGS))])
        chunks = []
        for w in patient_weights(ps, n_resamples, seed):
            chunks.append(
                np.stack(
                    [weighted_auroc(ys[:, i], ss[:, i], w) for i in range(len(FINDINGS))],
                    axis=1,
                )
            )
        samples = np.concatenate(chunks, axis=0)  # [R, F]
        low, high = percentile_interval(samples, confidence)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            macro_point = float(np.nanmean(point)) if np.isfinite(point).any() else NAN
        macro_samples, macro_dropped = fixed_set_mean(samples, point)
        macro_low, macro_high = percentile_interval(macro_samples, confidence)
        undefined = np.isnan(samples).sum(axis=0)
        base = {
            "attribute": attribute,
            "subgroup": subgroup,
            "n_images": int(mask.sum()),
            "n_patients": int(len(np.unique(ps))),
        }
        positives = ys.sum(axis=0)
        for i, f in enumerate(FINDINGS):
            rows.append(
                {
                    **base,
                    "finding": f,
                    "positives": int(positives[i]),
                    "auroc": float(point[i]),
                    "ci_low": float(low[i]),
                    "ci_high": float(high[i]),
                    "resamples_dropped": int(undefined[i]) if np.isfinite(point[i]) else 0,
                }
            )
        rows.append(
            {
                **base,
                "finding": "macro",
                "positives": int(positives.sum()),
                "auroc": macro_point,
                "ci_low": float(macro_low),
                "ci_high": float(macro_high),
                "resamples_dropped": macro_dropped,
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))
