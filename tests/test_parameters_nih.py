"""conf/nih repeats only the keys that differ from conf/base (conf/README.md, docs), so an edit
to a conf/base key reaches the NIH environment instead of being silently shadowed by a copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NIH_FILES = sorted((ROOT / "conf" / "nih").glob("parameters*.yml"))


def leaves(tree: Any, prefix: tuple[str, ...] = ()):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, (*prefix, key))
    else:
        yield prefix, tree


def base_parameters() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in sorted((ROOT / "conf" / "base").glob("parameters*.yml")):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return KeyError
        tree = tree[key]
    return tree


def is_model_lr(key: tuple[str, ...]) -> bool:
    """`<model>.model.training.optimizer.lr`: stated in every environment on purpose (a model's
    own lr overrides the shared one, so base's phantom value must not reach NIH unseen)."""
    return key[1:] == ("model", "training", "optimizer", "lr")


@pytest.mark.parametrize("path", NIH_FILES, ids=lambda p: p.name)
def test_conf_nih_repeats_no_key_with_base_value(path: Path):
    base = base_parameters()
    repeated = [
        ".".join(key)
        for key, value in leaves(yaml.safe_load(path.read_text()) or {})
        if lookup(base, key) == value and not is_model_lr(key)
    ]
    assert not repeated, f"{path.name} repeats conf/base's values of {repeated}: delete them"


def test_nih_resolves_to_the_paper_protocol_at_full_size():
    """What the trimmed files must still add up to (`kedro run --env nih`'s parameters)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from common import env_parameters

    nih = env_parameters("nih")
    model = nih["multiscale_resnet"]["model"]
    assert model["backbone"] == "resnet50" and model["scales"] == [224, 448]
    assert model["pretrained"] == "imagenet" and model["fusion"] == "concat"
    assert nih["image_cache"]["size"] == 448
    training = nih["training"]
    assert training["epochs"] == 30 and training["transfer"]["two_stage"] is False
    assert training["loss"]["name"] == "bce" and training["loss"]["balanced"] is True
    assert nih["augmentation"]["hflip_probability"] == 0.0
    assert nih["data_processing"]["split"]["mode"] == "official"
    for name in ("resnet_single_scale", "vgg16", "inception_v3", "densenet121", "efficientnet_b0"):
        assert nih[name]["model"]["pretrained"] == "imagenet", name
        assert nih[name]["model"]["name"] == name
        # the phantom's BatchNorm momentum (8 steps per epoch from scratch) stays on the phantom
        assert nih[name]["model"].get("batchnorm_momentum") is None, name
    assert nih["resnet_single_scale"]["model"]["scales"] == [448]


def test_conf_nih_states_every_models_learning_rate_in_its_own_block():
    """Issue 21: VGG16's phantom lr override (conf/base) silently applied on NIH and beat
    `--params training.optimizer.lr=...`. Each NIH model block now states its own lr."""
    nih: dict[str, Any] = {}
    for path in NIH_FILES:
        nih.update(yaml.safe_load(path.read_text()) or {})
    models = [
        name
        for name, block in base_parameters().items()
        if isinstance(block, dict) and "architecture" in (block.get("model") or {})
    ]
    assert len(models) == 6, models
    missing = [
        name
        for name in models
        if lookup(nih, (name, "model", "training", "optimizer", "lr")) is KeyError
    ]
    assert not missing, f"conf/nih states no learning rate for {missing}"
