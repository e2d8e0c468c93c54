"""The long-tail methods compared with the paper's balanced BCE in one command (issue 20 item 5):
`kedro run --env longtail --pipelines phantom_study`, as docs/results.md shows it, at tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_PHANTOM_RUN, cli_params, latest_version

from rare_cxr.evaluation import method_comparison

pytestmark = pytest.mark.slow

ENV_CONF = Path(__file__).resolve().parents[1] / "conf" / "longtail"
COMMAND = "kedro run --env longtail --pipelines phantom_study"


def _methods() -> list[str]:
    blocks = yaml.safe_load((ENV_CONF / "parameters_baselines.yml").read_text())
    return [name for name, block in blocks.items() if block]


def _tiny(models: list[str]) -> str:
    """--params that shrink the run (every model's pyramid to 16 + 32 px, one epoch)."""
    return cli_params(
        {
            **TINY_PHANTOM_RUN,
            "phantom.n_patients": 24,
            "training.loss.drw_start_epoch": 0,  # below the one epoch: LDAM-DRW's re-weighting
            **{f"{m}.model.scales": "[16,32]" for m in ["multiscale_resnet", *models]},
        }
    )


def test_docs_show_the_command():
    assert COMMAND in (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()


def test_one_command_trains_every_method_and_pairs_each_with_balanced_bce(kedro_project):
    methods = _methods()
    assert {"ms_class_balanced", "ms_asl", "ms_logit_adjusted", "ms_ldam_drw", "ms_crt"} <= set(
        methods
    )
    done = kedro_project.cli(*COMMAND.split()[1:], "--params", _tiny(methods), timeout=1500)
    reports = kedro_project.data("08_reporting", env="longtail")
    table = pd.read_csv(latest_version(reports / "method_comparison.csv"))
    # every method against the balanced BCE, on the four metrics, and nothing else
    assert set(table["model"]) == set(methods), done.stderr[-3000:]
    assert set(table["reference"]) == {"multiscale_resnet"}
    assert len(table) == len(methods) * len(method_comparison.COMPARED)
    assert set(table["metric"]) == {"mAP", "AUROC", "ECE"}
    defined = table[table["findings"] == "all"]
    assert defined["delta"].notna().all() and defined["p_value"].between(0, 1).all()
    # the base configuration's baselines are not in this environment
    table1 = pd.read_csv(latest_version(reports / "table1.csv"))
    assert set(table1["Model"]) == {"multiscale_resnet", *methods}
    # each method really trained with its own loss or stage (the checkpoint records both)
    expected = {m: ("bce", 0) for m in ("multiscale_resnet", "ms_crt")}
    expected.update({m: (m.removeprefix("ms_"), 0) for m in methods if m != "ms_crt"})
    expected["ms_crt"] = ("bce", 2)
    for model, (loss, crt_epochs) in expected.items():
        folder = kedro_project.data("06_models", model, "checkpoint.pt", env="longtail")
        train = torch.load(latest_version(folder), weights_only=True)["metadata"]["train_params"]
        assert (train["loss"]["name"], train["crt"]["epochs"]) == (loss, crt_epochs), model
    metrics_all = json.loads(latest_version(reports / "metrics_all.json").read_text())
    assert set(metrics_all) == {"multiscale_resnet", *methods}
    html = latest_version(reports / "report.html").read_text()
    assert "Long-tail methods: each model against its reference" in html
    # the default environment's folder was not touched
    assert not any(kedro_project.data("08_reporting").iterdir())
