"""Parameter validation: pydantic models for every block (Kedro's typed parameters), unknown keys
rejected at every level, errors that name the full key path, every environment valid, and a
bad value stopping a run when its context is created -- before any node, whatever the pipeline."""

from __future__ import annotations

import pytest

from rare_cxr.configuration import BLOCKS, block_model, validate_parameters
from rare_cxr.models.factory import ModelSpec
from rare_cxr.models.roster import roster_from_parameters
from rare_cxr.parameters import ParameterError
from rare_cxr.pipeline_registry import project_parameters
from rare_cxr.training.config import TrainingParams

SIX = (
    "multiscale_resnet",
    "resnet_single_scale",
    "vgg16",
    "inception_v3",
    "densenet121",
    "efficientnet_b0",
)


@pytest.mark.parametrize("env", [None, "nih"])
def test_every_environment_validates_in_full(kedro_project, env):
    """conf/base (+ an empty conf/local) and conf/nih, every block and every model namespace,
    loaded by Kedro's OmegaConfigLoader with the project's settings."""
    params = project_parameters(kedro_project.path, env=env)
    checked = validate_parameters(params)
    for name in BLOCKS:
        if name in params:  # blocks of other pipelines are optional
            assert isinstance(checked[name], block_model(name)), name
    assert {"phantom", "data_processing", "training", "reporting", "augmentation"} <= set(checked)
    roster = checked["models"]
    assert roster.models == SIX and roster.main == "multiscale_resnet"
    assert roster.pairs(roster.models)[0] == ("multiscale_resnet", "resnet_single_scale")
    assert ("densenet121", "multiscale_resnet") in roster.pairs(roster.models)
    # nih's blocks merge softly over base: its literature sizes, base's roles
    size = 448 if env == "nih" else 128
    assert checked["image_cache"].size == size
    assert params["multiscale_resnet"]["role"] == "main"


def test_kedro_builds_a_model_for_every_parameter_a_node_reads(kedro_project):
    """Kedro's own typed-parameter validation (kedro.validation) finds a pydantic model for every
    `params:` input of every registered node, namespaced model blocks included, and the nodes
    receive the validated instances."""
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.validation import TypeExtractor

    with KedroSession.create(project_path=kedro_project.path) as session:
        params = session.load_context().params
    assert isinstance(params["training"], TrainingParams)
    assert isinstance(params["densenet121"]["model"], ModelSpec)
    assert params["vgg16"]["model"].training.optimizer.lr == pytest.approx(1e-4)

    registered = dict(pipelines)
    read = {
        name.removeprefix("params:")
        for pipeline in registered.values()
        for node in pipeline.nodes
        for name in node.inputs
        if name.startswith("params:")
    }
    typed = TypeExtractor(registered).extract_types_from_pipelines()
    assert read and read <= set(typed), f"untyped parameter inputs: {sorted(read - set(typed))}"
    assert typed["training"] is TrainingParams
    assert {typed[f"{m}.model"] for m in SIX} == {ModelSpec}


# every line names its key; the data_processing run below reads none of these blocks
BAD = {
    "densenet121.model.scales": [],
    "vgg16.model.training.optimizer.lr": 0,
    "densenet121.rol": "main",
    "training.batch_size": True,
    "reporting.gradcam.devcie": "cuda",  # the example: silently ignored before
    "reporting.models": ["resnet9"],
    "phantom.n_patient": 5,
}
EXPECTED = [
    "densenet121.model.scales: expected at least 1 item(s), got []",
    "vgg16.model.training.optimizer.lr: expected a value > 0.0, got 0",
    "densenet121.rol: unknown key (did you mean 'role'?); known keys: model, reference, role",
    "training.batch_size: expected an integer, got True",
    "reporting.gradcam.devcie: unknown key (did you mean 'device'?)",
    "reporting.models: unknown model(s) ['resnet9']",
    "phantom.n_patient: unknown key (did you mean 'n_patients'?)",
]


def test_bad_parameters_stop_the_run_before_any_node_each_named(kedro_project):
    kedro_project.write_local_params(BAD)
    with pytest.raises(ParameterError) as error:
        kedro_project.run("data_processing")
    message = str(error.value)
    for expected in EXPECTED:
        assert expected in message, (expected, message)
    data = kedro_project.data()
    assert not list(data.rglob("*.parquet")) and not (data / "runs").exists()


def test_every_problem_is_listed_in_one_error():
    bad = {
        "training": {"epochs": 0, "optimizer": {"lr": "fast"}},
        "augmentation": {"rotation_degrees": 400},
        "m1": {"role": "main", "model": {"name": "m1", "architecture": "vgg16", "scales": [64]}},
        "m2": {"role": "main", "model": {"name": "m2", "architecture": "vgg16", "scales": [64]}},
        "m3": {"reference": "m9", "model": {"name": "other", "architecture": "vgg16"}},
    }
    with pytest.raises(ParameterError) as error:
        validate_parameters(bad)
    lines = str(error.value).splitlines()
    assert lines[0] == "invalid parameters:"
    assert set(lines[1:]) == {
        "training.epochs: expected a value >= 1, got 0",
        "training.optimizer.lr: expected a number, got 'fast'",
        "augmentation.rotation_degrees: expected a value <= 180.0, got 400",
        "m3.model.name: must be 'm3', the block's own name (the namespace of its nodes, "
        "catalog entries and training state), got 'other'",
        "models: exactly one model block needs `role: main` (the study's model, trained by the "
        "`training` pipeline and compared with the others), found ['m1', 'm2']",
        "m3.reference: unknown model 'm9'; configured: ['m1', 'm2', 'm3']",
    }


def test_model_overrides_are_checked_once_merged_over_the_shared_block():
    blocks = {
        "training": {"batch_size": 12},
        "m": {
            "role": "main",
            "model": {
                "name": "m",
                "architecture": "vgg16",
                "scales": [64],
                # alone, 3 micro-batches of 32 do not divide; merged over 12 they do
                "training": {"accumulation_steps": 3},
            },
        },
    }
    assert roster_from_parameters(blocks).models == ("m",)
    blocks["training"]["batch_size"] = 8
    with pytest.raises(
        ParameterError,
        match=r"m\.model\.training merged over the shared block: training\.accumulation_steps: "
        r"3 must divide training\.batch_size \(8\)",
    ):
        roster_from_parameters(blocks)


def test_kedro_run_prints_the_problems_without_a_traceback(kedro_project):
    """The project's `kedro run` command (rare_cxr.cli, run in-process by click's runner):
    a configuration mistake is reported as its keys, exit status 1, nothing run."""
    from click.testing import CliRunner

    from rare_cxr.cli import cli

    result = CliRunner().invoke(cli, ["run", "--params", "reporting.gradcam.devcie=cuda"])
    assert result.exit_code == 1
    assert (
        "Error: invalid parameters:\n"
        "reporting.gradcam.devcie: unknown key (did you mean 'device'?)" in result.output
    )
    assert "Traceback" not in result.output and "ParameterError" not in result.output
    assert not (kedro_project.data() / "runs").exists()
