"""Models come from configuration alone (conf/nih):

* after a first run that trained only the multi-scale model, the `reporting` pipeline holds
  that model alone (it used to hold all six and die with "densenet121.checkpoint: Did not find
  any versions");
* a new model is one parameter block (a second multi-scale ResNet with three scales, in a file
  of its own in conf/nih): no code, no catalog entry. The `baselines` pipeline filtered to its
  namespace trains it, and `kedro run --env nih --pipelines reporting`, through the real
  `kedro` command line, reports exactly the two trained models, the new one paired against the
  main model.

The preparatory runs are in-process (each `kedro` process costs ~8 s of start-up here); the
tiny nih setup is tests/test_environments.py's (the user guide's smoke `run.yml`)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import yaml
from test_environments import TINY_BASE, nih_smoke_config, one

from rare_cxr.ownership import PHANTOM_MARKER

pytestmark = pytest.mark.slow

NEW = "multiscale_resnet_3scales"
NEW_BLOCK = {
    NEW: {
        # no role and no reference: a baseline, paired against the main model
        "model": {
            "name": NEW,
            "architecture": "multiscale_resnet",
            "backbone": "resnet18",
            "scales": [8, 16, 32],
            "pretrained": "none",
        }
    }
}


def reporting_nodes(project, params: dict) -> set[str]:
    """The node namespaces of the `reporting` pipeline Kedro registers for a `--env nih` run."""
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession

    with KedroSession.create(project_path=project.path, env="nih", runtime_params=params) as s:
        s.load_context()  # the project hook hands the context to the registry
        return {node.namespace for node in pipelines["reporting"].nodes} - {None}


def test_reporting_covers_the_trained_models_and_a_model_added_by_a_parameter_block(
    kedro_project, tmp_path
):
    project = kedro_project
    project.write_local_params(TINY_BASE)
    project.run("phantom")  # in-process: a tiny "download" in the NIH layout
    download = tmp_path / "nih_download"
    shutil.copytree(project.data("01_raw", "phantom"), download)
    (download / PHANTOM_MARKER).unlink()
    (download / "BBox_List_2017.csv").unlink()  # no localisation: not what this test is about
    config = nih_smoke_config(download)
    del config["run"]["pipelines"]  # chosen per command below
    params = config["run"]["params"]
    # neither are experiment tracking and Grad-CAM examples (time: this test runs 3 pipelines)
    params["tracking"] = {"enabled": False}
    params["reporting"]["gradcam"] = {"examples_per_finding": 0}
    run_yml = tmp_path / "run.yml"
    run_yml.write_text(yaml.safe_dump(config))

    # The first GPU run trains the main model only (in-process: a precondition here).
    project.run(
        env="nih", params=params, pipeline_names=["data_processing", "augmentation", "training"]
    )
    assert reporting_nodes(project, params) == {"multiscale_resnet"}  # not all six

    # A new model: one parameter block, nothing else; trained by its namespace.
    (project.path / "conf" / "nih" / "parameters_my_model.yml").write_text(
        yaml.safe_dump(NEW_BLOCK)
    )
    # = kedro run --env nih --pipelines baselines --namespaces multiscale_resnet_3scales
    project.run(env="nih", params=params, pipeline_names=["baselines"], namespaces=[NEW])
    checkpoint = one(project.data("06_models", NEW, env="nih"), "checkpoint.pt/*/checkpoint.pt")
    meta = torch.load(checkpoint, weights_only=True)["metadata"]
    assert meta["model_spec"]["name"] == NEW and meta["scales"] == [8, 16, 32]
    assert not project.data("06_models", "densenet121", env="nih").exists()  # only NEW trained

    # The report covers exactly the trained models, not the five untrained baselines.
    project.cli("run", "--config", str(run_yml), "--pipelines", "reporting")
    reports = project.path / "data" / "nih" / "08_reporting"
    table1 = pd.read_csv(one(reports, "table1.csv/*/table1.csv"))
    assert list(table1["Model"]) == ["multiscale_resnet", NEW]
    metrics_all = json.loads(one(reports, "metrics_all.json/*/metrics_all.json").read_text())
    assert metrics_all[NEW]["cost"]["scales"] == [8, 16, 32]
    paired = pd.read_csv(one(reports, "paired_comparison.csv/*/paired_comparison.csv"))
    assert set(zip(paired["model"], paired["reference"], strict=True)) == {
        (NEW, "multiscale_resnet")
    }
    assert one(reports / NEW, "metrics.json/*/metrics.json").stat().st_size
    assert NEW in one(reports, "report.html/*/report.html").read_text()
