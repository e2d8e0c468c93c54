"""The model card (Mitchell et al. 2019), written from a model bundle's metadata.

Why generated, never hand-written: every number in it (counts, metrics, intervals, thresholds)
comes from the run that made the bundle, so the card cannot drift from the model it describes.
One Markdown text is the source, the template `templates/model_card.md.j2` filled with
`card_context` (metadata values are escaped as Markdown text: a bundle cannot add a heading, an
image or a link to its own card, see `rare_cxr.inference.templating`); `card_html` renders
that same text for report.html and inference_report.html (markdown-it-py with raw HTML
disabled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rare_cxr.findings import FINDINGS
from rare_cxr.inference.templating import MdSafe, fmt_ci, fmt_number, md_escape, render

CITATIONS = (
    "Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray "
    "Database and Benchmarks on Weakly-Supervised Classification and Localization of Common "
    "Thorax Diseases. IEEE CVPR 2017 (the NIH ChestX-ray14 dataset).",
    "*Multi-Scale Classification of Rare Diseases Using ResNet* — the paper this project "
    "implements (image pyramid through a shared ResNet trunk, per-scale features fused by a "
    "fully connected layer).",
)
NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** This model is a research artefact: it is not a medical device, "
    "has not been validated prospectively or on any population other than the one below, and "
    "must not inform the diagnosis or treatment of any patient."
)
MACRO_KEYS = (
    ("AUROC", "auroc"),
    ("AUPRC", "auprc"),
    ("F1", "f1"),
    ("Precision", "precision"),
    ("Recall", "recall"),
    ("Specificity", "specificity"),
    ("Balanced ACC", "balanced_accuracy"),
    ("ACC", "accuracy"),
)


def _mapping(value: Any) -> Mapping[str, Any]:
    """A metadata section, or {} when a damaged bundle has something else there."""
    return value if isinstance(value, Mapping) else {}


def _rows(value: Any) -> list[Mapping[str, Any]]:
    """A metadata list of records, keeping only the records (mappings)."""
    return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []


def _cell(text: str, *values: Any) -> MdSafe:
    """Formatted numbers as Markdown; when one of `values` is not a number (a damaged or
    hostile bundle), `fmt_number` passes its text through, so the cell is escaped instead."""

    def plain(v: Any) -> bool:
        return v is None or (isinstance(v, int | float) and not isinstance(v, bool))

    return MdSafe(text) if all(plain(v) for v in values) else md_escape(text)


def _ci(row: Mapping[str, Any], key: str, low: str, high: str) -> Any:
    values = [row.get(key), row.get(low), row.get(high)]
    return _cell(fmt_ci(values[0], values[1:]), *values)


_BALANCED_CI = ("balanced_accuracy_ci_low", "balanced_accuracy_ci_high")


def _is_phantom(source: str) -> bool:
    return "phantom" in source.lower()


def _model_rows(m: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    spec, training = _mapping(m.get("model_spec")), _mapping(m.get("training"))
    normalisation = _mapping(m.get("normalisation"))
    scales = m.get("scales") if isinstance(m.get("scales"), list) else []
    return [
        ("architecture", spec.get("architecture")),
        ("backbone", spec.get("backbone", "—")),
        ("scales (px)", ", ".join(str(s) for s in scales)),
        ("fusion", spec.get("fusion", "—")),
        ("input", f"{m.get('input_size')} x {m.get('input_size')} px grey, [0, 1]"),
        ("normalisation", f"mean {normalisation.get('mean')}, std {normalisation.get('std')}"),
        ("pretrained", spec.get("pretrained", "none")),
        (
            "best epoch",
            f"{training.get('best_epoch')} ({training.get('metric_name')} "
            f"{fmt_number(training.get('metric'))})",
        ),
        ("test-time flip averaging", _mapping(m.get("preprocessing")).get("tta_hflip")),
    ]


def _finding_rows(m: Mapping[str, Any], min_positives: int) -> list[tuple[Any, ...]]:
    metrics = _mapping(m.get("metrics"))
    per, per_ci = (
        _mapping(metrics.get("per_finding")),
        _mapping(_mapping(metrics.get("intervals")).get("per_finding")),
    )
    rare = _mapping(m.get("rare_findings")).get("findings")
    rare_set = set(rare) if isinstance(rare, list) else set()
    thresholds = _mapping(m.get("thresholds"))
    rows = []
    for f in FINDINGS:
        p, ci = _mapping(per.get(f)), _mapping(per_ci.get(f))
        positives = p.get("positives")
        # distinct positive patients (older bundles: films), and never a single one
        patients = p.get("positive_patients", positives)
        few = not isinstance(patients, int | float) or patients < max(min_positives, 2)
        mark = " †" if few else ""
        rows.append(
            (
                MdSafe(md_escape(f) + (" (rare)" if f in rare_set else "")),
                positives if positives is not None else "n/a",
                *(MdSafe(fmt_ci(p.get(k), ci.get(k)) + mark) for k in ("auroc", "auprc", "f1")),
                MdSafe(fmt_number(thresholds.get(f), 4)),
            )
        )
    return rows


def card_context(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The data the card template shows, from a bundle's metadata (plain values: the template
    escapes them; only numbers formatted here are passed as Markdown)."""
    m = metadata
    training, data = _mapping(m.get("training")), _mapping(m.get("data"))
    metrics, reporting = _mapping(m.get("metrics")), _mapping(m.get("reporting"))
    intervals, rare = _mapping(metrics.get("intervals")), _mapping(m.get("rare_findings"))
    boot, pre = _mapping(reporting.get("bootstrap")), _mapping(m.get("preprocessing"))
    min_positives = _int(reporting.get("min_positives"), 10)
    source = str(data.get("source") or "unknown")
    positives = {r.get("split"): r for r in _rows(data.get("positives"))}
    macro, macro_ci = _mapping(metrics.get("macro")), _mapping(intervals.get("macro"))
    rare_list = rare.get("findings") if isinstance(rare.get("findings"), list) else []
    return {
        "model": m.get("model", "model"),
        "created_by": m.get("created_by", "rare-cxr"),
        "bundle_version": m.get("bundle_version"),
        "checkpoint_version": training.get("checkpoint_version", "n/a"),
        "training_id": training.get("training_id", "n/a"),
        "not_for_clinical_use": MdSafe(NOT_FOR_CLINICAL_USE),
        "model_rows": _model_rows(m),
        "preprocessing_grey": pre.get("grey", "n/a"),
        "preprocessing_resize": pre.get("resize", "n/a"),
        "source": source,
        "phantom": _is_phantom(source),
        "splits": [
            (r.get("split"), r.get("images"), r.get("patients"), r.get("no_finding_images"))
            for r in _rows(data.get("splits"))
        ],
        "positives_header": ["finding", *positives],
        "positives_rows": [(f, *(positives[s].get(f, 0) for s in positives)) for f in FINDINGS]
        if positives
        else [],
        "n_images": metrics.get("n_images", "n/a"),
        "n_test_patients": metrics.get("n_test_patients", "n/a"),
        "confidence_pct": int(_float(boot.get("confidence"), 0.95) * 100),
        "n_resamples": boot.get("n_resamples", "n/a"),
        "macro_rows": [
            (label, MdSafe(fmt_ci(macro.get(key), macro_ci.get(key)))) for label, key in MACRO_KEYS
        ],
        "all_negative_acc": _mapping(metrics.get("all_negative")).get("accuracy"),
        "finding_rows": _finding_rows(m, min_positives),
        "min_positives": min_positives,
        "rare_rule": rare.get("rule", "n/a"),
        "rare_findings": ", ".join(sorted(str(f) for f in rare_list)) or "n/a",
        "long_tail_rows": [
            (
                g.get("group"),
                str(g.get("findings", "")).replace("|", ", "),
                _ci(g, "auroc", "auroc_ci_low", "auroc_ci_high"),
                _map_ci(g),
                _ci(g, "balanced_accuracy", *_BALANCED_CI),
            )
            for g in _rows(m.get("long_tail"))
        ],
        **_calibration_context(m),
        "underdiagnosis_rows": [
            (
                r.get("attribute"),
                r.get("subgroup"),
                r.get("sick_images"),
                r.get("sick_patients"),
                _cell(
                    fmt_ci(r.get("underdiagnosis_rate"), [r.get("ci_low"), r.get("ci_high")])
                    + ("" if r.get("reliable") is True else " †"),
                    r.get("underdiagnosis_rate"),
                    r.get("ci_low"),
                    r.get("ci_high"),
                ),
                _ci(r, "gap", "gap_ci_low", "gap_ci_high"),
            )
            for r in _rows(m.get("underdiagnosis"))
        ],
        "subgroup_rows": [
            (
                r.get("attribute"),
                r.get("subgroup"),
                r.get("n_images"),
                r.get("n_patients"),
                _ci(r, "auroc", "ci_low", "ci_high"),
            )
            for r in _rows(m.get("subgroups"))
        ],
        "threshold_split": m.get("threshold_split", "val"),
        "threshold_method": m.get("threshold_method", "n/a"),
        "citations": [MdSafe(c) for c in CITATIONS],
    }


def _map_ci(group: Mapping[str, Any]) -> Any:
    """A long-tail group's mAP with its interval (`auprc*` in bundles before issue 20)."""
    from rare_cxr.evaluation.longtail import group_field

    values = [group_field(group, c) for c in ("mAP", "mAP_ci_low", "mAP_ci_high")]
    return _cell(fmt_ci(values[0], values[1:]), *values)


def _calibration_context(m: Mapping[str, Any]) -> dict[str, Any]:
    """Per finding: threshold, temperature, the threshold on the calibrated scale and the test
    ECE raw and calibrated (bundles without calibration: thresholds only)."""
    from rare_cxr.evaluation.calibration import apply_temperature

    thresholds = _mapping(m.get("thresholds"))
    calibration = _mapping(m.get("calibration"))
    temperatures = _mapping(calibration.get("temperatures"))
    ece = _mapping(calibration.get("test_ece"))
    loss = _mapping(_mapping(_mapping(m.get("training")).get("train_params")).get("loss"))
    rows = []
    for f in FINDINGS:
        t, temp = thresholds.get(f), temperatures.get(f)
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (t, temp))
        on_calibrated = float(apply_temperature(float(t), float(temp))) if numeric else None
        if isinstance(t, int | float) and temp is None and calibration:
            on_calibrated = t  # no temperature: the calibrated score is the raw one
        raw, cal = (_mapping(ece.get(f)).get(k) for k in ("raw", "calibrated"))
        rows.append(
            (
                f,
                _cell(fmt_number(t, 4), t),
                _cell(fmt_number(temp, 3), temp) if calibration else MdSafe("n/a"),
                _cell(fmt_number(on_calibrated, 4), on_calibrated),
                _cell(fmt_number(raw, 3), raw),
                _cell(fmt_number(cal, 3), cal),
            )
        )
    macro = _mapping(ece.get("macro"))
    return {
        "calibrated": bool(calibration),
        "calibration_split": calibration.get("split", "val"),
        "calibration_bins": f"{calibration.get('n_bins', 'n/a')} "
        f"{str(calibration.get('binning', '')).replace('_', '-')}",
        "ece_macro_raw": macro.get("raw"),
        "ece_macro_calibrated": macro.get("calibrated"),
        "balanced_weights": bool(loss.get("balanced")),
        "threshold_rows": rows,
    }


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def card_markdown(metadata: Mapping[str, Any]) -> str:
    """The model card of a bundle (its `metadata`), as GitHub-flavoured Markdown rendered from
    `templates/model_card.md.j2`: every value from the metadata is escaped Markdown text."""
    return render("model_card.md.j2", **card_context(metadata))


def card_html(markdown: str, demote: int = 0) -> str:
    """The card's Markdown as an HTML fragment (raw HTML in the text is escaped, not run);
    `demote` lowers every heading by that many levels, to nest the card in a page."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("js-default").render(markdown)
    for level in range(6, 0, -1) if demote else ():
        new = min(level + demote, 6)
        html = html.replace(f"<h{level}>", f"<h{new}>").replace(f"</h{level}>", f"</h{new}>")
    return html
