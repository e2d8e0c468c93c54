"""report.html in a real browser: the answer first, and nothing wider than the page.

The report is rendered from hand-made predictions with many models, long model names, a long
unbreakable data source and every optional section, then opened in headless Chromium at a
desktop and a narrow width with every `<details>` unfolded. A script added to a copy of the
page writes the document's scroll width, its client width and the elements that stick out
into the DOM, which `--dump-dom` returns. Wide tables must scroll inside their own box
(`.wide`, `overflow-x:auto`), never widen the page.

Chromium comes from the distribution (`scripts/ensure_chromium.sh`, run by `make test`);
without it the browser test skips, saying so (and fails when CI=true), like tests/test_viz.py.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from test_metrics import make_frames
from test_viz import find_browser

from rare_cxr.evaluation import figures
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting import nodes

PARAMS = {
    "bootstrap": {"n_resamples": 20, "seed": 1},
    "data_source": "/mnt/" + "a-very-long-folder-name-without-any-break" * 8,
}
MODELS = ("multiscale_resnet", "resnet_single_scale_with_a_rather_long_name", "c", "d", "e")

MEASURE = """
<script>
window.addEventListener('load', () => {
  document.querySelectorAll('details').forEach((d) => { d.open = true; });
  const root = document.documentElement;
  const limit = root.clientWidth;
  const inScroller = (el) => {
    for (let p = el.parentElement; p; p = p.parentElement) {
      const overflow = getComputedStyle(p).overflowX;
      if (overflow === 'auto' || overflow === 'scroll') return true;
    }
    return false;
  };
  const out = [];
  document.querySelectorAll('body *').forEach((el) => {
    if (el.getBoundingClientRect().right > limit + 1 && !inScroller(el)) {
      out.push(el.tagName + '.' + el.className + ': ' + (el.textContent || '').slice(0, 60));
    }
  });
  const result = document.createElement('pre');
  result.id = 'layout-result';
  result.textContent = JSON.stringify({
    scrollWidth: root.scrollWidth, clientWidth: limit, outside: out.slice(0, 20),
    details: document.querySelectorAll('details').length,
  });
  document.body.appendChild(result);
});
</script>
"""


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="module")
def report_html() -> str:
    """A report with every section: five models, a paired comparison, long tail, calibration,
    underdiagnosis, the model cards and a figure."""
    preds, labels = make_frames()
    labels["sex"] = ["F" if int(p) % 2 else "M" for p in labels["patient_id"]]
    labels["age"] = [(int(p) * 7) % 90 for p in labels["patient_id"]]
    labels["view"] = "PA"
    splits = labels[["image_id", "patient_id"]].assign(split="test")
    splits.loc[: len(splits) // 3, "split"] = "train"
    lineage = {"model": "a", "checkpoint_version": "2026-01-01T00.00.00.000Z"}
    thresholds = nodes.select_thresholds(preds, labels, lineage, PARAMS)
    m = nodes.evaluate_model(preds, labels, thresholds, PARAMS)
    cost = {"params": 11_000_000, "gflops": 1.8, "img_per_s": 120.0}
    all_metrics = nodes.combine_metrics(
        **{f"{name}__metrics": m for name in MODELS}, **{f"{name}__cost": cost for name in MODELS}
    )
    table1, _ = nodes.build_table1(all_metrics)
    rare = nodes.select_rare_findings(labels, splits, PARAMS)
    summary = nodes.summarise_data(labels, splits, "", PARAMS)
    long_tail = nodes.long_tail_metrics(preds, labels, splits, thresholds, PARAMS)
    long_table, long_findings = nodes.build_long_tail_tables(
        **{f"{name}__long_tail": long_tail for name in MODELS[:2]}
    )
    paired = nodes.paired_comparison(
        labels,
        PARAMS,
        pairs=[(MODELS[0], MODELS[1])],
        **{f"{name}__predictions": preds for name in MODELS[:2]},
        **{f"{name}__thresholds": thresholds for name in MODELS[:2]},
    )
    calibration = nodes.calibration_metrics(preds, labels, PARAMS)
    under = nodes.underdiagnosis_metrics(preds, labels, thresholds, PARAMS)
    checkpoint = {
        "state_dict": {"fc.weight": torch.zeros(14, 2)},
        "metadata": {
            "model_spec": {"name": "a", "architecture": "multiscale_resnet", "scales": [8]},
            "findings": list(FINDINGS),
            "normalisation": {"mean": 0.5, "std": 0.25},
            "input_size": 8,
            "checkpoint_version": lineage["checkpoint_version"],
        },
    }
    _, card = nodes.build_model_bundle(
        checkpoint=checkpoint,
        lineage=lineage,
        thresholds=thresholds,
        metrics=m,
        long_tail=long_tail,
        subgroups=nodes.subgroup_metrics(preds, labels, PARAMS),
        data_summary=summary,
        rare_findings=rare,
        reporting=PARAMS,
        calibration=calibration,
        underdiagnosis=under,
    )
    return nodes.render_report(
        all_metrics=all_metrics,
        table1=table1,
        per_finding_auroc=nodes.build_per_finding_auroc(all_metrics),
        rare_findings_table=nodes.build_rare_findings_table(all_metrics, rare, PARAMS),
        rare_findings=rare,
        data_summary=summary,
        reporting=PARAMS,
        paired_comparison=paired,
        long_tail=long_table,
        long_tail_findings=long_findings,
        calibration=nodes.build_calibration_table(a__calibration=calibration),
        underdiagnosis=nodes.build_underdiagnosis_table(a__underdiagnosis=under),
        per_finding_auroc_figure=_png(figures.auroc_intervals({"a": m})),
        **{f"{name}__model_card": card for name in MODELS[:2]},
    )


def test_report_opens_with_its_answer(report_html):
    """The summary comes before Table 1: the paired macro ΔAUROC with its interval and p,
    each model's macro AUROC, and the warnings."""
    summary = report_html[report_html.index("<h2>Summary</h2>") : report_html.index("Table 1")]
    assert report_html.index("<h2>Summary</h2>") < report_html.index("<h1>") + 200
    answer = re.search(
        r"multiscale_resnet − resnet_single_scale_with_a_rather_long_name</b>: paired macro "
        r"ΔAUROC ([+-]\d\.\d{3}) \[(-?\d\.\d{3}), (-?\d\.\d{3})\], (p = \d\.\d{3}|p < 0\.001)",
        summary,
    )
    assert answer, summary[:1500]
    assert float(answer[2]) <= float(answer[1]) <= float(answer[3])
    for name in MODELS:
        assert f"<td>{name}</td>" in summary
    assert "Unreliable findings" in summary and "Hernia (0)" in summary  # no test positive


def test_report_folds_detail_sections_and_wraps_every_table(report_html):
    """Detail sections are `<details>`; every report table sits in a scrolling box (a model
    card's own tables scroll through `.card table`)."""
    assert report_html.count("<details") >= 8
    outside_cards = re.sub(r"<div class='card'>.*?</details>", "", report_html, flags=re.S)
    tables = outside_cards.count("<table")
    assert tables >= 8 and tables == outside_cards.count("<div class='wide'><table")
    assert ".wide{overflow-x:auto" in report_html and ".card table{display:block" in report_html


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280, 800])
def test_nothing_in_the_report_overflows_the_page(report_html, tmp_path, width):
    browser = find_browser()
    page = tmp_path / "report.html"
    page.write_text(report_html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    result = _measure(browser, page, tmp_path / "profile", width)
    assert result["details"] >= 8
    assert result["scrollWidth"] <= result["clientWidth"], result
    assert not result["outside"], result


def _measure(browser: str, page: Path, profile: Path, width: int) -> dict:
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=10000",
            f"--window-size={width},2000",
            f"--user-data-dir={profile}",
            "--dump-dom",
            page.as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"chromium failed: {done.stderr[-2000:]}"
    found = re.search(r"<pre id=\"layout-result\">(.*?)</pre>", done.stdout, flags=re.S)
    assert found, f"the measuring script did not run; DOM tail: {done.stdout[-1000:]}"
    return json.loads(html.unescape(found[1]))
