"""One self-contained `report.html`: tables, base64-embedded figures, definitions, data, params.

Self-contained because a report is mailed, attached to tickets and opened years later: no
external CSS, scripts or image files, only inline styles and `data:image/png;base64` images.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

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

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}
code,pre{background:#f6f6f6;font-size:.85em}pre{padding:.6em;overflow-x:auto}
dt{font-weight:600}dd{margin:0 0 .5em 1.2em}
"""


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


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _table(df: pd.DataFrame) -> str:
    table = df.to_html(index=False, na_rep="n/a", border=0, escape=True)
    return f"<div style='overflow-x:auto'>{table}</div>"


def render_report(
    *,
    title: str,
    table1: pd.DataFrame,
    all_negative: Mapping[str, float],
    per_finding_auroc: pd.DataFrame,
    rare_table: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    figures: Mapping[str, tuple[str, bytes | str]],
    undefined: Mapping[str, Mapping[str, list[str]]],
    params: Mapping[str, Any],
    lineage: Mapping[str, Mapping[str, Any]] | None = None,
    sections: list[tuple[str, str, pd.DataFrame]] | None = None,
    model_cards: Mapping[str, str] | None = None,
) -> str:
    """The HTML text of the report. `figures`: key -> (caption, PNG bytes or base64);
    `model_cards`: model -> its model card's HTML (rare_cxr.inference.model_card.card_html),
    each shown folded."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p>Multi-label classification of 14 thoracic findings. Start with Table 1; read ACC "
        "only next to the all-negative ACC; compare models on AUROC/AUPRC with their "
        "intervals; the rare-finding block is the point of the study.</p>",
        "<h2>Table 1 — test set, validation-tuned thresholds</h2>",
        "<p>Column Uncertainty says what a row's brackets or ± are: a 95% patient-bootstrap "
        "interval (one seed), or mean ± sd over seeds (training variation only: the "
        "test-sampling error is not in it).</p>",
        _table(table1),
        "<p class='warn'>All-negative baseline (predict nothing): "
        + ", ".join(
            f"{e(k)} {v:.3f}"
            for k, v in all_negative.items()
            if v is not None and not math.isnan(v)
        )
        + ". A model's ACC close to this number has learnt nothing that ACC can show.</p>",
        "<h2>Rare findings</h2>",
        f"<p>{e(str(rare_findings.get('rule', '')))}: "
        f"{e(', '.join(rare_findings.get('findings', [])))}.</p>",
        _table(rare_table),
        "<h2>Per-finding test AUROC</h2>",
        _table(per_finding_auroc),
    ]
    for title_text, explanation, table in sections or []:
        parts.append(f"<h2>{e(title_text)}</h2><p>{e(explanation)}</p>")
        parts.append(_table(table))
    for key, (caption, png) in figures.items():
        parts.append(
            f"<h3 id='{e(key)}'>{e(caption)}</h3><img alt='{e(key)}' src='{png_data_uri(png)}'>"
        )
    parts.append("<h2>What the metrics mean</h2><dl>")
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in METRIC_EXPLANATIONS]
    parts.append("</dl>")
    if any(undefined.values()):
        parts.append("<h2>Undefined metrics</h2><ul>")
        for model, per in undefined.items():
            for finding, names in per.items():
                parts.append(f"<li>{e(model)} — {e(finding)}: {e(', '.join(names))}</li>")
        parts.append("</ul>")
    parts.append("<h2>Data used</h2>")
    parts.append(f"<p>Source: <code>{e(str(data_summary.get('source', '')))}</code></p>")
    counts = data_summary.get("splits")
    if counts:
        parts.append(_table(pd.DataFrame(counts)))
    positives = data_summary.get("positives")
    if positives:
        parts.append("<p>Positive images per finding and split:</p>")
        parts.append(_table(pd.DataFrame(positives)))
    boxes = data_summary.get("bounding_boxes") or {}
    if boxes.get("present"):
        parts.append(
            f"<p>Bounding boxes: {boxes.get('boxes')} on {boxes.get('images')} images "
            "(drawn on the Grad-CAM figures where a shown image has one).</p>"
        )
    elif boxes:
        parts.append(f"<p class='warn'>Bounding boxes: {e(str(boxes.get('note', '')))}.</p>")
    if lineage:
        parts.append(
            "<h2>Sources</h2><p>Each model's numbers come from one training: its checkpoint "
            "version (the run id that saved it), training id and image cache were checked to "
            "belong together before anything was computed (node <code>verify_lineage</code>). "
            "The run that wrote this report is recorded in <code>data/&lt;env&gt;/runs/</code>.</p>"
        )
        rows = [
            {
                "Model": model,
                "checkpoint version": rec.get("checkpoint_version", "n/a"),
                "training id": rec.get("training_id", "n/a"),
                "best epoch": rec.get("best_epoch", "n/a"),
                "image cache": rec.get("image_cache_fingerprint", "n/a"),
            }
            for model, rec in lineage.items()
        ]
        parts.append(_table(pd.DataFrame(rows)))
    if model_cards:
        parts.append(
            "<h2 id='model-cards'>Model cards</h2><p>One per model, generated from this run "
            "(also saved as <code>&lt;model&gt;/model_card.md</code>, beside the model bundle "
            "that `kedro run --pipelines inference` uses). Not for clinical use.</p>"
        )
        for model, card in model_cards.items():
            # the card's own headings, demoted under this section
            body = card.replace("<h1>", "<h3>").replace("</h1>", "</h3>")
            body = body.replace("<h2>", "<h4>").replace("</h2>", "</h4>")
            parts.append(f"<details><summary>{e(model)}</summary>{body}</details>")
    parts.append("<h2>Run parameters</h2><pre>")
    parts.append(e(json.dumps(params, indent=2, sort_keys=True, default=str)))
    parts.append("</pre></body></html>")
    return "\n".join(parts)
