"""Per-model learning rates (docs/training.md, "Learning rate per model and environment").

A model's own `<model>.model.training.optimizer.lr` beats the shared `training.optimizer.lr`, so
conf/nih states every model's lr (a phantom-only value from conf/base must not reach NIH unseen),
and the documented way to change one model's lr is `--params <model>.model.training...`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rare_cxr.cli import split_params
from rare_cxr.pipelines.training.nodes import model_training_params

MODELS = (
    "multiscale_resnet",
    "resnet_single_scale",
    "vgg16",
    "inception_v3",
    "densenet121",
    "efficientnet_b0",
)


def cli_params(text: str) -> dict[str, Any]:
    """`--params TEXT` exactly as this project's `kedro run` parses it (`rare_cxr.cli`)."""
    return split_params(None, None, text)


def effective_lrs(env: str | None, params: str = "") -> dict[str, float]:
    """Each model's Adam lr after its overrides, as the training node computes it."""
    from kedro.framework.session import KedroSession

    runtime = cli_params(params) if params else {}
    with KedroSession.create(env=env, runtime_params=runtime) as session:
        loaded = session.load_context().params
    return {
        name: model_training_params(loaded[name]["model"], loaded["training"])[1].optimizer.lr
        for name in MODELS
    }


def test_learning_rate_per_model_and_environment(kedro_project):
    # the table in docs/training.md
    assert effective_lrs(None) == {**dict.fromkeys(MODELS, 1e-3), "vgg16": 1e-4}
    assert effective_lrs("nih") == dict.fromkeys(MODELS, 1e-4)


def test_nih_shared_lr_override_changes_no_model_and_a_models_own_override_changes_it(
    kedro_project,
):
    # `kedro run --env nih --params training.optimizer.lr=...` used to leave VGG16 at conf/base's
    # phantom 1e-4 without a word; now every NIH model states its lr, and the per-model key is
    # the documented override.
    shared = effective_lrs("nih", "training.optimizer.lr=0.002")
    assert shared == dict.fromkeys(MODELS, 1e-4)
    one = effective_lrs("nih", "training.optimizer.lr=0.002,vgg16.model.training.optimizer.lr=3e-5")
    assert one == {**dict.fromkeys(MODELS, 1e-4), "vgg16": 3e-5}


@pytest.mark.slow
def test_a_models_lr_from_the_command_line_reaches_its_training(kedro_project):
    """docs/training.md's command, through the real CLI, on a tiny phantom."""
    project = kedro_project
    project.write_local_params(
        {
            "phantom.n_patients": 24,
            "phantom.image_size": 64,
            "image_cache.size": 32,
            "image_cache.workers": 1,
            "augmentation_preview.scales": [16, 32],
            "vgg16.model.scales": [32],
            "training.epochs": 1,
            "training.batch_size": 16,
            "training.device": "cpu",
            "training.progress_bar": False,
        }
    )
    project.cli("run", "--pipelines", "phantom,data_processing,augmentation")
    project.cli(
        "run",
        "--pipelines",
        "baselines",
        "--namespaces",
        "vgg16",
        "--params",
        "vgg16.model.training.optimizer.lr=3e-5,training.optimizer.lr=0.002",
    )
    (checkpoint,) = project.data("06_models", "vgg16", "checkpoint.pt").glob("*/checkpoint.pt")
    meta = torch.load(checkpoint, weights_only=True)["metadata"]
    assert meta["train_params"]["optimizer"]["lr"] == 3e-5
