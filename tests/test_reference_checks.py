"""Reference checks of numbers the report prints but no other test derives independently:
Grad-CAM against a hand computation, GFLOPs against hand counts and the published ResNet-50
figure, and early stopping's returned weights against the best epoch's weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_training import TINY_SPEC, blob_cache, tiny_params
from torch import nn

from rare_cxr.evaluation.cam import grad_cam
from rare_cxr.evaluation.cost import gflops_per_image
from rare_cxr.models import build_model
from rare_cxr.training import TrainingCallbacks, fit
from rare_cxr.training import engine as training_engine

# ------------------------------------------------------------------ Grad-CAM

# conv weights [out=2, in=1, 3, 3]: channel 0 non-negative (a blur, so A_0 >= 0 on a
# non-negative image), channel 1 a signed horizontal-gradient (Sobel) filter.
CONV_W = np.array(
    [
        [[[0.1, 0.2, 0.1], [0.0, 0.3, 0.0], [0.1, 0.2, 0.1]]],
        [[[0.25, 0.0, -0.25], [0.5, 0.0, -0.5], [0.25, 0.0, -0.25]]],
    ]
)
CONV_B = np.array([0.05, -0.1])
# class score c = sum_k V[c, k] * mean_ij(relu(A_k)[i, j] ** 2)
V = np.array([[1.0, -0.5], [-1.0, 0.0], [0.3, 1.0]])


class TinyCamNet(nn.Module):
    """conv 3x3 stride 2 (the Grad-CAM tap) -> in-place ReLU -> square -> spatial mean -> V."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(CONV_W))
            self.conv.bias.copy_(torch.from_numpy(CONV_B))
        self.register_buffer("v", torch.from_numpy(V).float())

    def cam_layers(self) -> dict[str, nn.Module]:
        return {"conv": self.conv}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        r = torch.relu_(a)  # in place after the tap: grad_cam must not be fooled by it
        pooled = (r * r).mean(dim=(2, 3))  # [B, 2]
        return pooled @ self.v.T  # [B, 3]


def conv_by_hand(image: np.ndarray) -> np.ndarray:
    """`A [2, 4, 4]`: cross-correlation, stride 2, zero padding 1, as nn.Conv2d."""
    padded = np.pad(image, 1)
    out = np.zeros((2, image.shape[0] // 2, image.shape[1] // 2))
    for k in range(2):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                patch = padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
                out[k, i, j] = (patch * CONV_W[k, 0]).sum() + CONV_B[k]
    return out


def grad_cam_by_hand(image: np.ndarray, c: int) -> np.ndarray:
    a = conv_by_hand(image)
    hw = a.shape[1] * a.shape[2]
    # d score_c / d A_k[i, j] = V[c, k] * 2 * relu(A_k[i, j]) / hw   (relu' = 1 where A > 0,
    # and relu(A) = 0 where it is not, so the product rule needs no case split)
    grad = V[c][:, None, None] * 2.0 * np.maximum(a, 0.0) / hw
    alpha = grad.mean(axis=(1, 2))  # Grad-CAM channel weights: spatial mean of the gradient
    small = np.maximum((alpha[:, None, None] * a).sum(axis=0), 0.0)  # ReLU(sum_k alpha_k A_k)
    up = F.interpolate(
        torch.from_numpy(small)[None, None],
        size=image.shape,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    up = np.maximum(up, 0.0)
    peak = up.max()
    return up / peak if peak > 0 else up


def test_grad_cam_equals_the_hand_computation():
    rng = np.random.default_rng(0)
    images = np.stack([rng.random((8, 8)), np.tile(np.linspace(0.0, 1.0, 8), (8, 1))])
    model = TinyCamNet().train()  # grad_cam must switch to eval and back
    x = torch.from_numpy(images).float()[:, None]
    for c in range(3):
        maps = grad_cam(model, x, c)
        assert set(maps) == {"conv"}
        got = maps["conv"].numpy()
        assert got.shape == (2, 8, 8)
        for b in range(2):
            expected = grad_cam_by_hand(images[b].astype(np.float32).astype(float), c)
            np.testing.assert_allclose(got[b], expected, atol=1e-5, err_msg=f"class {c} img {b}")
    assert model.training
    # class 1 weighs only the non-negative channel 0, negatively: alpha_0 < 0 and A_0 >= 0, so
    # the map is all zero -- and stays zero (no division by a zero maximum)
    zero = grad_cam(model, x, 1)["conv"]
    assert torch.all(zero == 0)
    # the other classes give proper maps, normalised to a maximum of exactly 1
    assert torch.allclose(grad_cam(model, x, 2)["conv"].flatten(1).amax(1), torch.ones(2))


# ------------------------------------------------------------------ GFLOPs


class TinyFlopNet(nn.Module):
    """resize -> conv 1->4 (3x3, pad 1, no bias) -> conv 4->8 (3x3, stride 2, bias) -> fc 8->3."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_gflops_exact_on_a_tiny_network():
    # multiply-adds: c1 16*16 outputs x 4 channels x (1*3*3) = 9,216;
    # c2 8*8 outputs x 8 channels x (4*3*3) = 18,432; fc 8 x 3 = 24.
    # cost.py's convention (torch's FlopCounterMode): 2 FLOPs per multiply-add; bias adds,
    # ReLU, pooling and the bilinear resize are not counted.
    flops = 2 * (16 * 16 * 4 * 9 + 8 * 8 * 8 * 4 * 9 + 8 * 3)
    assert flops == 55_344
    assert gflops_per_image(TinyFlopNet(), 16) == pytest.approx(flops / 1e9, rel=1e-12)
    # the resize is free: the input size does not change the count
    assert gflops_per_image(TinyFlopNet(), 64) == pytest.approx(flops / 1e9, rel=1e-12)


class GreyToRGB(nn.Module):
    """cost.py feeds `[1, 1, S, S]`; torchvision's ResNet-50 wants 3 channels (a free copy)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def test_resnet50_gflops_match_the_published_figure():
    torch.manual_seed(0)
    resnet = gflops_per_image(GreyToRGB(torchvision.models.resnet50(weights=None)), 224)
    # torchvision and He et al. publish 4.1 G multiply-adds at 224 px = 8.2 GFLOPs here
    assert resnet == pytest.approx(8.2, rel=0.03)
    # the project's own ResNet-50 (grey first conv, 14-way head) at one 224-px scale differs
    # from torchvision's by exactly: conv1 with 1 instead of 3 input channels
    # (112*112 outputs x 64 channels x 7*7 x 2 fewer channels) and fc 2048 x (1000 - 14)
    ours = build_model(
        {
            "name": "r50",
            "architecture": "multiscale_resnet",
            "backbone": "resnet50",
            "scales": [224],
            "pretrained": "none",
        }
    )
    conv1 = 2 * 112 * 112 * 64 * 49 * 2
    fc = 2 * 2048 * (1000 - 14)
    assert gflops_per_image(ours, 224) == pytest.approx(resnet - (conv1 + fc) / 1e9, rel=1e-9)


# ------------------------------------------------------------------ early stopping


def test_early_stopping_returns_the_best_epochs_weights(tmp_path: Path, monkeypatch):
    """Patience 1 on a validation metric that plateaus from the first epoch.

    Every validation image is the same picture, so every image gets the same probabilities
    and every validation AUROC is 0.5 (all ties) after every epoch: epoch 1 is the best, epoch
    2 does not improve on it, training stops there -- while the weights *do* change in epoch
    2, so returning the last instead of the best weights would be visible.
    """
    cache = blob_cache(n_train=32, n_val=16, n_test=4)
    val = cache.split("val")
    val.images = np.repeat(val.images[:1], len(val.images), axis=0)
    built: list[nn.Module] = []

    def keep_model(spec):
        model = build_model(spec)
        built.append(model)
        return model

    monkeypatch.setattr(training_engine, "build_model", keep_model)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    rows: dict[int, dict] = {}

    def on_epoch_end(epoch: int, row: dict) -> None:
        rows[epoch] = row
        snapshots[epoch] = {k: v.detach().clone() for k, v in built[-1].state_dict().items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = fit(
            TINY_SPEC,
            cache,
            None,
            tiny_params(tmp_path, epochs=5, patience=1, deterministic=True, resume=False),
            callbacks=TrainingCallbacks(on_epoch_end=on_epoch_end),
        )
    finally:
        torch.set_num_threads(threads)
    assert result is not None
    assert sorted(rows) == [1, 2]  # stopped early: 2 of 5 epochs
    assert rows[1]["val_macro_auroc"] == rows[2]["val_macro_auroc"] == pytest.approx(0.5)
    assert len(result.history) == 2 and result.metadata["epoch"] == 1
    changed = [k for k in snapshots[1] if not torch.equal(snapshots[1][k], snapshots[2][k])]
    assert changed, "epoch 2 did not change the weights: the test would prove nothing"
    assert result.state_dict.keys() == snapshots[1].keys()
    for key, value in result.state_dict.items():
        assert torch.equal(value.cpu(), snapshots[1][key]), key
