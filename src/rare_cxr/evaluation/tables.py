"""The study's summary tables from the per-model metrics: Table 1 (the paper's, extended),
per-finding AUROC, the rare-finding block, and the per-model tables the combined nodes gather.

Cells are text where a value carries its interval (`0.812 [0.790, 0.833]`) or its seed spread
(`0.812 ± 0.004`), so the CSV, the Markdown and report.html print the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.evaluation.bootstrap import METRICS as INTERVAL_METRICS
from rare_cxr.findings import FINDINGS

TABLE1_COLUMNS = {
    "ACC": "accuracy",
    "Recall": "recall",
    "Precision": "precision",
    "F1": "f1",
    "Specificity": "specificity",
    "Balanced ACC": "balanced_accuracy",
    "AUROC": "auroc",
    "AUPRC": "auprc",
}


def fmt(value: Any, ci: Any = None, digits: int = 3) -> str:
    """`value [low, high]` (the interval only when both ends exist); `n/a` when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def mean_sd(summary: Mapping[str, Any] | None) -> str:
    """`mean ± sd` of a seed summary; `n/a` when there is no mean."""
    if not summary or summary.get("mean") is None or math.isnan(float(summary["mean"])):
        return "n/a"
    sd = summary.get("sd")
    sd_text = "n/a" if sd is None or math.isnan(float(sd)) else f"{float(sd):.3f}"
    return f"{float(summary['mean']):.3f} ± {sd_text}"


def seed_summary(per_seed: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Mean, sample sd and count over seeds of each macro metric (NaN seeds left out)."""
    out = {}
    for key in INTERVAL_METRICS:  # the same macro metrics the intervals cover
        values = np.array([float(p["macro"][key]) for p in per_seed.values()], dtype=float)
        values = values[np.isfinite(values)]
        out[key] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "n": int(len(values)),
        }
    return out


def reliable(positive_patients: int, min_positives: int) -> bool:
    """Enough distinct positive patients to read an interval or a p-value: at least
    `reporting.min_positives`, and never fewer than 2 (one patient's clustered variance is 0)."""
    return int(positive_patients) >= max(int(min_positives), 2)


def table1(all_metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The paper's Table 1, extended: one row per model (see `table1_row`)."""
    return pd.DataFrame(
        [
            table1_row(model, both["metrics"], both.get("cost", {}))
            for model, both in all_metrics.items()
        ]
    )


def table1_row(model: str, m: Mapping[str, Any], c: Mapping[str, Any]) -> dict[str, Any]:
    """One model's row: macro metrics (interval, or mean ± sd over seeds), params, GFLOPs, img/s.

    One seed: each cell is the test value with its 95% patient-bootstrap interval. Several
    seeds: mean ± sd over the seeds (each at its own validation thresholds) -- the sd is
    TRAINING variation only (the same test set for every seed; the test-sampling error is not
    in it); the intervals of the primary seed stay in metrics.json. `Uncertainty` says which
    of the two a row shows. `Precision 0-filled` counts the findings that occur in test but
    were never predicted: their precision is counted as 0 in the macro mean. `Resamples
    dropped` (one seed): the most bootstrap resamples any of the row's macro intervals lost
    because they drew no positive patient of a finding in the macro's fixed set (see
    `bootstrap.fixed_set_mean`), out of the resamples drawn.
    """
    macro, ci = m["test"]["macro"], m["intervals"]["macro"]
    seeds = list(m.get("seeds") or [None])
    row: dict[str, Any] = {"Model": model, "Seeds": len(seeds)}
    for col, key in TABLE1_COLUMNS.items():
        if len(seeds) > 1:
            row[col] = mean_sd((m.get("seed_summary") or {}).get(key))
        else:
            row[col] = fmt(macro.get(key), ci.get(key))
    row["Precision 0-filled"] = int(macro.get("precision_zero_filled") or 0)
    row["Subset ACC"] = fmt(m["test"]["subset_accuracy"], m["intervals"]["subset_accuracy"])
    row["All-negative ACC"] = fmt(m["test"]["all_negative"]["accuracy"])
    row["params"] = f"{c.get('params', 0) / 1e6:.2f}M" if c.get("params") else "n/a"
    row["GFLOPs"] = fmt(c.get("gflops"), digits=2)
    row["img/s"] = fmt(c.get("img_per_s"), digits=1)
    row["img/s on"] = c.get("device", "cpu")  # measured there only
    # additive columns (issue 18): what the ± or [ ] of this row means, and the macro
    # resamples dropped
    row["Uncertainty"] = (
        f"mean ± sd over {len(seeds)} seeds: training variation only"
        if len(seeds) > 1
        else "95% patient-bootstrap interval"
    )
    dropped = m["intervals"].get("macro_resamples_dropped") or {}
    shown = [int(dropped[k]) for k in TABLE1_COLUMNS.values() if k in dropped]
    row["Resamples dropped"] = (
        f"{max(shown)} of {m['intervals']['n_resamples']}" if shown and len(seeds) == 1 else "n/a"
    )
    return row


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table (no `tabulate` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def per_finding_auroc(all_metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Models x findings test AUROC (CheXNet layout); empty cell = undefined."""
    rows = []
    for model, both in all_metrics.items():
        per = both["metrics"]["test"]["per_finding"]
        rows.append(
            {
                "Model": model,
                **{f: per[f]["auroc"] for f in FINDINGS},
                "Macro": both["metrics"]["test"]["macro"]["auroc"],
            }
        )
    return pd.DataFrame(rows)


def rare_findings_table(
    all_metrics: Mapping[str, Any], rare_findings: Mapping[str, Any], min_positives: int
) -> pd.DataFrame:
    """Rare block: AUROC/AUPRC/F1 (and recall, precision) with intervals per rare finding and
    model; a cell of a finding with fewer than `min_positives` positive test PATIENTS ends in
    † (unreliable). `interval (recall, precision)` names the interval of the two proportions:
    the patient bootstrap, or Clopper-Pearson/Wilson where it degenerates."""
    return pd.DataFrame(
        [
            _rare_row(finding, model, both["metrics"], rare_findings, min_positives)
            for finding in rare_findings["findings"]
            for model, both in all_metrics.items()
        ]
    )


def _rare_row(
    finding: str,
    model: str,
    m: Mapping[str, Any],
    rare_findings: Mapping[str, Any],
    min_positives: int,
) -> dict[str, Any]:
    per = m["test"]["per_finding"][finding]
    ci = m["intervals"]["per_finding"][finding]
    how = (m["intervals"].get("per_finding_method") or {}).get(finding, {})
    people = int(per.get("positive_patients", per["positives"]))
    mark = "" if reliable(people, min_positives) else " †"
    return {
        "Finding": finding,
        "Model": model,
        "train prevalence": fmt(rare_findings["train_prevalence"].get(finding), digits=4),
        "test positives": per["positives"],
        "test positive patients": people,
        "AUROC": fmt(per["auroc"], ci["auroc"]) + mark,
        "AUPRC": fmt(per["auprc"], ci["auprc"]) + mark,
        "F1": fmt(per["f1"], ci["f1"]) + mark,
        "Recall": fmt(per["recall"], ci["recall"]) + mark,
        "Precision": fmt(per["precision"], ci["precision"]) + mark,
        "interval (recall, precision)": ", ".join(
            dict.fromkeys(how.get(k, "bootstrap") for k in ("recall", "precision"))
        ),
    }


def rows_by_model(inputs: Mapping[str, Mapping[str, Any]], key: str) -> pd.DataFrame:
    """One table of the records `inputs[<model>__<kind>][key]`, each with a leading `model`
    column (the namespace that produced it)."""
    rows = []
    for name, value in inputs.items():
        rows += [{"model": name.rsplit("__", 1)[0], **row} for row in value[key]]
    return pd.DataFrame(rows)
