"""Each configuration environment keeps its own data: an `--env nih` run of the whole study (six
models, on a download without the optional BBox_List_2017.csv) completes with every report
output, one model can be retrained alone, and a following default run changes none of the nih
files. All through the real `kedro` command line, as the README and the NIH guide show it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rare_cxr.models.roster import roster_from_parameters
from rare_cxr.ownership import PHANTOM_MARKER
from rare_cxr.pipeline_registry import project_parameters
from rare_cxr.pipelines.reporting.pipeline import FIGURES

# the models conf/nih configures (six), in report order
ALL_MODELS = roster_from_parameters(
    project_parameters(Path(__file__).resolve().parents[1], env="nih")
).models

pytestmark = pytest.mark.slow

TINY_BASE = {
    "phantom.n_patients": 24,
    "phantom.image_size": 64,
    "image_cache.size": 32,
    "image_cache.workers": 1,
    "augmentation_preview.scales": [16, 32],
    "multiscale_resnet.model.scales": [16, 32],
    "training.epochs": 1,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.progress_bar": False,
    "reporting.bootstrap.n_resamples": 20,
    "reporting.cost.batch_size": 2,
    "reporting.cost.n_batches": 1,
}


# README.md, "Parameters can be changed without editing files"
README_EXAMPLE = "training.epochs=3,multiscale_resnet.model.scales=[32,64,128]"


def readme_run_yml() -> str:
    """The `run.yml` block of the README."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```yaml\nrun:") + len("```yaml\n")
    return readme[start : readme.index("```", start)]


def test_readme_shows_the_tested_params_example() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f'kedro run --params "{README_EXAMPLE}"' in readme


def nih_smoke_config(data_root: Path) -> dict:
    """The user guide's `run.yml` (conf/nih on CPU, tiny models, no downloads), verbatim but for
    `data_root`."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide-nih.md").read_text()
    start = guide.index("```yaml\nrun:\n  env: nih") + len("```yaml\n")
    config = yaml.safe_load(guide[start : guide.index("```", start)])
    assert config["run"]["params"]["data_root"] == "/data/nih"
    config["run"]["params"]["data_root"] = str(data_root)
    return config


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
        for name in ("metrics.json", "thresholds.json", "cost.json", "gradcam.png", "lineage.json")
    ),
]


def one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert found, f"missing report output {pattern}"
    return found[-1]


def check_full_report(reports: Path) -> str:
    """Every table and figure of the report, versioned, listing all six models."""
    for pattern in REPORT_FILES:
        assert one(reports, pattern).stat().st_size > 0, pattern
    table1 = pd.read_csv(one(reports, "table1.csv/*/table1.csv"))
    assert list(table1["Model"]) == list(ALL_MODELS)
    for column in ("ACC", "Recall", "Precision", "F1", "AUROC", "AUPRC", "params", "GFLOPs"):
        assert column in table1
    per_finding = pd.read_csv(one(reports, "per_finding_auroc.csv/*/per_finding_auroc.csv"))
    assert len(per_finding) == len(ALL_MODELS)
    metrics_all = json.loads(one(reports, "metrics_all.json/*/metrics_all.json").read_text())
    assert set(metrics_all) == set(ALL_MODELS)
    assert metrics_all["multiscale_resnet"]["cost"]["scales"] == [16, 32]
    html = one(reports, "report.html/*/report.html").read_text()
    # every figure the run wrote (each one versioned folder under figures/) and one Grad-CAM per
    # model, embedded: counted from the run, so a new figure needs no edit here
    figures = {p.name for p in (reports / "figures").iterdir() if p.suffix == ".png"}
    assert {"paired_forest.png", "reliability_rare.png"} <= figures, figures
    assert len(figures) == len(FIGURES), (figures, FIGURES)  # every figure dataset of the pipeline
    assert html.count("data:image/png;base64,") == len(figures) + len(ALL_MODELS)
    for section in ("Paired comparison", "Long tail", "Subgroups", "Expert labels", "Sources"):
        assert section in html, section
    assert "Localisation on every boxed test image" not in html  # no boxes in this download
    for model in ALL_MODELS:
        assert model in html
    return html


def check_numbers_against_sklearn(data: Path, reports: Path) -> None:
    """Table 1 and metrics_all.json recomputed from predictions.parquet with scikit-learn."""
    from sklearn.metrics import f1_score, roc_auc_score

    from rare_cxr.findings import FINDINGS

    metrics_all = json.loads(one(reports, "metrics_all.json/*/metrics_all.json").read_text())
    table1 = pd.read_csv(one(reports, "table1.csv/*/table1.csv")).set_index("Model")
    labels = pd.read_parquet(data / "02_intermediate" / "labels.parquet").set_index("image_id")
    for model in ALL_MODELS:
        predictions = pd.read_parquet(
            one(data / "07_model_output" / model, "predictions.parquet/*/predictions.parquet")
        )
        test = predictions[
            (predictions["split"] == "test") & (predictions["seed"] == predictions["seed"].iloc[0])
        ]
        truth = labels.loc[test["image_id"], list(FINDINGS)]
        thresholds = json.loads(
            one(reports / model, "thresholds.json/*/thresholds.json").read_text()
        )
        per = metrics_all[model]["metrics"]["test"]["per_finding"]
        aurocs = []
        for f in FINDINGS:
            y, score = truth[f].to_numpy(), test[f].to_numpy()
            if 0 < y.sum() < len(y):
                aurocs.append(roc_auc_score(y, score))
                assert per[f]["auroc"] == pytest.approx(aurocs[-1]), (model, f)
            t = thresholds["thresholds"][f]
            if t is not None and y.sum() > 0:
                assert per[f]["f1"] == pytest.approx(f1_score(y, score >= t)), (model, f)
        macro = metrics_all[model]["metrics"]["test"]["macro"]["auroc"]
        assert macro == pytest.approx(sum(aurocs) / len(aurocs))
        assert table1.loc[model, "AUROC"].startswith(f"{macro:.3f}")


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "d"
        for p in sorted(root.rglob("*"))
    }


def test_nih_run_without_boxes_completes_and_survives_a_default_run(kedro_project, tmp_path):
    project = kedro_project
    project.write_local_params(TINY_BASE)
    # a "download": the phantom's files in the NIH layout, without BBox_List_2017.csv
    project.run("phantom")  # in-process: the CLI is exercised by the runs below
    download = tmp_path / "nih_download"
    shutil.copytree(project.data("01_raw", "phantom"), download)
    (download / "BBox_List_2017.csv").unlink()
    (download / PHANTOM_MARKER).unlink()
    download_before = digest_tree(download)

    config = tmp_path / "run.yml"
    config.write_text(yaml.safe_dump(nih_smoke_config(download)))
    project.cli("run", "--config", str(config))

    nih = project.path / "data" / "nih"
    reports = nih / "08_reporting"
    html = check_full_report(reports)
    check_numbers_against_sklearn(nih, reports)
    assert "BBox_List_2017.csv" in html and "drawn without boxes" in html
    (summary,) = reports.glob("data_summary.json/*/data_summary.json")
    assert json.loads(summary.read_text())["bounding_boxes"]["present"] is False
    assert digest_tree(download) == download_before  # the download is only ever read

    # One model alone, with its evaluation (docs/user-guide-nih.md): `--namespaces` selects
    # its nodes from every model's pipeline; a new densenet121 checkpoint, vgg16 untouched.
    checkpoints = project.data("06_models", "densenet121", "checkpoint.pt", env="nih")
    vgg = project.data("06_models", "vgg16", "checkpoint.pt", env="nih")
    before, vgg_before = len(list(checkpoints.iterdir())), len(list(vgg.iterdir()))
    done = project.cli("run", "--config", str(config), "--namespaces", "densenet121")
    # unchanged configuration: the finished training is reused (and evaluated again)
    assert "densenet121: training already finished" in done.stdout + done.stderr
    assert len(list(checkpoints.iterdir())) == before + 1  # a new version, the old one kept
    assert len(list(vgg.iterdir())) == vgg_before

    # The README's example with a list-valued parameter, verbatim, in the default environment
    # (conf/local keeps the phantom tiny; the cache must hold the largest scale).
    nih_before = digest_tree(nih)
    project.write_local_params({**TINY_BASE, "image_cache.size": 128})
    project.cli("run", "--params", README_EXAMPLE)
    assert digest_tree(nih) == nih_before  # byte for byte
    base = project.data("06_models", "multiscale_resnet", "checkpoint.pt")
    (checkpoint,) = base.glob("*/checkpoint.pt")
    meta = torch.load(checkpoint, weights_only=True)["metadata"]
    assert meta["scales"] == [32, 64, 128] and meta["train_params"]["epochs"] == 3

    # The README's `kedro run --config run.yml` example, verbatim.
    readme_config = tmp_path / "readme_run.yml"
    readme_config.write_text(readme_run_yml())
    project.cli("run", "--config", str(readme_config))
    newest = sorted(base.glob("*/checkpoint.pt"))[-1]
    meta = torch.load(newest, weights_only=True)["metadata"]
    assert meta["model_spec"]["fusion"] == "attention" and meta["scales"] == [32, 64, 128]

    # README / docs/inference.md: new images through the bundle the default run's report wrote
    from test_inference import check_inference_on_trained_model

    check_inference_on_trained_model(project, tmp_path)
