"""`kedro run --pipeline augmentation` through a real KedroSession on a tiny NIH-like folder.

The inputs (splits, image_index, labels) are written by the test and declared in the temporary
project's conf/local, so this stage is tested alone, as `kedro run --pipeline` runs it.
"""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from test_image_cache import expected_pixels, make_nih_like

from rare_cxr.image_cache import ImageCache

LOCAL_CATALOG = {
    name: {"type": "pandas.ParquetDataset", "filepath": f"data/base/{folder}/{name}.parquet"}
    for name, folder in (
        ("splits", "03_primary"),
        ("image_index", "02_intermediate"),
        ("labels", "02_intermediate"),
    )
}
LOCAL_PARAMS = {
    "image_cache": {"size": 32, "workers": 1},
    "augmentation_preview": {
        "split": "train",
        "index": 0,
        "draws": 4,
        "seed": 0,
        "scales": [16, 32],
    },
}


@pytest.mark.slow
def test_augmentation_pipeline_runs_and_reuses_cache(kedro_project, caplog) -> None:
    splits, image_index, labels = make_nih_like(kedro_project.data("01_raw", "tiny"))
    splits.to_parquet(kedro_project.data("03_primary", "splits.parquet"))
    image_index.to_parquet(kedro_project.data("02_intermediate", "image_index.parquet"))
    labels.to_parquet(kedro_project.data("02_intermediate", "labels.parquet"))
    local = kedro_project.path / "conf" / "local"
    (local / "catalog_inputs.yml").write_text(yaml.safe_dump(LOCAL_CATALOG))
    (local / "parameters_augmentation.yml").write_text(yaml.safe_dump(LOCAL_PARAMS))

    kedro_project.run(pipeline="augmentation")

    cache = ImageCache(kedro_project.data("05_model_input", "image_cache"))
    assert cache.size == 32
    assert cache.split_names == ["train", "val", "test"]
    train = cache.split("train")
    path = image_index.set_index("image_id").loc[train.image_ids[0], "path"]
    assert (train.images[0] == expected_pixels(path, 32)).all()
    assert set(cache.skipped["reason"]) == {"corrupt", "missing", "not-indexed"}

    policy = json.loads(
        kedro_project.data("05_model_input", "augmentation_policy.json").read_text()
    )
    assert policy["enabled"] is True and policy["hflip_probability"] == 0.0
    previews = list(kedro_project.data("08_reporting").glob("augmentation_preview.png/*/*.png"))
    assert len(previews) == 1 and previews[0].stat().st_size > 1000

    # a second run finds the cache up to date and decodes nothing
    inode = (cache.path / "train.npy").stat().st_ino
    with caplog.at_level(logging.INFO, logger="rare_cxr.image_cache"):
        kedro_project.run(pipeline="augmentation")
    assert "reusing it, no decoding" in caplog.text
    assert (cache.path / "train.npy").stat().st_ino == inode


def test_invalid_augmentation_parameter_fails_naming_the_key(kedro_project) -> None:
    local = kedro_project.path / "conf" / "local"
    (local / "parameters_augmentation.yml").write_text(
        yaml.safe_dump({"augmentation": {"enabled": True, "translate": 0.9}})
    )
    with pytest.raises(ValueError, match=r"augmentation\.translate"):
        kedro_project.run(pipeline="augmentation", node_names=["build_augmentation"])
