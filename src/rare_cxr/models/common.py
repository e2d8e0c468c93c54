"""Pieces shared by every model: grayscale first convolution, input normalisation, resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics averaged over RGB. A grey image fed to an RGB network as three equal
# channels, each normalised with its own mean/std, is almost the same as one channel normalised
# with the averaged statistics and a first convolution whose kernel is the sum over the RGB
# kernels -- at a third of the first layer's input memory. That is how we adapt RGB weights.
GREY_MEAN = 0.449
GREY_STD = 0.226

# The input statistics each family of pretrained weights was trained with, as applied to a grey
# `[0, 1]` image (one channel, RGB weights folded to grey by `grey_conv_from`). Every
# architecture uses its weights' statistics (`ARCHITECTURE_NORMALISATION`), whether or not it is
# built with them, so a model trained from scratch and a pretrained one see the same input.
NORMALISATIONS: dict[str, dict] = {
    # torchvision's ResNet, VGG16, DenseNet121 and EfficientNet-B0 ImageNet weights:
    # `weights.transforms()` normalises RGB with mean (0.485, 0.456, 0.406), std (0.229, 0.224,
    # 0.225); for grey, the mean over RGB of each. Approximate: the channel means differ from
    # their average 0.449 by +8.0 %, +1.6 % and -9.6 %, the stds from 0.226 by +1.3 %, -0.9 %
    # and -0.4 %; on a [0, 1] grey input the per-channel normalised values differ from the
    # averaged ones by up to 0.19, 0.05 and 0.20 (in units of the std).
    "imagenet": {
        "name": "imagenet",
        "mean": GREY_MEAN,
        "std": GREY_STD,
        "range": [0.0, 1.0],
        "channels": 1,
        "source": "ImageNet RGB mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225), "
        "averaged over RGB for grey",
    },
    # torchvision's Inception-v3 weights (ported from TensorFlow) expect every channel at
    # (x - 0.5) / 0.5: torchvision builds them with transform_input=True, which turns its
    # ImageNet-normalised input back into exactly that. We build Inception with
    # transform_input=False and normalise with 0.5 / 0.5 here, once; for a grey image (three
    # equal channels) this is exact, not an average.
    "inception": {
        "name": "inception",
        "mean": 0.5,
        "std": 0.5,
        "range": [0.0, 1.0],
        "channels": 1,
        "source": "(x - 0.5) / 0.5 on every channel, what torchvision's Inception-v3 ImageNet "
        "weights see after transform_input",
    },
}


def grey_conv_from(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-input-channel copy of `conv` whose weight is the sum over the RGB input channels."""
    new = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class Preprocess(nn.Module):
    """Normalise a `[0, 1]` grey batch and resize it to one scale (no-op when already there).

    Lives inside the model so that a checkpoint carries its own input contract: whoever loads it
    feeds cache-sized `[0, 1]` images and never has to know the scales or statistics.
    """

    def __init__(self, size: int, mean: float = GREY_MEAN, std: float = GREY_STD) -> None:
        super().__init__()
        self.size = int(size)
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if x.shape[-2:] != (self.size, self.size):
            # antialias only matters when shrinking; it keeps small scales from aliasing.
            shrink = x.shape[-1] > self.size
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        return x

    def extra_repr(self) -> str:
        return f"size={self.size}, mean={self.mean}, std={self.std}"


class DeterministicAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """`nn.AdaptiveAvgPool2d` whose backward is deterministic on CUDA (`training.deterministic`).

    Why: PyTorch has no deterministic CUDA kernel for the backward of adaptive average pooling to
    anything but 1x1 (1x1 is computed as a mean, which is deterministic), so VGG16's pooling to
    7x7 makes `torch.use_deterministic_algorithms(True)` fail at the first backward pass. When the
    feature map is a whole multiple of the output size, adaptive pooling *is* plain average
    pooling with kernel = stride = that multiple (the same windows, the same means), whose
    backward is deterministic: this module computes that. Any other size is refused with a
    message naming it (it cannot be made deterministic on CUDA).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out_h, out_w = (
            (self.output_size, self.output_size)
            if isinstance(self.output_size, int)
            else self.output_size
        )
        out_h, out_w = out_h or height, out_w or width
        if (out_h, out_w) == (1, 1):
            return x.mean(dim=(-2, -1), keepdim=True)
        if height % out_h == 0 and width % out_w == 0:
            kernel = (height // out_h, width // out_w)
            return F.avg_pool2d(x, kernel_size=kernel, stride=kernel)
        raise RuntimeError(
            f"training.deterministic: adaptive average pooling of a {height}x{width} feature "
            f"map to {out_h}x{out_w} has no deterministic backward on CUDA (the map is not a "
            f"whole multiple of {out_h}x{out_w}); choose an input scale whose feature map is "
            "(VGG16: a multiple of 224 px), or set training.deterministic: false"
        )


def make_pooling_deterministic(model: nn.Module) -> int:
    """Swap every `nn.AdaptiveAvgPool2d` of `model` for `DeterministicAdaptiveAvgPool2d` (same
    output size, no parameters: the state dict is unchanged); return how many were swapped."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.AdaptiveAvgPool2d:
                setattr(parent, name, DeterministicAdaptiveAvgPool2d(child.output_size))
                swapped += 1
    return swapped
