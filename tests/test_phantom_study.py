"""The phantom study of the ablation pair (issue 18 item 8): `kedro run --env phantom_study
--pipelines phantom_study`, as docs/results.md shows it, at tiny size; and its size, which the
power calculation of docs/results.md fixes."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_PHANTOM_RUN, cli_params, latest_version

from rare_cxr.configuration import validate_parameters
from rare_cxr.evaluation import lesion_size, power
from rare_cxr.pipeline_registry import project_parameters

ROOT = Path(__file__).resolve().parents[1]
ENV_CONF = ROOT / "conf" / "phantom_study"
COMMAND = "kedro run --env phantom_study --pipelines phantom_study"
PAIR = ("multiscale_resnet", "resnet_single_scale")


def _tiny() -> str:
    """--params that shrink the run (both pyramids to 16 + 32 px / 32 px, one epoch); the
    environment's own n_seeds (3) is kept."""
    return cli_params(
        {
            **TINY_PHANTOM_RUN,
            "phantom.n_patients": 40,
            "multiscale_resnet.model.scales": "[16,32]",
            "resnet_single_scale.model.scales": "[32]",
        }
    )


def test_docs_show_the_command():
    assert COMMAND in (ROOT / "docs" / "results.md").read_text()


def test_size_is_the_power_calculation_s():
    """n_patients = the test patients docs/results.md's calculation asks for / test_fraction."""
    phantom = yaml.safe_load((ENV_CONF / "parameters_phantom.yml").read_text())["phantom"]
    need = power.required_units(0.03, power.se_from_interval(-0.070, 0.080), 33)
    fraction = phantom["test_fraction"]
    assert phantom["n_patients"] == 10 * math.ceil(need / fraction / 10)
    assert round(phantom["n_patients"] * fraction) >= need == 422


def test_environment_validates_to_the_pair_with_three_seeds(kedro_project):
    """conf/phantom_study merged over conf/base: valid, only the ablation pair, 3 seeds."""
    params = project_parameters(kedro_project.path, env="phantom_study")
    checked = validate_parameters(params)
    assert checked["models"].models == PAIR
    assert checked["models"].pairs(PAIR) == [PAIR]
    assert checked["training"].n_seeds == 3
    assert checked["phantom"].n_patients == 800 and checked["phantom"].test_fraction == 0.53
    # conf/base's budget and generator settings, unchanged
    base = validate_parameters(project_parameters(kedro_project.path))
    assert checked["training"].epochs == base["training"].epochs
    assert checked["phantom"].image_size == base["phantom"].image_size


@pytest.mark.slow
def test_one_command_trains_the_pair_with_three_seeds_and_splits_by_lesion_size(kedro_project):
    done = kedro_project.cli(*COMMAND.split()[1:], "--params", _tiny(), timeout=1500)
    reports = kedro_project.data("08_reporting", env="phantom_study")
    # only the ablation pair, three seeds each
    table1 = pd.read_csv(latest_version(reports / "table1.csv"))
    assert set(table1["Model"]) == set(PAIR), done.stderr[-3000:]
    assert (table1["Seeds"] == 3).all()
    paired = pd.read_csv(latest_version(reports / "paired_comparison.csv"))
    assert set(zip(paired["model"], paired["reference"], strict=True)) == {PAIR}
    assert (paired["seeds"] == 3).all()
    # ΔAUROC by planted lesion size: rows for the pair, localised findings only, bins from 1
    sizes = pd.read_csv(latest_version(reports / "lesion_size_delta.csv"))
    assert list(sizes.columns) == list(lesion_size.COLUMNS)
    assert len(sizes) > 0
    assert set(zip(sizes["model"], sizes["reference"], strict=True)) == {PAIR}
    assert set(sizes["finding"]) <= set(lesion_size.LOCALISED_FINDINGS)
    assert (sizes["seeds"] == 3).all() and (sizes["size_bin"] >= 1).all()
    assert (sizes["area_min"] <= sizes["area_max"]).all() and (sizes["positives"] >= 1).all()
    assert sizes["delta"].between(-1, 1).all()
    html = latest_version(reports / "report.html").read_text()
    assert "Paired comparison by planted lesion size" in html
    # the default environment's folder was not touched
    assert not any(kedro_project.data("08_reporting").iterdir())
