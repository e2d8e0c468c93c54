"""Underdiagnosis by subgroup: how often the model says "no finding" to a sick patient, by sex and
by age band (Seyyed-Kalantari et al., "Underdiagnosis bias of artificial intelligence
algorithms applied to chest radiographs in under-served patient populations", Nat Med 27:2176,
2021).

Why: a macro AUROC per subgroup (subgroups.py) ranks images; what harms a patient is the
decision. Seyyed-Kalantari et al. found that classifiers trained on ChestX-ray14, CheXpert and
MIMIC-CXR predict "no finding" for sick patients of some groups (female, younger, Black,
Hispanic, Medicaid-insured) more often than for others: those patients would not be sent on.

The decision here is the project's own ("any finding"): an image is called abnormal when at
least one of the 14 findings scores at or above its validation-tuned threshold (a finding
without a threshold is never called, as in `metrics.evaluate_split`). Then, on the test split:

* sick = at least one of the 14 labels positive;
* **underdiagnosis rate (false-negative rate of "any finding")** = among sick images, the
  fraction called normal ("predicted no finding while sick"), per subgroup and overall;
* **gap** = subgroup rate - overall rate (positive: the subgroup is underdiagnosed more often).

Films are counted, patients resampled: every interval is the patient bootstrap of
`bootstrap.patient_weights` over ALL test patients (the report's seed and resamples), and in
each resample the subgroup's rate, the overall rate and their gap are computed together, so the
gap's interval keeps their correlation (the subgroup's patients are part of the overall). A
resample without a sick image of the subgroup is dropped and counted (`resamples_dropped`).
Where the percentile interval of the rate degenerates (rate 0 or 1, or fewer than
`min_positives` sick patients in the subgroup) it is Clopper-Pearson or Wilson on counts scaled
to the sick patients behind them (`proportions.py`), and `reliable` is false below
`min_positives` sick patients. The subgroups are those of the AUROC table (`subgroups.py`:
sex as recorded, age bands `reporting.subgroups.age_edges`, "unknown" last).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rare_cxr.evaluation import proportions
from rare_cxr.evaluation.bootstrap import patient_weights, percentile_interval
from rare_cxr.evaluation.paired import bootstrap_p_value
from rare_cxr.evaluation.subgroups import subgroup_masks
from rare_cxr.findings import FINDINGS

NAN = float("nan")
ATTRIBUTES = ("sex", "age")
COLUMNS = (
    "attribute",
    "subgroup",
    "images",
    "sick_images",
    "sick_patients",
    "missed",
    "underdiagnosis_rate",
    "ci_low",
    "ci_high",
    "interval",
    "gap",
    "gap_ci_low",
    "gap_ci_high",
    "gap_p_value",
    "reliable",
    "resamples_dropped",
)


def any_finding_decision(
    y_score: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Per image: at least one finding at or above its threshold (NaN threshold: never)."""
    s = np.asarray(y_score, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if s.ndim != 2 or t.shape != (s.shape[1],):
        raise ValueError(f"scores [N, F] and thresholds [F] expected, got {s.shape}, {t.shape}")
    return (s >= np.where(np.isnan(t), np.inf, t)[None, :]).any(axis=1)


def underdiagnosis_table(  # noqa: PLR0913 -- data, then the reporting parameters by name
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Sequence[float] | np.ndarray,
    meta: pd.DataFrame,
    *,
    age_edges: Sequence[int],
    attributes: Sequence[str] = ATTRIBUTES,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_positives: int = 10,
    proportion_method: str = "exact",
) -> pd.DataFrame:
    """One row overall (`attribute` = subgroup = "all") and one per subgroup (module doc).

    `y_true`/`y_score` `[N, 14]` in FINDINGS order, `thresholds [14]` (validation), `meta`
    row-aligned with columns patient_id, sex, age (and view if `attributes` names it).
    Columns: `COLUMNS`; `interval` names the rate's interval (`bootstrap` or the binomial one).
    """
    y = np.asarray(y_true).astype(bool)
    if y.ndim != 2 or y.shape[1] != len(FINDINGS):
        raise ValueError(f"y_true: expected [N, {len(FINDINGS)}], got {y.shape}")
    if len(meta) != len(y):
        raise ValueError(f"meta: expected {len(y)} rows aligned with y_true, got {len(meta)}")
    if "patient_id" not in meta.columns:
        raise ValueError("meta: missing column 'patient_id'")
    called = any_finding_decision(y_score, thresholds)
    if called.shape[0] != len(y):
        raise ValueError(f"y_score: expected {len(y)} rows, got {called.shape[0]}")
    sick = y.any(axis=1)
    missed = sick & ~called
    patients = meta["patient_id"].astype(str).to_numpy()
    groups = [("all", "all", np.ones(len(y), bool)), *subgroup_masks(meta, age_edges, attributes)]
    masks = np.stack([g[2] for g in groups], axis=1).astype(float)  # [N, G]
    sick_g, missed_g = masks * sick[:, None], masks * missed[:, None]
    chunks = []
    for w in patient_weights(patients, n_resamples, seed):
        with np.errstate(invalid="ignore", divide="ignore"):
            chunks.append((w @ missed_g) / (w @ sick_g))  # [r, G], NaN without sick images
    rates = np.concatenate(chunks) if chunks else np.zeros((0, len(groups)))
    gaps = rates - rates[:, :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        point = missed_g.sum(axis=0) / sick_g.sum(axis=0)
    low, high = percentile_interval(rates, confidence)
    gap_low, gap_high = percentile_interval(gaps, confidence)
    rows = []
    for k, (attribute, subgroup, mask) in enumerate(groups):
        n_sick = int(sick_g[:, k].sum())
        n_missed = int(missed_g[:, k].sum())
        sick_people = int(np.unique(patients[mask & sick]).size)
        row = {
            "attribute": attribute,
            "subgroup": subgroup,
            "images": int(mask.sum()),
            "sick_images": n_sick,
            "sick_patients": sick_people,
            "missed": n_missed,
            "underdiagnosis_rate": float(point[k]) if n_sick else NAN,
            "ci_low": float(low[k]),
            "ci_high": float(high[k]),
            "interval": "bootstrap",
            "gap": float(point[k] - point[0]) if n_sick else NAN,
            "gap_ci_low": NAN if k == 0 else float(gap_low[k]),
            "gap_ci_high": NAN if k == 0 else float(gap_high[k]),
            "gap_p_value": NAN if k == 0 or not n_sick else bootstrap_p_value(gaps[:, k]),
            "reliable": bool(sick_people >= max(int(min_positives), 2)),
            "resamples_dropped": int(np.isnan(rates[:, k]).sum()) if n_sick else 0,
        }
        if n_sick and (n_missed in (0, n_sick) or sick_people < int(min_positives)):
            k_eff, n_eff = proportions.patient_counts(n_missed, n_sick, sick_people)
            lo, hi = proportions.proportion_interval(k_eff, n_eff, confidence, proportion_method)
            row["ci_low"], row["ci_high"] = float(lo), float(hi)
            row["interval"] = proportions.METHOD_LABELS[proportion_method]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))
