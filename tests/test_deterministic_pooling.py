"""`training.deterministic: true` on CUDA for every model (docs/training.md, "Deterministic runs").

PyTorch has no deterministic CUDA backward for adaptive average pooling to anything but 1x1;
VGG16 pools to 7x7, so deterministic training of it failed at its first step on a GPU. The
trainer swaps such pooling for the equivalent plain average pooling where the feature map is a
whole multiple of the output (`DeterministicAdaptiveAvgPool2d`). Checked here on the CPU for
equality with adaptive pooling (values and gradients) and, where CUDA is present, by one
deterministic training step of every architecture.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rare_cxr.models import build_model
from rare_cxr.models.common import DeterministicAdaptiveAvgPool2d, make_pooling_deterministic

ARCHITECTURES = ("multiscale_resnet", "vgg16", "inception_v3", "densenet121", "efficientnet_b0")


@pytest.mark.parametrize(
    ("size", "output"), [((14, 14), (7, 7)), ((7, 7), (7, 7)), ((9, 12), (3, 4)), ((5, 6), 1)]
)
def test_equals_adaptive_pooling_in_values_and_gradients(size, output):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y.copy_(x)
    reference, swapped = nn.AdaptiveAvgPool2d(output), DeterministicAdaptiveAvgPool2d(output)
    weights = torch.randn_like(reference(x))
    (reference(x) * weights).sum().backward()
    (swapped(y) * weights).sum().backward()
    torch.testing.assert_close(swapped(y), reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-12)


def test_a_size_that_is_no_multiple_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r"2x2 feature map to 7x7 .* multiple of 224 px"):
        DeterministicAdaptiveAvgPool2d((7, 7))(torch.zeros(1, 1, 2, 2))


def test_the_swap_keeps_the_state_dict_and_the_outputs():
    torch.manual_seed(0)
    spec = {"name": "vgg16", "architecture": "vgg16", "scales": [64], "pretrained": "none"}
    model = build_model(spec, load_weights=False).eval()
    x = torch.rand(2, 1, 64, 64)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    assert make_pooling_deterministic(model) == 1  # VGG16's 7x7 pool (a 2x2 map at 64 px...)
    assert model.state_dict().keys() == state.keys()
    with pytest.raises(RuntimeError, match="no deterministic backward"):
        model(x)  # ... which is no multiple of 7x7: refused, not silently different
    model = build_model({**spec, "scales": [224]}, load_weights=False).eval()
    x = torch.rand(1, 1, 224, 224)
    before = model(x)
    make_pooling_deterministic(model)
    torch.testing.assert_close(model(x), before)  # 7x7 -> 7x7 at 224 px


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_deterministic_training_step_of_every_architecture_on_cuda(architecture):
    """Two identical deterministic steps on CUDA give identical weights (run on a GPU machine:
    `pytest -m gpu` or bench/gpu_check.sh)."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    scale = {"inception_v3": 299, "vgg16": 224}.get(architecture, 224)
    spec = {"name": architecture, "architecture": architecture, "scales": [scale]}
    spec["pretrained"] = "none"
    if architecture == "multiscale_resnet":
        spec.update(backbone="resnet18", scales=[112, 224])
    results = []
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            torch.manual_seed(0)
            model = build_model(spec, load_weights=False).cuda().train()
            make_pooling_deterministic(model)
            optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
            x = torch.rand(4, 1, max(spec["scales"]), max(spec["scales"]), device="cuda")
            loss = model(x).float().sigmoid().mean()
            loss.backward()
            optimiser.step()
            results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    finally:
        torch.use_deterministic_algorithms(previous)
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key
