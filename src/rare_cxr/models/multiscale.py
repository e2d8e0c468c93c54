"""The paper's multi-scale ResNet: image pyramid, ResNet trunk, fused features, one head.

Each configured scale s gives I_s = resize(image, s); each I_s goes through a ResNet trunk
(one shared trunk by default -- same weights for every scale, as in the paper's figure -- or one
trunk per scale), global-average-pooled features are fused (concatenation by default, mean or a
learned softmax attention over scales as options) and a linear head gives one logit per finding.

With a single scale and concatenation the model *is* a torchvision ResNet classifier (trunk,
pool, `fc`) with a grey first convolution -- the ablation `resnet_single_scale` relies on that,
and `tests/test_models.py` checks it logit for logit.

BatchNorm in a shared trunk (`batchnorm`): `shared` (the paper) keeps torchvision's one
BatchNorm per layer, so every scale updates the same running statistics and eval mode normalises
each scale with a blend of the scales' statistics. `per_scale` keeps the convolutions shared but
gives every scale its own BatchNorm (affine parameters and running statistics): each
`BatchNorm2d` of the trunk becomes a `PerScaleBatchNorm2d` whose `norms[i]` serves scale i
(state-dict keys `<bn>.norms.<i>.<param>`; `transfer.py` copies a torchvision `<bn>.<param>`
into every scale's set). With one scale, or one trunk per scale, there is nothing to split and
both settings build the same model, key for key.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.models.common import NORMALISATIONS, Preprocess, grey_conv_from

RESNET_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
BATCHNORM_MODES = ("shared", "per_scale")


def resnet_trunk(backbone: str) -> torchvision.models.ResNet:
    """A torchvision ResNet with a grey first conv and no classifier (`fc` = identity).

    Keeping torchvision's module names means ImageNet/torchvision state dicts load into the
    trunk key for key (only `fc.*` is skipped, and reported).
    """
    net = getattr(torchvision.models, backbone)(weights=None)
    net.conv1 = grey_conv_from(net.conv1)
    net.fc = nn.Identity()
    return net


class PerScaleBatchNorm2d(nn.Module):
    """One `BatchNorm2d` per scale at one place of a shared trunk: `norms[i]` serves scale i.

    Each copy has its own affine parameters and running statistics; the convolutions around it
    stay shared. Which copy applies depends on the scale being computed, so
    `MultiScaleResNet` calls `norms[i]` itself; calling this module directly is an error.
    """

    def __init__(self, bn: nn.BatchNorm2d, n_scales: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(copy.deepcopy(bn) for _ in range(n_scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "PerScaleBatchNorm2d needs a scale: MultiScaleResNet applies norms[<scale index>]"
        )


def split_batchnorm_per_scale(module: nn.Module, n_scales: int) -> None:
    """Replace every `BatchNorm2d` under `module` by a `PerScaleBatchNorm2d` (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, PerScaleBatchNorm2d(child, n_scales))
        else:
            split_batchnorm_per_scale(child, n_scales)


def _norm(bn: nn.Module, i: int) -> nn.Module:
    return bn.norms[i] if isinstance(bn, PerScaleBatchNorm2d) else bn


def _block_at_scale(block: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
    """torchvision's BasicBlock / Bottleneck forward, with scale i's BatchNorms."""
    out = block.relu(_norm(block.bn1, i)(block.conv1(x)))
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = block.relu(_norm(block.bn2, i)(block.conv2(out)))
        out = _norm(block.bn3, i)(block.conv3(out))
    else:
        out = _norm(block.bn2, i)(block.conv2(out))
    identity = x
    if block.downsample is not None:
        conv, bn = block.downsample
        identity = _norm(bn, i)(conv(x))
    out += identity
    return block.relu(out)


class MultiScaleResNet(nn.Module):
    """Multi-scale ResNet classifier; input `[B, 1, H, W]` in `[0, 1]`, output logits `[B, 14]`."""

    def __init__(
        self,
        backbone: str = "resnet18",
        scales: Sequence[int] = (224,),
        *,
        fusion: str = "concat",
        shared_trunk: bool = True,
        batchnorm: str = "shared",
        num_outputs: int = len(FINDINGS),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if backbone not in RESNET_FEATURES:
            raise ValueError(
                f"unknown backbone {backbone!r}; choose from {sorted(RESNET_FEATURES)}"
            )
        if fusion not in ("concat", "mean", "attention"):
            raise ValueError(f"unknown fusion {fusion!r}; choose from concat, mean, attention")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"unknown batchnorm {batchnorm!r}; choose from shared, per_scale")
        self.backbone = backbone
        self.scales = [int(s) for s in scales]
        self.fusion = fusion
        self.shared_trunk = bool(shared_trunk)
        self.batchnorm = batchnorm
        # Only a trunk shared by several scales has statistics to split.
        self.per_scale_bn = batchnorm == "per_scale" and self.shared_trunk and len(self.scales) > 1
        self.normalisation = dict(NORMALISATIONS["imagenet"])  # torchvision ResNet weights
        features = RESNET_FEATURES[backbone]
        mean, std = self.normalisation["mean"], self.normalisation["std"]
        self.preprocess = nn.ModuleList(Preprocess(s, mean, std) for s in self.scales)
        n_trunks = 1 if self.shared_trunk else len(self.scales)
        self.trunks = nn.ModuleList(resnet_trunk(backbone) for _ in range(n_trunks))
        if self.per_scale_bn:
            split_batchnorm_per_scale(self.trunks[0], len(self.scales))
        # One identity "tap" per scale after layer4: a shared trunk is one module called once per
        # scale, so Grad-CAM hooks on it could not tell the scales apart; the taps can.
        self.cam_taps = nn.ModuleList(nn.Identity() for _ in self.scales)
        self.attention = nn.Linear(features, 1) if fusion == "attention" else None
        head_in = features * len(self.scales) if fusion == "concat" else features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(head_in, num_outputs)

    def _trunk(self, i: int) -> torchvision.models.ResNet:
        return self.trunks[0 if self.shared_trunk else i]

    def scale_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled trunk features `[B, F]` for every scale, in `self.scales` order."""
        out = []
        for i, prep in enumerate(self.preprocess):
            t = self._trunk(i)
            h = prep(x)
            if self.per_scale_bn:
                h = t.maxpool(t.relu(_norm(t.bn1, i)(t.conv1(h))))
                for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
                    for block in layer:
                        h = _block_at_scale(block, h, i)
            else:
                h = t.maxpool(t.relu(t.bn1(t.conv1(h))))
                h = t.layer4(t.layer3(t.layer2(t.layer1(h))))
            h = self.cam_taps[i](h)
            out.append(torch.flatten(t.avgpool(h), 1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.scale_features(x)
        if self.fusion == "concat":
            fused = torch.cat(feats, dim=1)
        elif self.fusion == "mean":
            fused = torch.stack(feats, dim=1).mean(dim=1)
        else:
            stacked = torch.stack(feats, dim=1)  # [B, S, F]
            weights = torch.softmax(self.attention(stacked), dim=1)  # [B, S, 1]
            fused = (weights * stacked).sum(dim=1)
        return self.fc(self.dropout(fused))

    def cam_layers(self) -> dict[str, nn.Module]:
        """`{"scale_<s>": module}` whose output is that scale's last feature map (for Grad-CAM)."""
        return {f"scale_{s}": tap for s, tap in zip(self.scales, self.cam_taps, strict=True)}

    def head(self) -> nn.Module:
        """Classifier (+ fusion attention): what stays trainable in a frozen-trunk warm-up."""
        mods = [self.fc] + ([self.attention] if self.attention is not None else [])
        return nn.ModuleList(mods)

    def pretrained_targets(self) -> list[nn.Module]:
        """Modules that accept a torchvision-format backbone state dict (one per trunk; with
        per-scale BatchNorm, `transfer.load_state_dict_into` copies each BatchNorm tensor into
        every scale's set)."""
        return list(self.trunks)
