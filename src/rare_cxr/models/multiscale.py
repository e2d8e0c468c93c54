"""The paper's multi-scale ResNet: image pyramid, ResNet trunk, fused features, one head.

Each configured scale s gives I_s = resize(image, s); each I_s goes through a ResNet trunk
(one shared trunk by default -- same weights for every scale, as in the paper's figure -- or one
trunk per scale), global-average-pooled features are fused (concatenation by default, mean or a
learned softmax attention over scales as options) and a linear head gives one logit per finding.

With a single scale and concatenation the model *is* a torchvision ResNet classifier (trunk,
pool, `fc`) with a grey first convolution -- the ablation `resnet_single_scale` relies on that,
and `tests/test_models.py` checks it logit for logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.models.common import Preprocess, grey_conv_from

RESNET_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def resnet_trunk(backbone: str) -> torchvision.models.ResNet:
    """A torchvision ResNet with a grey first conv and no classifier (`fc` = identity).

    Keeping torchvision's module names means ImageNet/torchvision state dicts load into the
    trunk key for key (only `fc.*` is skipped, and reported).
    """
    net = getattr(torchvision.models, backbone)(weights=None)
    net.conv1 = grey_conv_from(net.conv1)
    net.fc = nn.Identity()
    return net


class MultiScaleResNet(nn.Module):
    """Multi-scale ResNet classifier; input `[B, 1, H, W]` in `[0, 1]`, output logits `[B, 14]`."""

    def __init__(
        self,
        backbone: str = "resnet18",
        scales: Sequence[int] = (224,),
        *,
        fusion: str = "concat",
        shared_trunk: bool = True,
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
        self.backbone = backbone
        self.scales = [int(s) for s in scales]
        self.fusion = fusion
        self.shared_trunk = bool(shared_trunk)
        features = RESNET_FEATURES[backbone]
        self.preprocess = nn.ModuleList(Preprocess(s) for s in self.scales)
        n_trunks = 1 if self.shared_trunk else len(self.scales)
        self.trunks = nn.ModuleList(resnet_trunk(backbone) for _ in range(n_trunks))
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
        """Modules that accept a torchvision-format backbone state dict (one per trunk)."""
        return list(self.trunks)
