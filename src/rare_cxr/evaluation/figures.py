"""Report figures, built as `matplotlib.figure.Figure` objects (no pyplot state, no display).

Each function takes plain data (histories, labels/scores, metric dicts) and returns one Figure,
so the reporting nodes only choose inputs and the catalog decides where PNGs go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import precision_recall_curve, roc_curve

from rare_cxr.findings import FINDINGS

GRID = (4, 4)


def _note(ax: Any, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=8,
        color="0.4",
        wrap=True,
    )


def validation_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """The paper's Figure 2: validation ACC and macro AUROC against epoch, every model."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, col, title in zip(
        axes,
        ("val_acc", "val_macro_auroc"),
        ("Validation ACC (macro)", "Validation AUROC (macro)"),
        strict=True,
    ):
        for model, h in histories.items():
            if col in h and len(h):
                ax.plot(h["epoch"], h[col], marker="o", ms=3, label=model)
        ax.set(title=title, xlabel="epoch", ylabel=col)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return fig


def training_loss_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Training (solid) and validation (dashed) loss per epoch: over/under-fitting at a glance."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for i, (model, h) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        if "train_loss" in h:
            ax.plot(h["epoch"], h["train_loss"], color=colour, label=f"{model} train")
        if "val_loss" in h:
            ax.plot(h["epoch"], h["val_loss"], color=colour, ls="--", label=f"{model} val")
    ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _curve_grid(y_true: np.ndarray, scores: Mapping[str, np.ndarray], kind: str) -> Figure:
    # Fixed spacing, not constrained layout: 16 panels x 6 models made layout the slow part.
    fig = Figure(figsize=(14, 13))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.93, hspace=0.35, wspace=0.25)
    axes = fig.subplots(*GRID).ravel()
    for i, f in enumerate(FINDINGS):
        ax = axes[i]
        y = y_true[:, i]
        pos = int(y.sum())
        if pos == 0 or pos == len(y):
            _note(ax, f"{f}: undefined\n({pos} positives of {len(y)} test images)")
        else:
            for model, s in scores.items():
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(y, s[:, i])
                    ax.plot(fpr, tpr, lw=1, label=model)
                else:
                    p, r, _ = precision_recall_curve(y, s[:, i])
                    ax.plot(r, p, lw=1, label=model)
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
            else:
                ax.axhline(pos / len(y), color="0.7", lw=0.8, ls=":")
        ax.set_title(f"{f} (n+={pos})", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.tick_params(labelsize=7)
    for ax in axes[len(FINDINGS) :]:
        ax.axis("off")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles, names, loc="center", fontsize=9)
    label = (
        "ROC (x: 1-specificity, y: recall); dotted = chance"
        if kind == "roc"
        else "Precision-recall (x: recall, y: precision); dotted = prevalence"
    )
    fig.suptitle(f"Test set, per finding — {label}")
    return fig


def roc_curves(y_true: np.ndarray, scores: Mapping[str, np.ndarray]) -> Figure:
    """ROC per finding, every model overlaid (test split)."""
    return _curve_grid(y_true, scores, "roc")


def pr_curves(y_true: np.ndarray, scores: Mapping[str, np.ndarray]) -> Figure:
    """Precision-recall per finding, every model overlaid (test split)."""
    return _curve_grid(y_true, scores, "pr")


def auroc_intervals(metrics: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Per-finding test AUROC with bootstrap interval bars, one marker per model."""
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax = fig.subplots()
    models = list(metrics)
    step = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        m = metrics[model]
        ys, xs, lo, hi = [], [], [], []
        for i, f in enumerate(FINDINGS):
            v = m["test"]["per_finding"][f]["auroc"]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            ci = m["intervals"]["per_finding"][f]["auroc"]
            ys.append(i + (j - (len(models) - 1) / 2) * step)
            xs.append(v)
            lo.append(v - (ci[0] if ci[0] is not None else v))
            hi.append((ci[1] if ci[1] is not None else v) - v)
        ax.errorbar(
            xs,
            ys,
            xerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)],
            fmt="o",
            ms=3,
            capsize=2,
            label=model,
        )
    ax.axvline(0.5, color="0.6", ls=":", lw=0.8)
    ax.set_yticks(range(len(FINDINGS)), FINDINGS)
    ax.invert_yaxis()
    ax.set(
        xlabel="test AUROC (95% patient-bootstrap interval)",
        xlim=(0, 1),
        title="Per-finding AUROC (missing marker = undefined: no positives in test)",
    )
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def reliability_diagram(
    y_true: np.ndarray, scores: Mapping[str, np.ndarray], n_bins: int = 10
) -> Figure:
    """Calibration pooled over findings: observed positive rate against mean predicted score.

    Balanced class weights in training push scores up for rare findings, so this plot tells a
    reader whether a probability can be read as one.
    """
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax, hx = fig.subplots(1, 2)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    y = y_true.ravel().astype(float)
    for model, s in scores.items():
        p = np.clip(s.ravel(), 0, 1)
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
        count = np.bincount(idx, minlength=n_bins)
        mean_p = np.bincount(idx, weights=p, minlength=n_bins)
        obs = np.bincount(idx, weights=y, minlength=n_bins)
        ok = count > 0
        ece = float(np.sum(np.abs(obs[ok] - mean_p[ok])) / max(len(p), 1))
        ax.plot(
            mean_p[ok] / count[ok],
            obs[ok] / count[ok],
            marker="o",
            ms=3,
            label=f"{model} (ECE {ece:.3f})",
        )
        hx.hist(p, bins=edges, histtype="step", label=model)
    ax.plot([0, 1], [0, 1], color="0.6", ls=":")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed positive rate",
        title="Reliability (test, all findings pooled)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=7)
    hx.set(yscale="log", xlabel="predicted probability", ylabel="count", title="Score histogram")
    return fig


def reliability_per_finding(
    y_true: np.ndarray,
    scores: Mapping[str, np.ndarray],
    temperatures: Mapping[str, Sequence[float | None]],
    findings: Sequence[str],
    *,
    n_bins: int = 15,
    binning: str = "equal_mass",
) -> Figure:
    """One reliability panel per finding in `findings` (the rare ones): observed positive rate
    against mean predicted probability in the ECE's bins, every model raw (solid) and after its
    validation temperatures (dashed), with each curve's test ECE in the legend.

    Why per finding: the pooled diagram is dominated by the common findings, and miscalibration
    is worst for the rare ones (their scores are pushed up by the class weights)."""
    from rare_cxr.evaluation import calibration

    columns = max(1, min(len(findings), 3))
    rows = max(1, math.ceil(len(findings) / columns))
    fig = Figure(figsize=(4.2 * columns, 3.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    if not findings:
        _note(axes[0], "no rare finding selected")
    for ax, finding in zip(axes, findings, strict=False):
        i = FINDINGS.index(finding)
        y = y_true[:, i]
        for k, (model, s) in enumerate(scores.items()):
            colour = f"C{k % 10}"
            t = temperatures.get(model, [None] * len(FINDINGS))[i]
            for label, p, style in (
                ("raw", s[:, i], "-o"),
                ("calibrated", calibration.apply_temperature(s[:, i], t), "--x"),
            ):
                curve = calibration.reliability_curve(y, p, n_bins, binning)
                ece = calibration.expected_calibration_error(y, p, n_bins, binning)
                ax.plot(
                    curve["mean_p"],
                    curve["observed"],
                    style,
                    color=colour,
                    ms=3,
                    lw=1,
                    label=f"{model} {label} (ECE {ece:.3f})",
                )
        ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability")
        ax.set_ylabel("observed positive rate")
        ax.set_title(f"{finding} (test positives: {int(y.sum())})", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes[len(findings) :]:
        ax.axis("off")
    how = "equal-mass" if binning == "equal_mass" else "equal-width"
    fig.suptitle(
        f"Reliability of the rare findings (test; {n_bins} {how} bins; dashed: temperature "
        "fitted on validation)",
        fontsize=10,
    )
    return fig


def gradcam_panel(model_name: str, rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Grad-CAM rows: radiograph (+ planted/annotated box when known), then one map per layer.

    Each row: `image [H, W]` uint8/float, `maps {name: [H, W]}`, `box (x, y, w, h)` or None in
    image pixels, `title` str.
    """
    if not rows:
        fig = Figure(figsize=(6, 2), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        _note(
            ax,
            f"{model_name}: no true positive of a rare finding in the test split "
            "at the validation threshold — nothing to explain.",
        )
        return fig
    n_maps = max(len(r["maps"]) for r in rows)
    fig = Figure(figsize=(3 * (n_maps + 1), 3 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), n_maps + 1, squeeze=False))
    for r, row in enumerate(rows):
        img = np.asarray(row["image"], dtype=float)
        ax = axes[r, 0]
        ax.imshow(img, cmap="gray")
        box = row.get("box")
        if box is not None:
            ax.add_patch(Rectangle(box[:2], box[2], box[3], fill=False, ec="lime", lw=1.5))
        ax.set_title(
            row["title"] + ("\nbox: BBox_List_2017" if box is not None else ""), fontsize=8
        )
        for c, (name, cam) in enumerate(row["maps"].items(), start=1):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray")
            ax.imshow(np.asarray(cam), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if box is not None:
                ax.add_patch(Rectangle(box[:2], box[2], box[3], fill=False, ec="lime", lw=1))
            ax.set_title(f"Grad-CAM {name}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{model_name}: Grad-CAM on true positives of rare findings (test)")
    return fig


def seed_spread(all_metrics: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Each model's macro test AUROC and balanced accuracy, one dot per training seed.

    Why: a difference between two models is only worth reading if it is larger than what a
    different seed does to the same model; this figure shows that spread next to the means.
    """
    panels = (("auroc", "macro AUROC (test)"), ("balanced_accuracy", "macro balanced ACC (test)"))
    models = list(all_metrics)
    fig = Figure(figsize=(max(6.0, 1.6 * len(models) + 3), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for x, model in enumerate(models):
            per_seed = all_metrics[model].get("per_seed") or {}
            values = [
                float(v["macro"][key])
                for v in per_seed.values()
                if v["macro"].get(key) is not None and math.isfinite(float(v["macro"][key]))
            ]
            if values:
                jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
                ax.scatter(x + np.asarray(jitter), values, s=22, zorder=3)
                ax.hlines(np.mean(values), x - 0.25, x + 0.25, color="k", lw=1.5, zorder=4)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
    n = max((len(all_metrics[m].get("per_seed") or {}) for m in models), default=0)
    fig.suptitle(
        f"spread over training seeds (dots: seeds, bar: mean; up to {n} seeds)", fontsize=9
    )
    return fig


def paired_forest(table: pd.DataFrame) -> Figure:
    """Forest plot of `paired_comparison.csv`: each comparison's Δ (model − reference) with its
    UNADJUSTED 95% interval, macro rows on top. One rule for bars and fill: a marker is filled
    when its interval excludes 0 -- both without a multiplicity correction (no Holm-consistent
    interval exists to draw; a Bonferroni bar beside a Holm fill would disagree again). Holm
    is shown apart: `*` after a finding whose `p_holm` < 0.05. Rows with `reliable` False are
    grey and hollow, whatever their interval, with † after the name. The dotted line is "no
    difference"."""
    pairs = list(dict.fromkeys(zip(table["model"], table["reference"], strict=True)))
    if not pairs:
        fig = Figure(figsize=(6, 2), layout="constrained")
        _note(fig.subplots(), "no comparison: the multi-scale model and a reference are needed")
        return fig
    rows_per = max(len(table[(table["model"] == m) & (table["reference"] == r)]) for m, r in pairs)
    fig = Figure(figsize=(5.2 * len(pairs), 0.28 * rows_per + 1.9), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (model, reference) in zip(axes, pairs, strict=True):
        part = table[(table["model"] == model) & (table["reference"] == reference)]
        ypos = np.arange(len(part))[::-1]
        labels = []
        for y, r in zip(ypos, part.to_dict(orient="records"), strict=True):
            labels.append(_forest_label(r))
            style = forest_style(r)
            if style is None:
                continue
            if math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"]):
                ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=style["bar"], lw=1)
            ax.plot(r["delta"], y, "o", ms=5, mfc=style["face"], mec=style["edge"])
        ax.axvline(0, color="0.5", ls=":", lw=1)
        ax.set_yticks(ypos, labels, fontsize=7)
        ax.set_title(f"{model} − {reference}")
        ax.set_xlabel(
            "Δ (model − reference), unadjusted 95% CI\n"
            "filled: excludes 0 · *: p_holm < 0.05 · grey †: unreliable",
            fontsize=8,
        )
        ax.grid(alpha=0.3, axis="x")
    return fig


def _forest_label(r: Mapping[str, Any]) -> str:
    if r["finding"] == "macro":
        return "macro " + str(r["metric"]).upper()
    holm = r.get("p_holm")
    star = " *" if holm is not None and math.isfinite(holm) and holm < 0.05 else ""
    dagger = "" if bool(r.get("reliable", True)) else " †"
    return f"{r['finding']} AUROC{star}{dagger}"


def forest_style(r: Mapping[str, Any]) -> dict[str, str] | None:
    """Colours of one forest row: None when Δ is undefined (nothing drawn); grey and hollow
    when the row is unreliable; otherwise filled red when its (unadjusted) interval excludes
    0, hollow red when not. Bars and fill follow the same interval, by construction."""
    if not math.isfinite(r["delta"]):
        return None
    if not bool(r.get("reliable", True)):
        return {"bar": "0.7", "face": "white", "edge": "0.6"}
    low, high = r["ci_low"], r["ci_high"]
    excludes = math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0)
    return {"bar": "0.3", "face": "C3" if excludes else "white", "edge": "C3"}
