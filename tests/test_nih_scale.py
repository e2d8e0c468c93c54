"""The NIH-size rehearsal's machinery (issue 19) at a tiny size: bench/nih_scale.py runs the real
`kedro run --env rehearsal --pipelines phantom,nih` (then `--pipelines reporting`, the selection
without training) with the node-statistics hook on, and writes a table with a row per node,
output sizes and slopes into the doc. The sizes are conf/rehearsal's with tiny overrides; no
timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, make_project

pytestmark = pytest.mark.slow

# conf/rehearsal made tiny: ~30 patients (fractions of NIH's 30,805), small batches and bootstrap
TINY_REHEARSAL = ",".join(
    [
        "training.batch_size=8",
        "training.eval_batch_size=32",
        "training.progress_bar=false",
        "image_cache.workers=1",
        "reporting.bootstrap.n_resamples=20",
        "reporting.cost.batch_size=2",
        "reporting.cost.n_batches=1",
        "tracking.enabled=false",
    ]
)


def nih_scale(project: Path, results: Path, doc: Path, *args: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "bench" / "nih_scale.py"),
            "--project",
            str(project),
            "--results-dir",
            str(results),
            "--doc",
            str(doc),
            "--params",
            TINY_REHEARSAL,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"},
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def nodes(results: Path, label: str) -> list[dict]:
    lines = (results / f"nodes-{label}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_rehearsal_benchmark_records_every_node_and_writes_the_doc(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    results, doc = tmp_path / "results", tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n<!-- BEGIN HAND-WRITTEN: kept verbatim by bench/run_all.py -->\n"
        "notes\n<!-- END HAND-WRITTEN -->\n"
    )
    # two sizes: ~31 and ~62 patients, the whole nih composition with the phantom
    nih_scale(project.path, results, doc, "--fractions", "0.001,0.002")

    records = nodes(results, "0.002")
    run = [r for r in records if r["kind"] == "run"]
    assert [r["event"] for r in run] == ["start", "end"] and run[1]["status"] == "finished"
    ran = [r for r in records if r["kind"] == "node"]
    assert len(ran) == run[0]["nodes"]  # a record for every node of the run
    models = {r["namespace"] for r in ran if r["namespace"]}
    assert {"multiscale_resnet", "vgg16", "inception_v3"} <= models  # all six models ran
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in ran)
    outputs = {name: size for r in ran for name, size in r["outputs"].items()}
    # report.html is versioned: the size recorded is that of this run's version
    html = sorted((project.path / "data/rehearsal/08_reporting/report.html").glob("*/report.html"))
    assert outputs["report_html"] == html[-1].stat().st_size
    meta = json.loads((results / "meta-0.002.json").read_text())
    assert meta["n_patients"] == 62 and meta["films"] >= 62

    text = doc.read_text()
    section = text.split("<!-- BEGIN NIH-SCALE")[1].split("<!-- END NIH-SCALE -->")[0]
    assert text.index("<!-- END NIH-SCALE -->") < text.index("<!-- END HAND-WRITTEN -->")
    assert "notes" in text  # the hand-written part is kept
    per_node = section.split("<summary>Per node")[1].split("</details>")[0]
    for record in ran:  # a row per node, with both sizes' seconds and a slope
        row = next(
            line for line in per_node.splitlines() if line.startswith(f"| {record['node']} |")
        )
        assert len(row.split("|")) == 2 + 1 + 2 + 4
    assert "| report_html |" in section and "### Targets" in section

    # reporting alone on the trained models (the selection without training): the section is
    # rewritten in place, not appended
    nih_scale(
        project.path, results / "reporting", doc, "--fractions", "0.002", "--pipelines", "reporting"
    )
    reported = [r for r in nodes(results / "reporting", "0.002") if r["kind"] == "node"]
    assert reported and all(".pipelines.reporting" in r["module"] for r in reported)
    assert doc.read_text().count("<!-- BEGIN NIH-SCALE") == 1
