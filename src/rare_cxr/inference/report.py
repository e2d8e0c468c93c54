"""inference_report.html: one self-contained page a radiologist can browse.

Per predicted image: a thumbnail of exactly what the model saw, its top findings with
probabilities (positive decisions marked, with the threshold), and the Grad-CAM overlays of
the positive decisions (one per scale for the multi-scale model). Then every file that was not
predicted, with its reason; then the model card. Self-contained like report.html (inline CSS,
`data:` images) so it can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
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
from rare_cxr.inference.predict import DECISION_SUFFIX, row_overlays

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


def _order(table: pd.DataFrame) -> pd.DataFrame:
    """Predicted images with a positive decision first (highest probability first), then the
    others by their highest probability: what a reader should look at first."""
    ok = table[table["status"] == "ok"].copy()
    if not len(ok):
        return ok
    ok["_top"] = ok[list(FINDINGS)].max(axis=1)
    ok["_pos"] = ok["positive_findings"].map(_text).str.len() > 0
    return ok.sort_values(["_pos", "_top"], ascending=[False, False], kind="mergesort")


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
    e = html.escape
    meta = bundle["metadata"]
    thresholds = bundle_thresholds(bundle)
    report = cfg["report"]
    size = int(meta["input_size"])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>rare-cxr inference — {e(str(meta['model']))}</title>",
        f"<style>{STYLE}{EXTRA_STYLE}</style></head><body>",
        f"<h1>Inference — {e(str(meta['model']))}</h1>",
        f"<div class='warn'>{card_html(NOT_FOR_CLINICAL_USE)}</div>",
        f"<p>Input folder: <code>{e(input_root)}</code>. Model bundle version "
        f"<code>{e(str(meta.get('bundle_version', 'unversioned')))}</code>; decisions at the "
        "validation-tuned thresholds of the bundle. Probabilities are per finding and "
        "independent (several findings can be positive).</p>",
    ]
    if not len(predictions):
        parts.append(
            "<p class='warn'><b>The input folder holds no files</b>: nothing was predicted, "
            "and predictions.csv has a header only.</p>"
        )
    else:
        counts = predictions["status"].value_counts()
        status_rows = pd.DataFrame(
            [
                {"status": s, "files": int(counts[s]), "meaning": STATUSES.get(s, "")}
                for s in counts.index
            ]
        )
        parts.append("<h2>Files</h2>")
        parts.append(status_rows.to_html(index=False, border=0, escape=True))
        lateral = predictions["flags"].map(_text).str.contains("lateral-view")
        if lateral.any():
            parts.append(
                f"<p class='warn'>{int(lateral.sum())} lateral view(s) (DICOM ViewPosition): "
                "predicted, but the model was trained on frontal films only — treat their "
                "probabilities as unreliable.</p>"
            )
    shown = _order(predictions)
    limit = int(report["max_images"])
    if len(shown) > limit:
        parts.append(
            f"<p>The {limit} images below come first by decision and probability; all "
            f"{len(shown)} predicted images are in predictions.csv "
            "(inference.report.max_images).</p>"
        )
        shown = shown.head(limit)
    if len(shown):
        parts.append("<h2>Predicted images</h2>")
    files = input_files(input_root, predictions["path"]) if len(shown) else {}
    for index, row in shown.iterrows():
        # the file predicted, re-read for its thumbnail (found as the scan found it)
        entry = files.get(index) or InputFile(str(row["path"]), "", "missing", "no longer there")
        thumb = read_for_model(entry, size, cfg["max_image_pixels"], cfg["dicom"]["without_voi"])
        top = sorted(FINDINGS, key=lambda f: -float(row[f]))[: int(report["top_findings"])]
        items = []
        for f in top:
            t = thresholds[f]
            decided = row.get(f + DECISION_SUFFIX)
            positive = decided is not pd.NA and not pd.isna(decided) and int(decided) == 1
            t_text = "no threshold" if math.isnan(t) else f"threshold {t:.3f}"
            cls = " class='pos'" if positive else ""
            items.append(
                f"<li{cls}>{e(f)}: {float(row[f]):.3f} ({t_text})"
                f"{' — positive' if positive else ''}</li>"
            )
        flags = "".join(
            f" <span class='flag'>{e(flag)}</span>"
            for flag in _text(row.get("flags")).split("|")
            if flag
        )
        img = (
            f"<img alt='input' width='{report['thumbnail_size']}' "
            f"src='{_png(thumb.pixels, int(report['thumbnail_size']))}'>"
            if thumb.pixels is not None
            else f"<p class='warn'>file no longer readable: {e(thumb.reason)}</p>"
        )
        cams = []
        order = {f: i for i, f in enumerate(_text(row["positive_findings"]).split("|"))}
        mine = row_overlays(overlays, row)
        for key in sorted(mine, key=lambda k: (order.get(k.split("__")[1], 99), k)):
            value = mine[key]
            finding, layer = key.removesuffix(".png").split("__")[1:3]
            b64 = base64.b64encode(_bytes(value)).decode("ascii")
            cams.append(
                f"<figure><img alt='{e(key)}' width='{report['thumbnail_size']}' "
                f"src='data:image/png;base64,{b64}'><figcaption>{e(finding)} · "
                f"{e(layer)}</figcaption></figure>"
            )
        parts.append(
            f"<div class='img'><div>{img}</div><div><b>{e(str(row['path']))}</b>{flags}<br>"
            f"<small>id {e(_text(row['image_id']))} · {e(_text(row['format']))} · "
            f"{_text(row['width'])} x {_text(row['height'])} px; the model's input "
            f"({size} px) on the left</small><ol>{''.join(items)}</ol>"
            f"<div class='cams'>{''.join(cams)}</div></div></div>"
        )
    skipped = predictions[predictions["status"] != "ok"] if len(predictions) else predictions
    if len(skipped):
        parts.append("<h2>Files not predicted</h2>")
        parts.append(
            skipped[["path", "status", "reason"]].to_html(index=False, border=0, escape=True)
        )
    parts.append(card_html(card_markdown(meta), demote=1))
    settings = {k: v for k, v in cfg.items() if k != "onnx"}
    parts.append("<h2>Run parameters</h2><pre>")
    parts.append(e(json.dumps(settings, indent=2, sort_keys=True, default=str)))
    parts.append("</pre></body></html>")
    return "\n".join(parts)
