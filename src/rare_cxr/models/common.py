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
