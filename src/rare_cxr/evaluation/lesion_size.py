"""Where does the image pyramid help? ΔAUROC (model - reference) by planted lesion size.

The phantom knows every lesion's box (`BBox_List_2017.csv`; NIH's real list has 984 boxes), so
the paired comparison of the multi-scale model with its single-scale ablation can be split by
how large the lesion is: a pyramid is meant to help where a finding's size differs from what one
scale sees best (docs/phantom.md: a Nodule is 2-4 px at 256 px, a Mass ten times larger).

Per localised finding (`LOCALISED_FINDINGS`: a focal lesion whose size the phantom draws per
lesion) and size bin:

* positives: the test images labelled positive for the finding that carry a box of it, binned
  by the area (w x h, in the box list's pixels) of the image's largest box of that finding into
  `n_bins` groups of equal count (terciles by default), smallest first. Equal counts rather than
  fixed edges: the areas of one finding span a narrow range and the bins must not be empty; ties
  at an edge may fall on either side (stable sort by area, then image order). Positive images
  with no box of the finding are left out of every bin and counted (`unboxed`);
* negatives: every test image labelled negative for the finding, the same in every bin;
* AUROC of the bin's positives against all negatives, per model (mean over seeds), and the
  paired difference mean_s (AUROC_model_s - AUROC_ref_s), seed s with seed s;
* interval and p-value: the paired patient bootstrap of the project (`bootstrap.patient_weights`
  over the patients of the bin's images; the same resample for both models and every seed),
  percentile interval, two-sided p as `paired.bootstrap_p_value`. A resample that drew none of
  the bin's positive patients has no AUROC: it is dropped and counted (`resamples_dropped`).

Like every paired test of the project, the interval is conditional on the trained weights (the
variation between retrainings is `seed_sd`, the sd of the per-seed differences).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rare_cxr.evaluation.bootstrap import patient_weights, percentile_interval, weighted_auroc
from rare_cxr.evaluation.paired import bootstrap_p_value
from rare_cxr.findings import FINDINGS

NAN = float("nan")
# Focal lesions whose size the phantom draws per lesion (rare_cxr.phantom.lesions): a Nodule's
# radius, a Mass's axes, a Consolidation's or Pneumonia's blob, a Hernia's bubble. The regional
# findings (Effusion, Cardiomegaly, Emphysema...) and the textures (Fibrosis, Infiltration) have
# boxes too, but their "size" is that of a lung or the heart, not of a lesion.
LOCALISED_FINDINGS = ("Nodule", "Mass", "Consolidation", "Pneumonia", "Hernia")
COLUMNS = (
    "model",
    "reference",
    "seeds",
    "finding",
    "size_bin",
    "area_min",
    "area_max",
    "positives",
    "positive_patients",
    "negatives",
    "unboxed",
    "auroc_model",
    "auroc_reference",
    "delta",
    "ci_low",
    "ci_high",
    "p_value",
    "seed_sd",
    "resamples_dropped",
)


def largest_box_area(boxes: pd.DataFrame, finding: str) -> pd.Series:
    """Area (w x h) of each image's largest box of `finding`, indexed by image id (text).

    `boxes` has the columns of `localisation.parse_bbox_list` (image_id, finding, x, y, w, h).
    """
    part = boxes[boxes["finding"] == finding]
    area = pd.to_numeric(part["w"], errors="coerce") * pd.to_numeric(part["h"], errors="coerce")
    return area.groupby(part["image_id"].astype(str).to_numpy()).max().dropna()


def size_bins(areas: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Indices into `areas` split into at most `n_bins` groups of (near) equal count, smallest
    areas first (stable sort, so ties keep image order); empty groups are left out."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins: expected >= 1, got {n_bins!r}")
    order = np.argsort(np.asarray(areas, dtype=float), kind="stable")
    return [b for b in np.array_split(order, int(n_bins)) if b.size]


def _paired_auroc(
    y: np.ndarray, s_model: np.ndarray, s_ref: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per weight row: (mean-over-seeds AUROC of the model, of the reference, and the mean of
    the per-seed differences). Scores `[S, N]`; weights `[R, N]`."""
    a_m = np.stack([weighted_auroc(y, s, weights) for s in s_model])
    a_r = np.stack([weighted_auroc(y, s, weights) for s in s_ref])
    return a_m.mean(axis=0), a_r.mean(axis=0), (a_m - a_r).mean(axis=0)


def bin_comparison(
    y: np.ndarray,
    s_model: np.ndarray,
    s_ref: np.ndarray,
    patients: np.ndarray,
    *,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict[str, float]:
    """The paired comparison on one bin's images (its positives and every negative): AUROCs,
    delta, percentile interval, p-value, sd over seeds and resamples dropped."""
    ones = np.ones((1, y.size))
    auc_m, auc_r, delta = (float(v[0]) for v in _paired_auroc(y, s_model, s_ref, ones))
    per_seed = [
        float(weighted_auroc(y, m, ones)[0] - weighted_auroc(y, r, ones)[0])
        for m, r in zip(s_model, s_ref, strict=True)
    ]
    samples = np.concatenate(
        [
            _paired_auroc(y, s_model, s_ref, w)[2]
            for w in patient_weights(patients, n_resamples, seed)
        ]
    )
    low, high = percentile_interval(samples, confidence)
    return {
        "auroc_model": auc_m,
        "auroc_reference": auc_r,
        "delta": delta,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": bootstrap_p_value(samples),
        "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else NAN,
        "resamples_dropped": int(np.count_nonzero(np.isnan(samples))),
    }


def lesion_size_rows(  # noqa: PLR0917 -- the paired arrays, as paired.paired_comparison_rows
    model: str,
    reference: str,
    image_ids: np.ndarray,
    patient_ids: np.ndarray,
    y_true: np.ndarray,
    scores_model: np.ndarray,
    scores_ref: np.ndarray,
    boxes: pd.DataFrame,
    *,
    findings: Sequence[str] = LOCALISED_FINDINGS,
    n_bins: int = 3,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """`lesion_size_delta.csv`'s rows for one (model, reference) pair (module docstring).

    `y_true [N, 14]` in FINDINGS order; scores `[S, N, 14]` (S seeds, seed s of the model paired
    with seed s of the reference); `boxes` as `localisation.parse_bbox_list` returns them.
    """
    ids = np.asarray(image_ids).astype(str)
    patients = np.asarray(patient_ids).astype(str)
    rows = []
    for finding in findings:
        f = FINDINGS.index(finding)
        positive, negative = y_true[:, f].astype(bool), ~y_true[:, f].astype(bool)
        area = largest_box_area(boxes, finding).reindex(ids).to_numpy(dtype=float)
        boxed = np.flatnonzero(positive & np.isfinite(area))
        if not boxed.size or not negative.any():
            continue
        for b, members in enumerate(size_bins(area[boxed], n_bins), start=1):
            pos = boxed[members]
            keep = np.r_[pos, np.flatnonzero(negative)]
            y = positive[keep].astype(np.int8)
            stats = bin_comparison(
                y,
                scores_model[:, keep, f],
                scores_ref[:, keep, f],
                patients[keep],
                n_resamples=n_resamples,
                seed=seed,
                confidence=confidence,
            )
            rows.append(
                {
                    "model": model,
                    "reference": reference,
                    "seeds": scores_model.shape[0],
                    "finding": finding,
                    "size_bin": b,
                    "area_min": float(area[pos].min()),
                    "area_max": float(area[pos].max()),
                    "positives": int(pos.size),
                    "positive_patients": int(np.unique(patients[pos]).size),
                    "negatives": int(negative.sum()),
                    "unboxed": int(positive.sum() - boxed.size),
                    **stats,
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))
