"""Per-scale BatchNorm in the shared multi-scale trunk, per-architecture input normalisation, and
the scale-versus-image-cache check of the training node (issue 11, items 2, 4 and 5).

Tiny inputs (16-75 px) and random weights: every test runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torchvision

from rare_cxr.findings import FINDINGS
from rare_cxr.models import build_model, load_pretrained, normalisation_for
from rare_cxr.models.multiscale import PerScaleBatchNorm2d
from rare_cxr.pipelines.training.nodes import (
    check_scales_fit_cache,
    load_checkpoint_model,
    train_model,
)

torch.set_num_threads(1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _x(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _spec(**over) -> dict:
    return {
        "name": "m",
        "architecture": "multiscale_resnet",
        "backbone": "resnet18",
        "scales": [16, 32],
        "pretrained": "none",
        **over,
    }


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 1) -> None:
    """Different affine parameters and running statistics in every BatchNorm (and scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(1 + 0.5 * torch.rand(n, generator=gen))


def _one_scale_state(trunk_state: dict, i: int) -> dict:
    """A per-scale trunk's weights as a plain torchvision trunk with scale i's BatchNorms."""
    return {
        re.sub(r"\.norms\.\d+\.", ".", k): v
        for k, v in trunk_state.items()
        if ".norms." not in k or f".norms.{i}." in k
    }


# ---------------------------------------------------------------- item 2: per-scale BatchNorm


def test_per_scale_batchnorm_keeps_each_scales_statistics_where_shared_blends_them():
    x = _x()
    torch.manual_seed(0)
    per_scale = build_model(_spec(batchnorm="per_scale")).train()
    torch.manual_seed(0)
    shared = build_model(_spec(batchnorm="shared")).train()
    # same convolutions; per_scale only adds a second set of BatchNorm parameters
    conv = per_scale.trunks[0].conv1.weight
    torch.testing.assert_close(conv, shared.trunks[0].conv1.weight)
    bn_params = sum(
        p.numel()
        for m in shared.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    )
    n_per_scale = sum(p.numel() for p in per_scale.parameters())
    assert n_per_scale == sum(p.numel() for p in shared.parameters()) + bn_params

    with torch.no_grad():
        per_scale(x)
        shared(x)
        # first BatchNorm's input at each scale: conv1 of that scale's resized image
        means = [conv1_mean(per_scale, i, x) for i in range(2)]
    norms = per_scale.trunks[0].bn1.norms
    momentum = norms[0].momentum
    for i in range(2):  # one update each, from zero, with that scale's batch mean only
        torch.testing.assert_close(norms[i].running_mean, momentum * means[i])
    # shared: one set, updated by 16 px then 32 px -> a blend that is neither scale's
    blend = (1 - momentum) * momentum * means[0] + momentum * means[1]
    torch.testing.assert_close(shared.trunks[0].bn1.running_mean, blend)
    assert not torch.allclose(means[0], means[1], atol=1e-3)


def conv1_mean(model: torch.nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
    h = model.trunks[0].conv1(model.preprocess[i](x))
    return h.mean(dim=(0, 2, 3))


@pytest.mark.parametrize(  # BasicBlock and Bottleneck; running and batch statistics
    ("backbone", "mode"), [("resnet18", "eval"), ("resnet18", "train"), ("resnet50", "eval")]
)
def test_each_scale_is_a_plain_resnet_with_that_scales_batchnorm(backbone, mode):
    model = build_model(_spec(backbone=backbone, batchnorm="per_scale"))
    _randomise_batchnorm(model)
    model.train(mode == "train")
    x = _x()
    trunk_state = model.trunks[0].state_dict()
    with torch.no_grad():
        feats = model.scale_features(x)
        for i, scale in enumerate(model.scales):
            single = build_model(_spec(backbone=backbone, scales=[scale]))
            single.trunks[0].load_state_dict(_one_scale_state(trunk_state, i))  # strict
            single.train(mode == "train")
            torch.testing.assert_close(feats[i], single.scale_features(x)[0])


def test_torchvision_batchnorm_is_loaded_into_every_scales_set(tmp_path: Path, caplog):
    source = torchvision.models.resnet18(num_classes=1000)
    _randomise_batchnorm(source)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="rare_cxr"):
        model = build_model(_spec(batchnorm="per_scale", pretrained=str(path)))
    trunk = model.trunks[0]
    for name, bn in source.named_modules():
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        mine = trunk.get_submodule(name)
        assert isinstance(mine, PerScaleBatchNorm2d) and len(mine.norms) == 2
        for copy in mine.norms:
            for key, value in bn.state_dict().items():
                torch.testing.assert_close(copy.state_dict()[key], value, msg=f"{name}.{key}")
    torch.testing.assert_close(trunk.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    report = load_pretrained(build_model(_spec(batchnorm="per_scale")), model.spec)
    assert set(report.unexpected) == {"fc.weight", "fc.bias"}  # no BatchNorm key left over
    assert report.missing == []
    assert "layer1.0.bn1.norms.1.running_var" in report.per_scale
    assert "BatchNorm copied into every scale's set" in caplog.text


def test_a_shared_batchnorm_checkpoint_loads_into_a_per_scale_model(tmp_path: Path):
    shared = build_model(_spec(batchnorm="shared"))
    _randomise_batchnorm(shared)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": shared.state_dict(), "metadata": {}}, path)
    model = build_model(_spec(batchnorm="per_scale", pretrained=str(path)))  # whole model
    torch.testing.assert_close(model.fc.weight, shared.fc.weight)
    for i in range(2):
        torch.testing.assert_close(
            model.trunks[0].layer3[1].bn2.norms[i].running_var,
            shared.trunks[0].layer3[1].bn2.running_var,
        )
    # the same statistics in both sets: in eval mode it computes what the shared model does
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), shared.eval()(x))


def test_per_scale_checkpoint_rebuilds_and_grad_cam_sees_every_scale(tmp_path: Path):
    from rare_cxr.evaluation.cam import grad_cam

    torch.manual_seed(0)
    model = build_model(_spec(batchnorm="per_scale", fusion="attention"))
    _randomise_batchnorm(model)
    path = tmp_path / "checkpoint.pt"
    metadata = {"model_spec": model.spec, "findings": list(FINDINGS)}
    torch.save({"state_dict": model.state_dict(), "metadata": metadata}, path)
    rebuilt = load_checkpoint_model(torch.load(path, weights_only=True))
    assert rebuilt.spec["batchnorm"] == "per_scale"
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)
    cams = grad_cam(rebuilt, x, class_index=0)
    assert set(cams) == {"scale_16", "scale_32"}
    assert all(c.shape == (4, 32, 32) and 0 <= c.min() <= c.max() <= 1 for c in cams.values())
    # each scale's tap sits on that scale's path: the score has a gradient at both
    acts = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, n=n: acts.__setitem__(n, out))
        for n, m in rebuilt.cam_layers().items()
    ]
    score = rebuilt(x)[:, 0].sum()
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(score, [acts["scale_16"], acts["scale_32"]])
    assert all(g.abs().sum() > 0 for g in grads)


def test_sync_batchnorm_conversion_reaches_every_scales_batchnorm():
    from rare_cxr.training.distributed import AllReduceBatchNorm2d, convert_sync_batchnorm

    model = build_model(_spec(batchnorm="per_scale")).eval()
    _randomise_batchnorm(model)
    x = _x()
    with torch.no_grad():
        before = model(x)
        converted = convert_sync_batchnorm(model, torch.device("cpu"))
        after = converted(x)
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(type(m) is AllReduceBatchNorm2d for m in norms)
    assert len(norms) == 2 * 20  # resnet18 has 20 BatchNorms, one set per scale
    torch.testing.assert_close(after, before)


# ---------------------------------------------------------------- item 4: input normalisation


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [
        ({"architecture": "multiscale_resnet", "scales": [32, 64]}, 0.449, 0.226),
        pytest.param(
            {"architecture": "vgg16", "scales": [32]}, 0.449, 0.226, marks=pytest.mark.slow
        ),
        ({"architecture": "densenet121", "scales": [32]}, 0.449, 0.226),
        ({"architecture": "efficientnet_b0", "scales": [32]}, 0.449, 0.226),
        ({"architecture": "inception_v3", "scales": [75]}, 0.5, 0.5),
    ],
)
def test_every_architecture_normalises_once_with_its_weights_statistics(spec, mean, std):
    model = build_model({"name": "m", **spec}).eval()
    assert model.normalisation["mean"] == pytest.approx(mean)
    assert model.normalisation["std"] == pytest.approx(std)
    assert model.normalisation == normalisation_for(spec["architecture"])
    if spec["architecture"] == "multiscale_resnet":
        # ImageNet statistics averaged over RGB: the grey stand-in for torchvision's transform
        assert mean == pytest.approx(sum(IMAGENET_MEAN) / 3, abs=5e-4)
        assert std == pytest.approx(sum(IMAGENET_STD) / 3, abs=5e-4)
        return
    size = spec["scales"][0]
    x = _x(2, size)
    with torch.no_grad():  # input at the model's scale: Preprocess only normalises, once
        torch.testing.assert_close(model(x), model.net((x - mean) / std), rtol=0, atol=0)


def test_inception_sees_what_torchvisions_pretrained_inception_sees(tmp_path: Path):
    """Ours (grey, 0.5/0.5, transform_input off) vs torchvision's RGB Inception-v3 as its
    ImageNet weights are used: `weights.transforms()` normalises with ImageNet mean/std and
    `transform_input=True` turns that into (x - 0.5) / 0.5 per channel. Same weights, same
    grey image replicated to RGB: the first layer's activations and the logits agree; with the
    ImageNet grey statistics the first layer's would not."""
    torch.manual_seed(0)
    rgb = torchvision.models.inception_v3(
        weights=None,
        aux_logits=False,
        init_weights=False,
        transform_input=True,
        num_classes=len(FINDINGS),
    ).eval()
    _randomise_batchnorm(rgb)
    path = tmp_path / "inception.pt"
    torch.save(rgb.state_dict(), path)
    model = build_model(
        {"name": "m", "architecture": "inception_v3", "scales": [75], "pretrained": str(path)}
    ).eval()
    assert model.net.transform_input is False  # normalised once, by Preprocess
    x = _x(2, 75)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    first = {}
    for name, net in (("rgb", rgb), ("ours", model.net)):
        net.Conv2d_1a_3x3.register_forward_hook(
            lambda _m, _i, out, name=name: first.__setitem__(name, out)
        )
    with torch.no_grad():
        expected = rgb((x.expand(-1, 3, -1, -1) - mean) / std)
        ours = model(x)
        torch.testing.assert_close(first["ours"], first["rgb"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        model.net((x - 0.449) / 0.226)  # the former one-size-fits-all statistics
        assert (first["ours"] - first["rgb"]).abs().max() > 0.1


def test_an_inception_with_transform_input_on_is_refused():
    from rare_cxr.models import SingleScaleNet

    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, transform_input=True
    )
    with pytest.raises(ValueError, match="transform_input"):
        SingleScaleNet(net, 75, "Mixed_7c", "fc")


@pytest.mark.parametrize(
    ("architecture", "scales", "mean"),
    [("inception_v3", [75], 0.5), ("multiscale_resnet", [32], 0.449)],
)
def test_checkpoint_metadata_records_the_models_normalisation(
    tmp_path: Path, architecture, scales, mean
):
    from test_training import blob_cache, tiny_params

    from rare_cxr.training import fit

    spec = {"name": "m", "architecture": architecture, "scales": scales, "pretrained": "none"}
    cache = blob_cache(n_train=8, n_val=4, n_test=2, size=32)
    result = fit(spec, cache, None, tiny_params(tmp_path, epochs=1, batch_size=4, resume=False))
    assert result.metadata["normalisation"] == normalisation_for(architecture)
    assert result.metadata["normalisation"]["mean"] == mean


# ---------------------------------------------------------------- item 5: scales vs the cache


class Untouchable:
    def __init__(self, size: int) -> None:
        self.size = size

    def split(self, name):  # pragma: no cover - must not be reached
        raise AssertionError("image cache read before the scale check")


def test_a_scale_above_the_image_cache_size_stops_training_naming_both_parameters():
    spec = _spec(name="multiscale_resnet", scales=[32, 64])
    with pytest.raises(ValueError, match=r"multiscale_resnet\.model\.scales.*image_cache\.size"):
        train_model(Untouchable(32), None, spec, {"device": "cpu"})
    with pytest.raises(ValueError, match=r"vgg16\.model\.scales.*image_cache\.size \(32 px\)"):
        check_scales_fit_cache(
            {"name": "vgg16", "architecture": "vgg16", "scales": [64]}, Untouchable(32)
        )


def test_inceptions_minimum_input_may_exceed_a_small_cache_with_a_warning(caplog):
    inception = {"name": "inception_v3", "architecture": "inception_v3", "scales": [75]}
    with caplog.at_level(logging.WARNING, logger="rare_cxr"):
        check_scales_fit_cache(inception, Untouchable(32))
    assert "inception_v3.model.scales" in caplog.text and "minimum input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rare_cxr"):
        check_scales_fit_cache({**inception, "scales": [299]}, Untouchable(448))
        check_scales_fit_cache(_spec(scales=[64, 128]), Untouchable(128))
    assert caplog.text == ""
    with pytest.raises(ValueError, match=r"inception_v3\.model\.scales"):
        check_scales_fit_cache({**inception, "scales": [76]}, Untouchable(32))
