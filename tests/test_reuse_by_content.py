"""Reuse is keyed on content, not on location (docs/architecture.md, "Data safety").

Through the real `kedro` command line: after a complete default run, the raw data is moved,
copied without its modification times, and test-time flipping is turned on. None of these may
retrain a model: GPU-days at NIH's size. Moving keeps the image cache; copying rebuilds it (new
file dates) and still reuses every training, because a training is keyed on the checksums of
the pixels it saw, which a faithful copy reproduces.
"""

from __future__ import annotations

import shutil
import subprocess

import pandas as pd
import pytest

from rare_cxr.image_cache import ImageCache

pytestmark = pytest.mark.slow

TINY = {
    "phantom.n_patients": 24,
    "phantom.image_size": 64,
    "image_cache.size": 32,
    "image_cache.workers": 1,
    "augmentation_preview.scales": [16, 32],
    "multiscale_resnet.model.scales": [16, 32],
    "resnet_single_scale.model.scales": [32],
    "training.epochs": 1,
    "training.batch_size": 16,
    "training.device": "cpu",
    "training.progress_bar": False,
    "reporting.bootstrap.n_resamples": 10,
    "reporting.cost.batch_size": 2,
    "reporting.cost.n_batches": 1,
}
MODELS = ("multiscale_resnet", "resnet_single_scale")
ONE_THREAD = {"RARE_CXR_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _log(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def _assert_nothing_trained(log: str) -> None:
    for model in MODELS:
        assert f"{model}: training already finished for this configuration" in log, log[-4000:]
        assert f"{model} epoch" not in log  # not one epoch trained


def _latest_predictions(project, model: str) -> pd.DataFrame:
    folder = project.data("07_model_output", model, "predictions.parquet")
    return pd.read_parquet(sorted(folder.iterdir())[-1] / "predictions.parquet")


def test_moved_copied_download_and_tta_retrain_nothing(kedro_project, tmp_path):
    project = kedro_project
    project.write_local_params(TINY)
    first = project.cli("run", env=ONE_THREAD)
    assert all(f"{m} epoch 1 " in _log(first) for m in MODELS)
    cache = ImageCache(project.data("05_model_input", "image_cache"))
    content, built = cache.fingerprint, cache.meta["created"]
    before = {m: _latest_predictions(project, m) for m in MODELS}

    # 1. the download moved (mtimes kept): the cache itself is reused, and every model
    moved = tmp_path / "moved" / "phantom"
    moved.parent.mkdir()
    shutil.move(project.data("01_raw", "phantom"), moved)
    run = project.cli("run", "--params", f"data_root={moved}", env=ONE_THREAD)
    _assert_nothing_trained(_log(run))
    assert "is up to date" in _log(run)
    assert ImageCache(project.data("05_model_input", "image_cache")).meta["created"] == built

    # 2. copied without modification times (`cp -r`): the cache is rebuilt, no model retrained
    copied = tmp_path / "copied" / "phantom"
    shutil.copytree(moved, copied, copy_function=shutil.copyfile)  # contents only, new mtimes
    run = project.cli("run", "--params", f"data_root={copied}", env=ONE_THREAD)
    log = _log(run)
    assert "decoding again" in log
    _assert_nothing_trained(log)
    rebuilt = ImageCache(project.data("05_model_input", "image_cache"))
    assert rebuilt.meta["created"] != built or rebuilt.meta["decoded_images"] > 0
    assert rebuilt.fingerprint == content  # same pixels, same content fingerprint
    for model in MODELS:  # the reused checkpoints predict exactly as before
        after = _latest_predictions(project, model)
        pd.testing.assert_frame_equal(
            after.drop(columns=["checkpoint_version"]),
            before[model].drop(columns=["checkpoint_version"]),
        )

    # 3. test-time flipping on: predictions change, training does not
    run = project.cli(
        "run", "--params", f"data_root={copied},training.tta_hflip=true", env=ONE_THREAD
    )
    _assert_nothing_trained(_log(run))
    for model in MODELS:
        after = _latest_predictions(project, model)
        assert not after.equals(before[model])
        assert (after["training_id"] == before[model]["training_id"]).all()
