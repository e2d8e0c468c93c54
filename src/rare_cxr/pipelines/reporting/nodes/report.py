"""report.html: gathers what the run produced and hands it to the template
(`rare_cxr.evaluation.report_html`, `templates/report.html.j2`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.evaluation import report_html
from rare_cxr.evaluation.report_sections import analysis_sections
from rare_cxr.pipelines.reporting.params import (
    ReportingParams,
    reporting_params,
    validate_reporting_params,
)

FIGURE_CAPTIONS = {
    "figure2_validation_curves": "Figure 2 — validation ACC and AUROC per epoch",
    "training_loss_curves": "Training and validation loss",
    "per_finding_auroc_figure": "Per-finding test AUROC with 95% intervals",
    "roc_curves": "ROC curves per finding (test)",
    "pr_curves": "Precision-recall curves per finding (test)",
    "reliability_diagram": "Reliability diagram (test, all findings pooled)",
    "reliability_rare": "Reliability per rare finding (test): raw (solid) and after the "
    "validation temperature (dashed), in the ECE's bins (reporting.calibration)",
    "seed_spread": "Spread over training seeds (dots) and their mean (bar)",
    "paired_forest": "Paired comparison: Δ (model − reference) with UNADJUSTED 95% intervals; "
    "filled = the interval excludes 0 (no multiplicity correction, for bars and fill alike); "
    "* after a finding = p_holm < 0.05 (Holm across findings); grey, hollow, † = unreliable "
    "(fewer than reporting.min_positives positive test patients)",
}


def render_report(
    *,
    all_metrics: Mapping[str, Any],
    table1: pd.DataFrame,
    per_finding_auroc: pd.DataFrame,
    rare_findings_table: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    reporting: ReportingParams,
    paired_comparison: pd.DataFrame | None = None,
    expert_labels: pd.DataFrame | None = None,
    localisation: pd.DataFrame | None = None,
    long_tail: pd.DataFrame | None = None,
    long_tail_findings: pd.DataFrame | None = None,
    subgroups: pd.DataFrame | None = None,
    long_tail_ranking: pd.DataFrame | None = None,
    calibration: pd.DataFrame | None = None,
    underdiagnosis: pd.DataFrame | None = None,
    method_comparison: pd.DataFrame | None = None,
    lesion_size_delta: pd.DataFrame | None = None,
    **pngs: bytes,
) -> str:
    """report.html: the summary first, then tables, every saved figure (PNG bytes of this
    run), definitions, data, params.

    `pngs` are keyword inputs named after the figure datasets; Grad-CAM ones are
    `<model>__gradcam`. `<model>__model_card` inputs are the model cards (Markdown).
    """
    cfg = reporting_params(reporting)
    cards = _model_cards(pngs)  # takes the cards out of `pngs`
    tables = {
        "paired_comparison": paired_comparison,
        "long_tail": long_tail,
        "long_tail_ranking": long_tail_ranking,
        "method_comparison": method_comparison,
        "lesion_size_delta": lesion_size_delta,
        "long_tail_findings": long_tail_findings,
        "subgroups": subgroups,
        "underdiagnosis": underdiagnosis,
        "calibration": calibration,
        "expert_labels": expert_labels,
        "localisation": localisation,
        "class_weights": _class_weights(all_metrics, data_summary),
    }
    return report_html.render_report(
        title=cfg.title,
        summary=report_html.report_summary(
            all_metrics, table1, paired_comparison, cfg.min_positives
        ),
        table1=table1,
        all_negative=_all_negative(all_metrics),
        per_finding_auroc=per_finding_auroc.round(3),
        rare_table=rare_findings_table,
        rare_findings=rare_findings,
        data_summary=data_summary,
        figures=_figures(pngs),
        undefined={m: b["metrics"]["test"]["undefined"] for m, b in all_metrics.items()},
        params={
            "reporting": validate_reporting_params(cfg),  # plain data, shown as JSON
            "models": {m: b.get("cost", {}).get("checkpoint", {}) for m, b in all_metrics.items()},
        },
        lineage={m: b["metrics"].get("lineage") or {} for m, b in all_metrics.items()},
        sections=analysis_sections(tables, cfg.min_positives),
        model_cards=cards,
    )


def _model_cards(pngs: dict[str, Any]) -> dict[str, str]:
    """`<model>__model_card` inputs (Markdown), popped from `pngs`, as HTML nested two heading
    levels down (its title under the report's "Model cards" section)."""
    from rare_cxr.inference.model_card import card_html

    keys = [k for k in pngs if k.endswith("__model_card")]
    return {key.rsplit("__", 1)[0]: card_html(pngs.pop(key), demote=2) for key in keys}


def _figures(pngs: Mapping[str, Any]) -> list[dict[str, str]]:
    """{key, caption, uri} per figure, in input order; Grad-CAM ones named by model."""
    out = []
    for key, png in pngs.items():
        if key.endswith("__gradcam"):
            caption = f"Grad-CAM — {key.rsplit('__', 1)[0]}"
        else:
            caption = FIGURE_CAPTIONS.get(key, key)
        out.append({"key": key, "caption": caption, "uri": report_html.png_data_uri(png)})
    return out


def _all_negative(all_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The all-negative baseline's ACC and subset ACC (the same test set for every model)."""
    first = next(iter(all_metrics.values()), None)
    if not first:
        return {}
    baseline = first["metrics"]["test"]["all_negative"]
    return {"ACC": baseline["accuracy"], "subset ACC": baseline["subset_accuracy"]}


def _class_weights(all_metrics: Mapping[str, Any], data_summary: Mapping[str, Any]) -> pd.DataFrame:
    """The class weights each model trained with, and what `pos_weight_cap` changed."""
    cards = {m: (b.get("cost") or {}).get("checkpoint") or {} for m, b in all_metrics.items()}
    return report_html.class_weight_table(cards, data_summary)
