"""Study: the six models learn on the default phantom in seeds 42, 43 and 44 (issue 18 item 7).

Hours of CPU: marked `study`, which pyproject's addopts deselect (`make test` never runs it).
Run it alone, on a quiet machine: `pytest -m study tests/test_study_models.py` (docs/results.md,
"All six models, three seeds", has its figures and wall time).

It runs what a user types, through the real `kedro` command line, in a fresh copy of the
project: the default run with three seeds (the ablation pair) and `--pipelines baselines` with
three seeds (the other four, the single-scale model reused), then scores each model's test
predictions per seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rare_cxr.findings import FINDINGS
from rare_cxr.training.metrics import validation_metrics

MODELS = (
    "multiscale_resnet",
    "resnet_single_scale",
    "vgg16",
    "inception_v3",
    "densenet121",
    "efficientnet_b0",
)
SEEDS = (42, 43, 44)
THRESHOLD = 0.65  # issue 18 item 7: every model, every seed
STUDY_TIMEOUT_S = 6 * 3600


def scores_per_seed(data_dir: Path, model: str) -> dict[int, dict[str, float]]:
    """{seed: {"auroc": test macro AUROC, "spread": mean over findings of the probability sd
    across test films}} from the model's newest predictions and the labels table.

    The macro AUROC is the training loop's (the mean over findings with both classes in the
    split), so a constant output scores exactly 0.5 and a spread of 0 shows it.
    """
    versions = sorted((data_dir / "07_model_output" / model / "predictions.parquet").iterdir())
    predictions = pd.read_parquet(versions[-1] / "predictions.parquet")
    labels = pd.read_parquet(data_dir / "02_intermediate" / "labels.parquet")
    labels = labels.astype({"image_id": str}).set_index("image_id")
    out: dict[int, dict[str, float]] = {}
    test = predictions[predictions["split"] == "test"]
    for seed, part in test.groupby("seed"):
        truth = labels.loc[part["image_id"].astype(str), list(FINDINGS)].to_numpy(np.float32)
        probs = part[list(FINDINGS)].to_numpy(np.float32)
        out[int(seed)] = {
            "auroc": validation_metrics(probs, truth)["val_macro_auroc"],
            "spread": float(probs.std(axis=0).mean()),
        }
    return out


@pytest.mark.study
def test_six_models_learn_on_the_default_phantom_in_three_seeds(kedro_project):
    project = kedro_project
    seeds = "training.n_seeds=3"  # seeds 42, 43, 44 (training.seed is 42)
    project.cli("run", "--params", seeds, timeout=STUDY_TIMEOUT_S)
    project.cli("run", "--pipelines", "baselines", "--params", seeds, timeout=STUDY_TIMEOUT_S)

    data = project.path / "data" / "base"
    scores = {model: scores_per_seed(data, model) for model in MODELS}
    table = "\n".join(
        f"{model:20s} " + " ".join(f"{scores[model][s]['auroc']:.3f}" for s in SEEDS)
        for model in MODELS
    )
    for model in MODELS:
        assert sorted(scores[model]) == list(SEEDS), (model, table)
        for seed in SEEDS:
            # the default ablation pair must not collapse to a constant output either
            assert scores[model][seed]["spread"] > 1e-3, (model, seed, table)
            assert scores[model][seed]["auroc"] >= THRESHOLD, (model, seed, table)
