"""One self-contained `report.html`: the answer first (the summary), then tables,
base64-embedded figures, definitions, data and parameters.

Self-contained because a report is mailed, attached to tickets and opened years later: no
external CSS, scripts or image files, only inline styles and `data:image/png;base64` images.
The page is the template `rare_cxr/templates/report.html.j2` (autoescaped); this module only
builds the data it shows.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from rare_cxr.evaluation.report_sections import Section
from rare_cxr.templating import render

METRIC_EXPLANATIONS: list[tuple[str, str]] = [
    (
        "Threshold",
        "Chosen per finding on the validation split only (max F1 by default, Youden's "
        "J as an option) and applied unchanged to test. Test labels never influence it.",
    ),
    (
        "ACC / Recall / Precision / F1 (the paper's four numbers)",
        "Macro averages over the "
        "findings where the metric is defined, of per-finding accuracy (TP+TN)/N, recall "
        "TP/(TP+FN), precision TP/(TP+FP) and F1 2TP/(2TP+FP+FN), on test at the validation "
        "thresholds.",
    ),
    (
        "All-negative ACC",
        "The ACC of a model that predicts every finding absent: mean over "
        "findings of 1 - prevalence. On ChestX-ray14 it is about 0.92 - an ACC near it means "
        "nothing. Read ACC only next to it, and prefer AUROC/AUPRC.",
    ),
    (
        "Subset accuracy",
        "Share of test images whose 14 predictions are all correct (exact "
        "match); the all-negative model scores the share of 'No Finding' images.",
    ),
    (
        "AUROC",
        "Probability that a random positive image scores above a random negative one; "
        "threshold-free, 0.5 = chance; insensitive to prevalence.",
    ),
    (
        "AUPRC",
        "Average precision over recall levels; its chance level is the prevalence, so it "
        "is the honest summary for rare findings.",
    ),
    ("Micro", "Ratios from TP/FP/FN/TN pooled over all findings: dominated by the common ones."),
    (
        "95% intervals",
        "Percentile bootstrap over patients (all images of a patient are "
        "resampled together); the number of resamples and seed are below. The validation "
        "thresholds stay fixed in every resample, so the F1, precision and recall intervals "
        "EXCLUDE the thresholds' own uncertainty and are narrower than a re-tuned interval "
        "would be. Where the bootstrap degenerates for a proportion (recall, precision, "
        "specificity, accuracy of a finding at 0 or 1, or with fewer than "
        "reporting.min_positives positive patients) the interval is Clopper-Pearson "
        "(reporting.proportion_interval: exact; or Wilson) on counts scaled to the patients "
        "behind them; metrics.json names the interval per finding and metric "
        "(intervals.per_finding_method). A macro interval averages one fixed set of findings "
        "(those defined on test) in every resample; resamples that drew no positive patient "
        "of one of them are dropped and counted (Table 1: Resamples dropped).",
    ),
    (
        "Mean ± sd (several seeds)",
        "Over the training seeds, each on the same test set: TRAINING variation only. The "
        "test-sampling error is not in it (it is the bootstrap interval of one seed, in "
        "metrics.json), and the paired tests are conditional on the trained weights.",
    ),
    (
        "† (unreliable)",
        "Fewer distinct positive test PATIENTS than reporting.min_positives (10), or a single "
        "one: a percentile interval or a p-value from a handful of patients (however many "
        "films they have) prints as a narrow range that means little; read such cells as "
        "anecdotes.",
    ),
    (
        "Precision 0-filled",
        "Findings that occur in test but that the model never predicts: their precision is "
        "0/0; the macro precision counts them as 0, not as missing.",
    ),
    (
        "Undefined",
        "A metric with an empty denominator (e.g. a finding with no positives in a "
        "split) is shown as 'n/a' and listed as undefined - never as 0.",
    ),
    (
        "Cost",
        "Parameters; GFLOPs per image at the model's input size (multiply-add = 2 FLOPs, "
        "torch.utils.flop_counter); measured inference images/s on the reporting device.",
    ),
]


def class_weight_table(
    cards: Mapping[str, Mapping[str, Any]], data_summary: Mapping[str, Any]
) -> pd.DataFrame:
    """Per model: loss, balanced or not, `pos_weight_cap`, and the findings the cap changed.

    `cards`: model -> checkpoint card (`train_params`, `pos_weight`); the uncapped balanced
    weight (negatives / positives) comes from the training split's counts in `data_summary`.
    Models without training parameters (older checkpoints) are left out.
    """
    from rare_cxr.findings import FINDINGS

    images = {str(r["split"]): int(r["images"]) for r in data_summary.get("splits") or []}
    positives = {str(r["split"]): r for r in data_summary.get("positives") or []}
    n_train, train = images.get("train", 0), positives.get("train", {})
    rows = []
    for model, card in cards.items():
        loss = (card.get("train_params") or {}).get("loss")
        if not loss:
            continue
        cap = float(loss.get("pos_weight_cap", math.inf))
        capped = []
        for f in FINDINGS:
            pos = int(train.get(f) or 0)
            if loss.get("balanced") and pos > 0 and (n_train - pos) / pos > cap:
                capped.append(f"{f} ({(n_train - pos) / pos:.0f})")
        used = card.get("pos_weight")
        rows.append(
            {
                "Model": model,
                "loss": loss.get("name", "bce"),
                "balanced": bool(loss.get("balanced")),
                "pos_weight_cap": cap,
                "largest pos_weight used": max(used) if used else None,
                "capped (uncapped weight)": ", ".join(capped) or "none",
            }
        )
    return pd.DataFrame(rows)


def png_data_uri(png: bytes | str) -> str:
    """`data:` URI for PNG bytes (or an already base64-encoded string)."""
    b64 = png if isinstance(png, str) else base64.b64encode(png).decode("ascii")
    return f"data:image/png;base64,{b64}"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _p_text(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def paired_answer(row: Mapping[str, Any]) -> dict[str, Any]:
    """One macro ΔAUROC row of the paired comparison, as the summary states it."""
    delta, low, high = (_number(row.get(k)) for k in ("delta", "ci_low", "ci_high"))
    p = _number(row.get("p_value"))
    if delta is None:
        text, verdict = "n/a", "undefined (a model has no defined macro AUROC)"
    else:
        text = f"{delta:+.3f}"
        if low is not None and high is not None:
            text += f" [{low:.3f}, {high:.3f}]"
        if low is not None and low > 0:
            verdict = f"{row['model']} is better: the interval excludes 0"
        elif high is not None and high < 0:
            verdict = f"{row['reference']} is better: the interval excludes 0"
        else:
            verdict = "no difference shown: the interval includes 0"
    return {
        "model": str(row["model"]),
        "reference": str(row["reference"]),
        "delta": text,
        "p": _p_text(p),
        "seeds": row.get("seeds"),
        "verdict": verdict,
    }


def report_summary(
    all_metrics: Mapping[str, Any],
    table1: pd.DataFrame,
    paired_comparison: pd.DataFrame | None,
    min_positives: int,
) -> dict[str, Any]:
    """What the report opens with: each comparison's paired macro ΔAUROC (interval, p), each
    model's macro AUROC (Table 1's cell), and the warnings: findings with too few positive test
    patients to read, and models whose macro AUROC interval reaches chance (0.5)."""
    auroc_cell = dict(zip(table1["Model"], table1["AUROC"], strict=True)) if len(table1) else {}
    models, not_learnt = [], []
    for model, both in all_metrics.items():
        m = both["metrics"]
        point = _number(m["test"]["macro"].get("auroc"))
        ci = m["intervals"]["macro"].get("auroc") or [None, None]
        low = _number(ci[0]) if ci else None
        learnt = point is not None and point > 0.5 and (low is None or low > 0.5)
        models.append({"model": model, "auroc": auroc_cell.get(model, "n/a"), "learnt": learnt})
        if not learnt:
            not_learnt.append(model)
    comparisons = []
    if paired_comparison is not None and len(paired_comparison):
        macro = paired_comparison[
            (paired_comparison["finding"] == "macro") & (paired_comparison["metric"] == "auroc")
        ]
        comparisons = [paired_answer(row) for _, row in macro.iterrows()]
    return {
        "comparisons": comparisons,
        "models": models,
        "not_learnt": not_learnt,
        "unreliable": _unreliable_findings(all_metrics, min_positives),
        "min_positives": int(min_positives),
    }


def _unreliable_findings(
    all_metrics: Mapping[str, Any], min_positives: int
) -> list[dict[str, Any]]:
    """Findings with fewer positive test patients than `min_positives` (or than 2): every
    model is tested on the same patients, so the first model's counts hold for all."""
    first = next(iter(all_metrics.values()), None)
    if first is None:
        return []
    per = first["metrics"]["test"]["per_finding"]
    out = []
    for finding, values in per.items():
        people = int(values.get("positive_patients", values.get("positives") or 0) or 0)
        if people < max(int(min_positives), 2):
            out.append({"finding": finding, "patients": people})
    return out


def render_report(
    *,
    title: str,
    summary: Mapping[str, Any],
    table1: pd.DataFrame,
    all_negative: Mapping[str, float],
    per_finding_auroc: pd.DataFrame,
    rare_table: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    figures: Sequence[Mapping[str, Any]],
    undefined: Mapping[str, Mapping[str, list[str]]],
    params: Mapping[str, Any],
    lineage: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Sequence[Section] = (),
    model_cards: Mapping[str, str] | None = None,
) -> str:
    """The HTML text of the report. `figures`: {key, caption, uri}; `model_cards`: model -> its
    card's HTML (rare_cxr.inference.model_card.card_html, already demoted), each shown folded."""
    boxes = data_summary.get("bounding_boxes") or {}
    return render(
        "report.html.j2",
        title=title,
        summary=summary,
        table1=table1,
        all_negative=[
            (k, f"{v:.3f}") for k, v in all_negative.items() if v is not None and not math.isnan(v)
        ],
        rare_table=rare_table,
        rare_rule=str(rare_findings.get("rule", "")),
        rare_names=", ".join(rare_findings.get("findings", [])),
        per_finding_auroc=per_finding_auroc,
        sections=list(sections),
        figures=list(figures),
        explanations=METRIC_EXPLANATIONS,
        undefined=[
            (model, finding, ", ".join(names))
            for model, per in undefined.items()
            for finding, names in per.items()
        ],
        source=str(data_summary.get("source", "")),
        split_counts=pd.DataFrame(data_summary.get("splits") or []),
        positives=pd.DataFrame(data_summary.get("positives") or []),
        boxes=boxes,
        lineage=_lineage_table(lineage or {}),
        model_cards=dict(model_cards or {}),
        params_json=json.dumps(params, indent=2, sort_keys=True, default=str),
    )


def _lineage_table(lineage: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "Model": model,
                "checkpoint version": rec.get("checkpoint_version", "n/a"),
                "training id": rec.get("training_id", "n/a"),
                "best epoch": rec.get("best_epoch", "n/a"),
                "image cache": rec.get("image_cache_fingerprint", "n/a"),
            }
            for model, rec in lineage.items()
        ]
    )
