"""inference_report.html: one self-contained page a radiologist can browse.

Per predicted image: a thumbnail of exactly what the model saw, its top findings with
probabilities (positive decisions marked, with the threshold), and the Grad-CAM overlays of
the positive decisions (one per scale for the multi-scale model). Then every file that was not
predicted, with its reason; then the model card. Self-contained like report.html (inline CSS,
`data:` images) so it can be mailed or attached as it is.

The page is the template `templates/inference_report.html.j2` (autoescaped: a file name or a
bundle value is text, never markup); this module only gathers the data it shows.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from rare_cxr.evaluation.report_html import STYLE, png_data_uri
from rare_cxr.findings import FINDINGS
from rare_cxr.inference.bundle import bundle_thresholds
from rare_cxr.inference.images import STATUSES, InputFile, read_for_model, scan_folder
from rare_cxr.inference.model_card import NOT_FOR_CLINICAL_USE, card_html, card_markdown
from rare_cxr.inference.predict import CALIBRATED_SUFFIX, DECISION_SUFFIX, row_overlays
from rare_cxr.inference.templating import render

EXTRA_STYLE = """
.img{display:flex;gap:1em;align-items:flex-start;border-top:1px solid #ddd;padding:.6em 0}
.img img{margin:0}.cams{display:flex;flex-wrap:wrap;gap:.4em}.cams figure{margin:0}
.cams figcaption{font-size:.75em;text-align:center}.pos{font-weight:700;color:#b00}
.flag{background:#fde2e2;padding:0 .4em;border-radius:3px;font-size:.8em}
"""


def _png(pixels: np.ndarray, side: int) -> str:
    image = Image.fromarray(pixels)
    if max(image.size) > side:
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())


def _text(value: Any) -> str:
    """A CSV cell as text: empty for a missing value, integers without a decimal point."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bytes(value: Any) -> bytes:
    return value() if callable(value) else value


def _order(table: pd.DataFrame) -> pd.DataFrame:
    """Predicted images with a positive decision first (highest probability first), then the
    others by their highest probability: what a reader should look at first."""
    ok = table[table["status"] == "ok"].copy()
    if not len(ok):
        return ok
    ok["_top"] = ok[list(FINDINGS)].max(axis=1)
    ok["_pos"] = ok["positive_findings"].map(_text).str.len() > 0
    return ok.sort_values(["_pos", "_top"], ascending=[False, False], kind="mergesort")


def input_files(input_root: str, paths: pd.Series) -> dict[Any, InputFile]:
    """The file behind each predictions row (by index), found by scanning the input folder as
    the prediction did: a row's `path` is the printable name, which for a name that is not
    UTF-8 is not the file system's; the k-th row of a path is the k-th file scanned with it.
    Rows whose file is gone are left out; a folder that is gone gives no file at all."""
    try:
        scanned = scan_folder(input_root)
    except OSError:
        return {}
    by_path: dict[str, list[InputFile]] = {}
    for entry in scanned:
        by_path.setdefault(entry.relpath, []).append(entry)
    seen: dict[str, int] = {}
    out = {}
    for index, path in paths.items():
        k = seen[path] = seen.get(path, -1) + 1
        if k < len(by_path.get(path, ())):
            out[index] = by_path[path][k]
    return out


def _findings(row: Mapping[str, Any], thresholds: Mapping[str, float], top: int) -> list[dict]:
    """The `top` most probable findings of a row, with threshold and decision."""
    out = []
    for f in sorted(FINDINGS, key=lambda f: -float(row[f]))[:top]:
        decided = row.get(f + DECISION_SUFFIX)
        calibrated = row.get(f + CALIBRATED_SUFFIX)
        out.append(
            {
                "name": f,
                "probability": float(row[f]),
                "calibrated": None
                if calibrated is None or pd.isna(calibrated)
                else float(calibrated),
                "threshold": None if math.isnan(thresholds[f]) else thresholds[f],
                "positive": decided is not pd.NA and not pd.isna(decided) and int(decided) == 1,
            }
        )
    return out


def _cams(row: Mapping[str, Any], overlays: Mapping[str, Any]) -> list[dict]:
    """The row's overlays, in the order of its positive findings."""
    order = {f: i for i, f in enumerate(_text(row["positive_findings"]).split("|"))}
    out = []
    for name, value in row_overlays(overlays, row).items():
        finding, layer = name.removesuffix(".png").split("__")[1:3]
        out.append({"name": name, "finding": finding, "layer": layer, "value": value})
    out.sort(key=lambda c: (order.get(c["finding"], 99), c["name"]))
    return [{**c, "uri": png_data_uri(_bytes(c.pop("value")))} for c in out]


def _image(
    row: Mapping[str, Any], entry: InputFile | None, context: Mapping[str, Any]
) -> dict[str, Any]:
    """One predicted image's block: its thumbnail (the file read again), findings, overlays."""
    cfg, size = context["cfg"], context["size"]
    entry = entry or InputFile(str(row["path"]), "", "missing", "no longer there")
    thumb = read_for_model(entry, size, cfg["max_image_pixels"], cfg["dicom"]["without_voi"])
    side = int(cfg["report"]["thumbnail_size"])
    return {
        "path": _text(row["path"]),
        "flags": [flag for flag in _text(row.get("flags")).split("|") if flag],
        "thumbnail": _png(thumb.pixels, side) if thumb.pixels is not None else None,
        "unreadable": thumb.reason,
        "image_id": _text(row["image_id"]),
        "format": _text(row["format"]),
        "width": _text(row["width"]),
        "height": _text(row["height"]),
        "findings": _findings(row, context["thresholds"], int(cfg["report"]["top_findings"])),
        "cams": _cams(row, context["overlays"]),
    }


def render_inference_report(
    *,
    predictions: pd.DataFrame,
    overlays: Mapping[str, Any],
    bundle: Mapping[str, Any],
    cfg: Mapping[str, Any],
    input_root: str,
) -> str:
    """The HTML text (see the module doc). `overlays` values are PNG bytes or callables
    returning them (a lazily loaded folder)."""
    meta = bundle["metadata"]
    shown = _order(predictions)
    n_predicted = len(shown)
    shown = shown.head(int(cfg["report"]["max_images"]))
    files = input_files(input_root, predictions["path"]) if len(shown) else {}
    context = {
        "cfg": cfg,
        "size": int(meta["input_size"]),
        "thresholds": bundle_thresholds(bundle),
        "overlays": overlays,
    }
    counts = predictions["status"].value_counts() if len(predictions) else pd.Series()
    skipped = predictions[predictions["status"] != "ok"] if len(predictions) else predictions
    return render(
        "inference_report.html.j2",
        style=STYLE + EXTRA_STYLE,
        warning_html=card_html(NOT_FOR_CLINICAL_USE),
        model=str(meta["model"]),
        input_root=input_root,
        bundle_version=str(meta.get("bundle_version", "unversioned")),
        n_files=len(predictions),
        statuses=[
            {"status": s, "files": int(counts[s]), "meaning": STATUSES.get(s, "")}
            for s in counts.index
        ],
        n_lateral=int(predictions["flags"].map(_text).str.contains("lateral-view").sum())
        if len(predictions)
        else 0,
        n_predicted=n_predicted,
        input_size=context["size"],
        thumbnail_size=int(cfg["report"]["thumbnail_size"]),
        images=[_image(row, files.get(i), context) for i, row in shown.iterrows()],
        skipped=[
            {"path": _text(r["path"]), "status": _text(r["status"]), "reason": _text(r["reason"])}
            for _, r in skipped.iterrows()
        ],
        card_html=card_html(card_markdown(meta), demote=1),
        settings=json.dumps(
            {k: v for k, v in cfg.items() if k != "onnx"}, indent=2, sort_keys=True, default=str
        ),
    )
