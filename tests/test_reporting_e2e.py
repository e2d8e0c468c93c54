"""End to end through Kedro's session: phantom -> ... -> baselines + training -> reporting.

Tiny everything (40 phantom patients, 32 px cache, one epoch, 20 bootstrap resamples), so the
six models train in about a minute on two CPU cores; what is checked is that every table and
figure of the report is produced, versioned, and lists all six models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from rare_cxr.pipelines.reporting import ALL_MODELS

TINY: dict[str, Any] = {
    "phantom.n_patients": 40,
    "phantom.image_size": 64,
    "image_cache.size": 32,
    "image_cache.workers": 1,
    "multiscale_resnet.model.scales": [16, 32],
    "resnet_single_scale.model.scales": [32],
    "vgg16.model.scales": [32],
    "densenet121.model.scales": [32],
    "efficientnet_b0.model.scales": [32],
    "training.epochs": 1,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.progress_bar": False,
    "reporting.bootstrap.n_resamples": 20,
    "reporting.cost.batch_size": 2,
    "reporting.cost.n_batches": 1,
}

REPORT_FILES = [
    "table1.csv/*/table1.csv",
    "table1.md/*/table1.md",
    "per_finding_auroc.csv/*/per_finding_auroc.csv",
    "rare_findings.csv/*/rare_findings.csv",
    "rare_findings.json/*/rare_findings.json",
    "metrics_all.json/*/metrics_all.json",
    "data_summary.json/*/data_summary.json",
    "report.html/*/report.html",
    *(
        f"figures/{name}.png/*/{name}.png"
        for name in (
            "figure2_validation_curves",
            "training_loss_curves",
            "per_finding_auroc",
            "roc_curves",
            "pr_curves",
            "reliability_diagram",
        )
    ),
    *(
        f"{model}/{name}/*/{name}"
        for model in ALL_MODELS
        for name in ("metrics.json", "thresholds.json", "cost.json", "gradcam.png")
    ),
]


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """`{"a.b": 1}` -> `{"a": {"b": 1}}`: what `kedro run --params a.b=1` hands the session."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert found, f"missing report output {pattern}"
    return found[-1]


@pytest.mark.slow
def test_baselines_and_reporting_end_to_end(kedro_project):
    params = nested(TINY)
    for stage in ("phantom", "data_processing", "augmentation", "training", "baselines"):
        kedro_project.run(stage, params=params)
    kedro_project.run("reporting", params=params)

    out = kedro_project.data("08_reporting")
    for pattern in REPORT_FILES:
        assert one(out, pattern).stat().st_size > 0, pattern

    table1 = pd.read_csv(one(out, "table1.csv/*/table1.csv"))
    assert list(table1["Model"]) == list(ALL_MODELS)
    for column in ("ACC", "Recall", "Precision", "F1", "AUROC", "AUPRC", "params", "GFLOPs"):
        assert column in table1
    per_finding = pd.read_csv(one(out, "per_finding_auroc.csv/*/per_finding_auroc.csv"))
    assert len(per_finding) == len(ALL_MODELS)
    metrics_all = json.loads(one(out, "metrics_all.json/*/metrics_all.json").read_text())
    assert set(metrics_all) == set(ALL_MODELS)
    assert metrics_all["multiscale_resnet"]["cost"]["scales"] == [16, 32]
    html = one(out, "report.html/*/report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 + len(ALL_MODELS)
    for model in ALL_MODELS:
        assert model in html

    # The issue's `kedro run --namespaces densenet121`, through Kedro's real CLI: the default
    # (demo) pipeline has no baselines, so rare_cxr.cli selects the namespace from all_models.
    # The tiny parameters go to conf/local, which soft-merges over conf/base like --params.
    (kedro_project.path / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(params))
    checkpoints = kedro_project.data("06_models", "densenet121", "checkpoint.pt")
    vgg_checkpoints = kedro_project.data("06_models", "vgg16", "checkpoint.pt")
    before, vgg_before = len(list(checkpoints.iterdir())), len(list(vgg_checkpoints.iterdir()))
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kedro")), "run", "--namespaces", "densenet121"],
        cwd=kedro_project.path,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "400"},  # no log wrap
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "selecting them from the 'all_models' pipeline" in log
    assert len(list(checkpoints.iterdir())) == before + 1  # a new version, the old one kept
    assert len(list(vgg_checkpoints.iterdir())) == vgg_before  # no other model ran
