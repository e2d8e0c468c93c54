"""Long-tail metrics as the NIH-CXR-LT benchmark reports them, with honest small-sample handling.

Why this module exists: the paper-style macro numbers (metrics.py) average 14 findings whose
training counts differ by two orders of magnitude (Infiltration ~20k images, Hernia ~200), so a
model can look good on average while failing the rare findings the project is about. NIH-CXR-LT
(Holste et al., 2022) therefore reports

* metrics by *frequency group* (head / medium / tail by training-image count, the OLTR
  "many / medium / few-shot" split) so the tail is visible on its own,
* balanced accuracy, which -- unlike plain accuracy -- is not ~0.9 for a model that says
  "absent" everywhere, and
* sensitivity at a fixed high specificity, the operating point a screening reader would use.

Small-sample honesty: a finding with 1-3 positive test patients gets a percentile interval from
resamples that mostly repeat the same few patients, so the interval prints as a narrow, confident
range although the estimate is close to anecdote (Hernia with 2 test positives showed AUROC 0.954
[0.900, 0.992]). Such findings are flagged `reliable = False` instead of being dropped. The
count is of distinct positive PATIENTS (`test_positive_patients`), not films: twelve films of two
patients are two units to resample. (Macro precision counts a finding that is never predicted as
0: `metrics.evaluate_split`.)

Everything undefined stays NaN (never 0), thresholds are the validation ones, and intervals use
the patient bootstrap of bootstrap.py (same `patient_weights` seed semantics).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from rare_cxr.evaluation.bootstrap import bootstrap_samples, fixed_set_mean, percentile_interval
from rare_cxr.evaluation.metrics import auprc, auroc, positive_patients, threshold_metrics
from rare_cxr.findings import FINDINGS

NAN = float("nan")
GROUPS = ("head", "medium", "tail")
ALL = "all"  # the row over every finding (issue 20): the challenges' overall mAP
GROUP_METRICS = ("auroc", "auprc", "balanced_accuracy")
# long_tail.csv names the group mean of AUPRC (average precision) "mAP", as the CXR-LT
# challenges (2023, 2024) do; files and bundles written before issue 20 call it "auprc".
GROUP_COLUMNS = {"auroc": "auroc", "auprc": "mAP", "balanced_accuracy": "balanced_accuracy"}
OLD_GROUP_COLUMNS = {"mAP": "auprc"}
# The NIH-CXR-LT / OLTR convention: many-shot > 1,000, medium 100-1,000, few-shot < 100 images.
NIH_CXR_LT_HEAD_MIN = 1001
NIH_CXR_LT_TAIL_MAX = 100


def balanced_accuracy(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> float:
    """(recall + specificity) / 2 at a fixed (validation-chosen) threshold.

    NaN when the threshold is undefined or the split lacks positives (recall undefined) or
    negatives (specificity undefined): half of a balanced accuracy is not a balanced accuracy.
    """
    m = threshold_metrics(y_true, y_score, threshold)
    recall, specificity = m["recall"], m["specificity"]
    if math.isnan(recall) or math.isnan(specificity):
        return NAN
    return float((recall + specificity) / 2.0)


def _spec_column(target: float) -> str:
    return f"sensitivity_at_spec_{round(100 * float(target))}"


def sensitivity_at_specificity(
    y_true: np.ndarray, y_score: np.ndarray, target: float
) -> dict[str, float]:
    """The ROC operating point with the highest sensitivity whose specificity >= `target`.

    Computed on the given split itself (an oracle threshold, as NIH-CXR-LT reports it), so it
    describes the ranking quality at a clinically relevant specificity, not a deployable rule.
    Among points of equal sensitivity the one with the higher specificity wins. Every ROC
    point is considered (`drop_intermediate=False`); the first one (threshold +inf, nothing
    predicted positive) always qualifies, so the answer can be sensitivity 0 at threshold inf.
    NaN everywhere when the split lacks positives or negatives.
    """
    target = float(target)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"specificity target: expected in [0, 1], got {target!r}")
    y = np.asarray(y_true).astype(int)
    if not 0 < int(y.sum()) < y.size:
        return {"sensitivity": NAN, "specificity": NAN, "threshold": NAN}
    fpr, tpr, thresholds = roc_curve(y, np.asarray(y_score, dtype=float), drop_intermediate=False)
    specificity = 1.0 - fpr
    ok = np.flatnonzero(specificity >= target - 1e-12)
    # Highest sensitivity, then highest specificity (lexsort: last key is primary).
    best = ok[np.lexsort((-specificity[ok], -tpr[ok]))[0]]
    return {
        "sensitivity": float(tpr[best]),
        "specificity": float(specificity[best]),
        "threshold": float(thresholds[best]),
    }


def frequency_groups(
    train_positives: Mapping[str, int], head_min: int, tail_max: int
) -> dict[str, str]:
    """Head / medium / tail group of each finding from its training-split positive count.

    `head` if count >= head_min, `tail` if count < tail_max, else `medium`. The NIH-CXR-LT /
    OLTR "many / medium / few-shot" convention is > 1,000 / 100-1,000 / < 100 training images
    (head_min=1001, tail_max=100). The counts are parameters, not constants, because our
    patient-level splits (and the phantom data) have far fewer training images than NIH-CXR-LT's
    ~88k: with the benchmark's cut-offs every finding of a small run would land in one group.
    """
    head_min, tail_max = int(head_min), int(tail_max)
    if tail_max < 0:
        raise ValueError(f"reporting.long_tail.tail_max: expected >= 0, got {tail_max!r}")
    if head_min <= tail_max:
        raise ValueError(
            f"reporting.long_tail.head_min: expected > tail_max ({tail_max}), got {head_min!r}"
        )
    groups: dict[str, str] = {}
    for finding, count in train_positives.items():
        n = int(count)
        groups[finding] = "head" if n >= head_min else "tail" if n < tail_max else "medium"
    return groups


def _threshold_array(thresholds: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
    """Thresholds in FINDINGS order, from a finding -> threshold mapping or an [F] array."""
    if isinstance(thresholds, Mapping):
        return np.array([thresholds.get(f, NAN) for f in FINDINGS], dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if t.shape != (len(FINDINGS),):
        raise ValueError(f"thresholds: expected {len(FINDINGS)} values, got shape {t.shape}")
    return t


def _check_arrays(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(FINDINGS) or s.shape != y.shape:
        raise ValueError(
            f"y_true/y_score: expected matching [N, {len(FINDINGS)}] arrays, "
            f"got {y.shape} and {s.shape}"
        )
    return y, s


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; all-NaN -> NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=-1)


def group_bootstrap_samples(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Mapping[str, float] | Sequence[float] | np.ndarray,
    patient_ids: np.ndarray,
    groups: Mapping[str, str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Group means per patient-bootstrap resample: `{metric: {group: [R]}}`.

    Metrics are auroc, auprc and balanced_accuracy per finding from bootstrap.py's
    `bootstrap_samples` (same resamples for the same seed). Every resample averages ONE set of
    findings per group, those defined on the test set as is (the point estimate's): a resample
    that drew none of a member's positive patients is NaN (dropped from the interval), not a
    mean over fewer findings (`bootstrap.fixed_set_mean`). The correlation between findings is
    kept. Groups without findings are absent; `all` (every finding) is always there.
    """
    y, s = _check_arrays(y_true, y_score)
    t = _threshold_array(thresholds)
    samples = bootstrap_samples(
        y, s, t, np.asarray(patient_ids), n_resamples=n_resamples, seed=seed
    )
    per_finding = {
        "auroc": samples["auroc"],
        "auprc": samples["auprc"],
        # NaN when recall or specificity is undefined in the resample, as in the point estimate.
        "balanced_accuracy": (samples["recall"] + samples["specificity"]) / 2.0,
    }
    point = _point_estimates(y, s, t)
    out: dict[str, dict[str, np.ndarray]] = {m: {} for m in GROUP_METRICS}
    for g in (*GROUPS, ALL):
        idx = [i for i, f in enumerate(FINDINGS) if groups.get(f) == g or g == ALL]
        if idx:
            for m in GROUP_METRICS:
                out[m][g] = fixed_set_mean(per_finding[m][:, idx], point[m][idx])[0]
    return out


def _point_estimates(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """auroc, auprc, balanced_accuracy per finding `[F]` on the test set as is."""
    return {
        "auroc": np.array([auroc(y[:, i], s[:, i]) for i in range(y.shape[1])]),
        "auprc": np.array([auprc(y[:, i], s[:, i]) for i in range(y.shape[1])]),
        "balanced_accuracy": np.array(
            [balanced_accuracy(y[:, i], s[:, i], t[i]) for i in range(y.shape[1])]
        ),
    }


def long_tail_tables(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Mapping[str, float] | Sequence[float] | np.ndarray,
    train_positives: Mapping[str, int],
    patient_ids: np.ndarray,
    *,
    head_min: int,
    tail_max: int,
    min_positives: int = 10,
    specificities: Sequence[float] = (0.90, 0.95),
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-finding table, per-group table `long_tail.csv`) of one split, NIH-CXR-LT style.

    Per finding (FINDINGS order): `finding, group, train_positives, test_positives,
    test_positive_patients, auroc, auprc, balanced_accuracy, specificity` (at the validation
    threshold), one `sensitivity_at_spec_<100*target>` column per entry of `specificities`
    (default `sensitivity_at_spec_90`, `sensitivity_at_spec_95`), and `reliable` =
    test_positive_patients >= min_positives. Why the flag: percentile intervals from 1-3
    positive patients print as narrow, confident ranges (Hernia with 2 test positives showed
    AUROC 0.954 [0.900, 0.992]) although they say almost nothing; flagging keeps the number
    visible but marked.

    Per group (head, medium, tail; only groups that have findings; then `all`, every finding):
    `group, findings` ("A|B"), `n_findings`, and for each of auroc, mAP (the mean AUPRC =
    average precision, what the CXR-LT challenges call mAP; `auprc` before issue 20, see
    `group_field`), balanced_accuracy the mean over the group's findings where the metric is
    defined plus `<metric>_ci_low`, `<metric>_ci_high` and `<metric>_resamples_dropped`
    (`GROUP_TABLE_COLUMNS`). The interval is the patient bootstrap of bootstrap.py with the
    group mean taken *inside* each resample over one fixed set of findings (see
    `group_bootstrap_samples`; resamples that lost a member's positives are dropped and
    counted), so the correlation between findings of the same patients is kept (averaging
    per-finding interval ends would not be an interval of the mean).
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"reporting.bootstrap.confidence: expected in (0, 1), got {confidence!r}")
    y, s = _check_arrays(y_true, y_score)
    pids = np.asarray(patient_ids)
    if len(pids) != len(y):
        raise ValueError(f"patient_ids: expected {len(y)} values, got {len(pids)}")
    missing = [f for f in FINDINGS if f not in train_positives]
    if missing:
        raise ValueError(f"train_positives: missing finding(s) {missing}")
    t = _threshold_array(thresholds)
    groups = frequency_groups({f: train_positives[f] for f in FINDINGS}, head_min, tail_max)

    patients_with = positive_patients(y, pids)
    rows = []
    for i, f in enumerate(FINDINGS):
        yi, si = y[:, i], s[:, i]
        row = {
            "finding": f,
            "group": groups[f],
            "train_positives": int(train_positives[f]),
            "test_positives": int(yi.sum()),
            "test_positive_patients": int(patients_with[i]),
            "auroc": auroc(yi, si),
            "auprc": auprc(yi, si),
            "balanced_accuracy": balanced_accuracy(yi, si, t[i]),
            "specificity": threshold_metrics(yi, si, t[i])["specificity"],
        }
        for target in specificities:
            row[_spec_column(target)] = sensitivity_at_specificity(yi, si, target)["sensitivity"]
        row["reliable"] = bool(patients_with[i] >= max(int(min_positives), 2))
        rows.append(row)
    per_finding = pd.DataFrame(rows)

    boot = group_bootstrap_samples(y, s, t, pids, groups, n_resamples=n_resamples, seed=seed)
    group_rows = []
    for g in (*GROUPS, ALL):
        idx = [i for i, f in enumerate(FINDINGS) if groups[f] == g or g == ALL]
        if not idx:
            continue
        row = {
            "group": g,
            "findings": "|".join(FINDINGS[i] for i in idx),
            "n_findings": len(idx),
        }
        for m in GROUP_METRICS:
            name = GROUP_COLUMNS[m]
            row[name] = float(_nanmean_rows(per_finding[m].to_numpy(dtype=float)[idx]))
            low, high = percentile_interval(boot[m][g], confidence)
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(low), float(high)
        for m in GROUP_METRICS:  # additive columns (issue 18), after the issue-13 ones
            defined = np.isfinite(per_finding[m].to_numpy(dtype=float)[idx]).any()
            dropped = int(np.isnan(boot[m][g]).sum()) if defined else 0
            row[f"{GROUP_COLUMNS[m]}_resamples_dropped"] = dropped
        group_rows.append(row)
    return per_finding, pd.DataFrame(group_rows, columns=list(GROUP_TABLE_COLUMNS))


GROUP_TABLE_COLUMNS = (
    "group",
    "findings",
    "n_findings",
    *(
        c
        for m in GROUP_METRICS
        for c in (GROUP_COLUMNS[m], f"{GROUP_COLUMNS[m]}_ci_low", f"{GROUP_COLUMNS[m]}_ci_high")
    ),
    *(f"{GROUP_COLUMNS[m]}_resamples_dropped" for m in GROUP_METRICS),
)


def group_field(row: Mapping[str, Any], column: str) -> Any:
    """A value of a long_tail.csv / `<model>.long_tail` group row by its current name (`mAP`,
    `mAP_ci_low`, ...), read from the name files and bundles of earlier versions used
    (`auprc`, `auprc_ci_low`, ...) when the current one is absent; None when neither is there."""
    if column in row:
        return row[column]
    for new, old in OLD_GROUP_COLUMNS.items():
        if column == new or column.startswith(new + "_"):
            return row.get(old + column[len(new) :])
    return None


def read_group_table(table: pd.DataFrame) -> pd.DataFrame:
    """long_tail.csv as this version names it: an older file's `auprc*` group columns renamed
    to `mAP*` (nothing else changes)."""
    renames = {}
    for new, old in OLD_GROUP_COLUMNS.items():
        if new not in table.columns:
            renames.update(
                {
                    c: new + c[len(old) :]
                    for c in table.columns
                    if c == old or c.startswith(old + "_")
                }
            )
    return table.rename(columns=renames)


# The ranking of models (later: long-tail methods) as the CXR-LT challenges rank entries.
RANKED_METRICS = (("mAP", "auprc"), ("auroc", "auroc"))  # (long_tail.csv column, paired metric)
RANKING_COLUMNS = (
    "metric",
    "group",
    "rank",
    "model",
    "value",
    "ci_low",
    "ci_high",
    "leader",
    "seeds",
    "delta_vs_leader",
    "delta_ci_low",
    "delta_ci_high",
    "p_value",
    "p_holm",
    "differs_from_leader",
    "method",
    "resamples_dropped",
    "findings",
)
RANKING_METHOD = "paired patient bootstrap of the group mean (Holm across the models)"


def group_ranking(
    groups: Mapping[str, pd.DataFrame],
    paired_delta: Callable[[str, str, str], Mapping[str, Any]],
    *,
    group: str = "tail",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Models ranked by `group`'s mAP and by its AUROC (best first), each compared with the
    leader (rank 1) on the same test patients.

    `groups`: model -> its group table (long_tail.csv rows of that model; older `auprc` names
    are read too). `paired_delta(model, leader, metric)` (metric `auprc` or `auroc`) returns the
    paired patient-bootstrap test of the group mean's difference model - leader (`paired.
    paired_bootstrap_macro` restricted to the group's findings): `delta, ci_low, ci_high,
    p_value, resamples_dropped, seeds`. Ranks are by the values shown (equal values share a
    rank); an order is only a finding where `differs_from_leader` (Holm-adjusted p across the
    models compared with that leader < 1 - confidence): neighbouring ranks are otherwise ties
    in all but name. Columns: `RANKING_COLUMNS`; empty when no model has the group.
    """
    from rare_cxr.evaluation.paired import holm

    alpha = 1.0 - float(confidence)
    rows: list[dict[str, Any]] = []
    for column, paired_metric in RANKED_METRICS:
        entries = []
        for model, table in groups.items():
            part = table[table["group"].astype(str) == group] if len(table) else table
            if not len(part):
                continue
            r = part.iloc[0].to_dict()
            entries.append(
                {
                    "metric": column,
                    "group": group,
                    "model": model,
                    "value": _float(group_field(r, column)),
                    "ci_low": _float(group_field(r, f"{column}_ci_low")),
                    "ci_high": _float(group_field(r, f"{column}_ci_high")),
                    "findings": str(r.get("findings", "")),
                }
            )
        if not entries:
            continue
        frame = pd.DataFrame(entries)
        frame["rank"] = frame["value"].rank(method="min", ascending=False, na_option="bottom")
        frame = frame.sort_values(["rank"], kind="mergesort").reset_index(drop=True)
        leader = str(frame.loc[0, "model"])
        tests = {
            m: dict(paired_delta(m, leader, paired_metric))
            for m, v in zip(frame["model"], frame["value"], strict=True)
            if m != leader and math.isfinite(v)
        }
        adjusted = dict(
            zip(tests, holm([t.get("p_value", NAN) for t in tests.values()]), strict=True)
        )
        for entry in frame.to_dict(orient="records"):
            test = tests.get(entry["model"], {})
            p_holm = float(adjusted.get(entry["model"], NAN))
            rows.append(
                {
                    **entry,
                    "rank": int(entry["rank"]),
                    "leader": leader,
                    "seeds": test.get("seeds", pd.NA),
                    "delta_vs_leader": test.get("delta", NAN),
                    "delta_ci_low": test.get("ci_low", NAN),
                    "delta_ci_high": test.get("ci_high", NAN),
                    "p_value": test.get("p_value", NAN),
                    "p_holm": p_holm,
                    "differs_from_leader": bool(p_holm < alpha) if test else pd.NA,
                    "method": RANKING_METHOD if test else "",
                    "resamples_dropped": test.get("resamples_dropped", pd.NA),
                }
            )
    return pd.DataFrame(rows, columns=list(RANKING_COLUMNS))


def _float(value: Any) -> float:
    return NAN if value is None else float(value)
