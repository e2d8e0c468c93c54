"""Models: factory, multi-scale ResNet, baselines, grey first conv, transfer learning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision

from rare_cxr.findings import FINDINGS
from rare_cxr.models import MultiScaleResNet, build_model, load_pretrained, validate_model_spec
from rare_cxr.models.common import GREY_MEAN, GREY_STD, grey_conv_from
from rare_cxr.models.transfer import imagenet_state_dict

torch.set_num_threads(1)


def _x(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fusion", ["concat", "mean", "attention"])
@pytest.mark.parametrize(
    ("shared", "batchnorm"), [(True, "shared"), (True, "per_scale"), (False, "shared")]
)
def test_multiscale_outputs_logits_and_one_cam_layer_per_scale(fusion, shared, batchnorm):
    model = build_model(
        {
            "architecture": "multiscale_resnet",
            "backbone": "resnet18",
            "scales": [16, 32],
            "fusion": fusion,
            "shared_trunk": shared,
            "batchnorm": batchnorm,
        }
    )
    model.eval()
    assert model(_x()).shape == (2, len(FINDINGS))
    assert set(model.cam_layers()) == {"scale_16", "scale_32"}
    assert len(model.trunks) == (1 if shared else 2)
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, o.shape[-1])))
        for n, m in model.cam_layers().items()
    ]
    model(_x())
    for h in hooks:
        h.remove()
    assert seen == [("scale_16", 1), ("scale_32", 1)]


@pytest.mark.parametrize("batchnorm", ["shared", "per_scale"])
def test_single_scale_multiscale_resnet_is_a_plain_torchvision_resnet(batchnorm):
    # with one scale there is nothing to split: both BatchNorm settings build this same model
    model = build_model(
        {
            "architecture": "multiscale_resnet",
            "backbone": "resnet18",
            "scales": [32],
            "batchnorm": batchnorm,
        }
    ).eval()
    plain = torchvision.models.resnet18(num_classes=len(FINDINGS))
    plain.conv1 = grey_conv_from(plain.conv1)
    trunk = {
        k.removeprefix("trunks.0."): v
        for k, v in model.state_dict().items()
        if k.startswith("trunks.0.")
    }
    trunk.update({"fc.weight": model.fc.weight, "fc.bias": model.fc.bias})
    plain.load_state_dict(trunk)
    plain.eval()
    x = _x(3, 32)
    with torch.no_grad():
        expected = plain((x - GREY_MEAN) / GREY_STD)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        # an input larger than the scale is resized first, exactly like the ablation's input
        big = _x(3, 64)
        small = torch.nn.functional.interpolate(
            (big - GREY_MEAN) / GREY_STD, size=(32, 32), mode="bilinear", antialias=True
        )
        torch.testing.assert_close(model(big), plain(small))


def test_grey_conv_equals_rgb_conv_on_a_grey_image():
    rgb = torch.nn.Conv2d(3, 4, 3, padding=1)
    grey = grey_conv_from(rgb)
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "size"),
    [("vgg16", 32), ("inception_v3", 75), ("densenet121", 32), ("efficientnet_b0", 32)],
)
def test_baselines_take_grey_input_and_give_14_logits(arch, size):
    model = build_model({"architecture": arch, "scales": [size]})
    model.train()  # inception's training mode must not return aux logits
    out = model(_x(2, 48))
    assert out.shape == (2, len(FINDINGS))
    out.sum().backward()
    ((name, layer),) = model.cam_layers().items()
    assert isinstance(layer, torch.nn.Module) and name
    assert model.head().weight.shape[0] == len(FINDINGS)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"architecture": "resnet", "scales": [32]}, "model.architecture"),
        ({"architecture": "multiscale_resnet", "backbone": "resnet19"}, "model.backbone"),
        ({"architecture": "multiscale_resnet", "scales": [0, 32]}, "model.scales"),
        ({"architecture": "multiscale_resnet", "scales": [32.5]}, "model.scales"),
        ({"architecture": "multiscale_resnet", "scales": []}, "model.scales"),
        ({"architecture": "multiscale_resnet", "fusion": "sum"}, "model.fusion"),
        ({"architecture": "multiscale_resnet", "batchnorm": "per_trunk"}, r"m\.model\.batchnorm"),
        ({"architecture": "vgg16", "scales": [64], "batchnorm": "shared"}, r"m\.model\.batchnorm"),
        ({"architecture": "inception_v3", "scales": [64]}, "model.scales"),
        ({"architecture": "vgg16", "scales": [64, 128]}, "model.scales"),
        ({"architecture": "vgg16", "scales": [64], "backbone": "resnet18"}, "model.backbone"),
        ({"architecture": "vgg16", "scales": [64], "colour": 1}, "unknown key"),
    ],
)
def test_invalid_model_specs_name_the_key(spec, key):
    with pytest.raises(ValueError, match=key):
        validate_model_spec({"name": "m", **spec})


def test_loading_a_state_dict_changes_weights_and_partial_load_reports_skipped_keys(
    tmp_path: Path, caplog
):
    source = torchvision.models.resnet18(num_classes=1000)  # RGB conv1, 1000-way head
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.02)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    spec = {
        "name": "m",
        "architecture": "multiscale_resnet",
        "backbone": "resnet18",
        "scales": [32],
        "pretrained": str(path),
    }
    fresh = build_model({**spec, "pretrained": "none"})
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        model = build_model(spec)
    loaded = model.trunks[0]
    torch.testing.assert_close(loaded.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert not torch.equal(loaded.layer3[0].conv1.weight, fresh.trunks[0].layer3[0].conv1.weight)
    torch.testing.assert_close(loaded.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    report = load_pretrained(build_model({**spec, "pretrained": "none"}), model.spec)
    assert "conv1.weight" in report.adapted
    assert {"fc.weight", "fc.bias"} <= set(report.unexpected)  # trunk has no fc: reported
    assert "fc.weight" in caplog.text

    # a whole-model checkpoint with another head size: the head is skipped, the rest loads
    other = MultiScaleResNet("resnet18", [32], num_outputs=3)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": other.state_dict(), "metadata": {}}, ckpt)
    report = load_pretrained(
        build_model({**spec, "pretrained": "none"}), {**model.spec, "pretrained": str(ckpt)}
    )
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert len(report.loaded) > 50


def test_imagenet_weights_come_from_the_torch_hub_cache_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    expected = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=str(expected)):
        imagenet_state_dict("resnet18")

    expected.parent.mkdir(parents=True, exist_ok=True)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, expected)
    model = build_model(
        {
            "architecture": "multiscale_resnet",
            "backbone": "resnet18",
            "scales": [32],
            "pretrained": "imagenet",
        }
    )
    torch.testing.assert_close(
        model.trunks[0].layer1[0].conv1.weight, weights["layer1.0.conv1.weight"]
    )


def test_checkpoint_trained_with_another_normalisation_is_refused():
    """An inception_v3 checkpoint from before per-architecture normalisation (ImageNet grey
    statistics) must not be silently fed (x - 0.5) / 0.5."""
    from rare_cxr.findings import FINDINGS
    from rare_cxr.models import build_model
    from rare_cxr.pipelines.training.nodes import load_checkpoint_model

    spec = {
        "name": "inception_v3",
        "architecture": "inception_v3",
        "scales": [75],
        "pretrained": "none",
    }
    model = build_model(spec, load_weights=False)
    meta = {
        "model_spec": spec,
        "findings": list(FINDINGS),
        "normalisation": dict(model.normalisation),
    }
    load_checkpoint_model({"state_dict": model.state_dict(), "metadata": meta})  # same: fine
    old = {**meta, "normalisation": {"mean": 0.449, "std": 0.226}}
    with pytest.raises(ValueError, match=r"trained with input normalisation mean=0.449"):
        load_checkpoint_model({"state_dict": model.state_dict(), "metadata": old})


def test_inception_imagenet_aux_head_is_listed_as_unexpected_not_loaded(tmp_path: Path):
    """docs/training.md: inception_v3 is built without its auxiliary head, and the weight file's
    `AuxLogits.*` keys are listed as unexpected by the load report (not silently dropped)."""
    spec = {"name": "m", "architecture": "inception_v3", "scales": [75], "pretrained": "none"}
    model = build_model(spec)
    # torchvision's ImageNet file = the main network (RGB stem) + the auxiliary head
    weights = {k.removeprefix("net."): v for k, v in model.state_dict().items()}
    weights["Conv2d_1a_3x3.conv.weight"] = weights["Conv2d_1a_3x3.conv.weight"].repeat(1, 3, 1, 1)
    aux_head = torchvision.models.inception.InceptionAux(768, 1000)
    weights.update({f"AuxLogits.{k}": v for k, v in aux_head.state_dict().items()})
    path = tmp_path / "inception.pt"
    torch.save(weights, path)
    report = load_pretrained(model, {**spec, "pretrained": str(path)})
    aux = {k for k in weights if k.startswith("AuxLogits.")}
    assert aux and aux <= set(report.unexpected)
    assert not any(k.startswith("AuxLogits.") for k in report.loaded)
    assert "Conv2d_1a_3x3.conv.weight" in report.adapted  # RGB stem folded to grey


# Every architecture with BatchNorm, at its smallest cheap size (both BatchNorm modes of the
# multi-scale trunk: per_scale builds one BatchNorm set per scale).
BATCHNORM_SPECS = [
    {"architecture": "multiscale_resnet", "scales": [16, 32], "batchnorm": "shared"},
    {"architecture": "multiscale_resnet", "scales": [16, 32], "batchnorm": "per_scale"},
    {"architecture": "multiscale_resnet", "scales": [16, 32], "shared_trunk": False},
    {"architecture": "inception_v3", "scales": [75]},
    {"architecture": "densenet121", "scales": [32]},
    {"architecture": "efficientnet_b0", "scales": [32]},
]


@pytest.mark.parametrize("spec", BATCHNORM_SPECS, ids=lambda s: str(s.get("batchnorm", s)))
def test_batchnorm_momentum_reaches_every_batchnorm_layer(spec):
    default = build_model(spec)
    tuned = build_model({**spec, "batchnorm_momentum": 0.37})
    layers = [m for m in tuned.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert layers, "the architecture has BatchNorm layers to reach"
    assert {m.momentum for m in layers} == {0.37}
    # the same layers exist without the key, at torchvision's own 0.1: nothing else changed
    assert {
        m.momentum
        for m in default.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    } == {0.1}
    assert sum(1 for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)) == len(layers)
    # it goes into the spec the checkpoint keeps, so a reload builds the same model
    assert tuned.spec["batchnorm_momentum"] == 0.37


def test_batchnorm_momentum_changes_the_running_statistics_update():
    # one training-mode batch moves the running mean by exactly `momentum` of the batch mean
    model = build_model({"architecture": "densenet121", "scales": [32], "batchnorm_momentum": 0.5})
    model.train()
    model(_x(4, 32))
    first = model.net.features.norm0
    assert first.running_var is not None
    batch_mean = None

    def grab(module, inputs, output):
        nonlocal batch_mean
        batch_mean = inputs[0].mean(dim=(0, 2, 3))

    hook = first.register_forward_hook(grab)
    before = first.running_mean.clone()
    model(_x(4, 32))
    hook.remove()
    torch.testing.assert_close(first.running_mean, 0.5 * before + 0.5 * batch_mean)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"name": "m", "architecture": "efficientnet_b0", "scales": [64]},
            {
                "name": "m",
                "architecture": "efficientnet_b0",
                "scales": [64],
                "dropout": 0.0,
                "pretrained": "none",
            },
        ),
        (
            {"name": "m", "architecture": "multiscale_resnet", "scales": [64, 128]},
            {
                "name": "m",
                "architecture": "multiscale_resnet",
                "scales": [64, 128],
                "backbone": "resnet18",
                "fusion": "concat",
                "shared_trunk": True,
                "batchnorm": "shared",
                "dropout": 0.0,
                "pretrained": "none",
            },
        ),
    ],
)
def test_a_spec_without_batchnorm_momentum_keeps_its_fingerprint(spec, expected):
    # The spec's plain dict is what the training fingerprint hashes (resume, reuse of finished
    # trainings): adding the optional key must not change it for specs that do not use it.
    assert validate_model_spec(spec) == expected
    assert validate_model_spec({**spec, "batchnorm_momentum": None}) == expected
    assert validate_model_spec({**spec, "batchnorm_momentum": 0.5}) == {
        **expected,
        "batchnorm_momentum": 0.5,
    }


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"architecture": "vgg16", "scales": [64], "batchnorm_momentum": 0.5}, "no BatchNorm"),
        ({"architecture": "densenet121", "scales": [64], "batchnorm_momentum": 0}, "momentum"),
        ({"architecture": "densenet121", "scales": [64], "batchnorm_momentum": 1.5}, "momentum"),
    ],
)
def test_invalid_batchnorm_momentum_names_the_key(spec, key):
    with pytest.raises(ValueError, match=f"batchnorm_momentum.*{key}|{key}"):
        validate_model_spec({"name": "m", **spec})
