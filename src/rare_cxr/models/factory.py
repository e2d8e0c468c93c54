"""`build_model(spec)`: one entry point for every architecture, with spec validation.

A spec is the plain dict of `params:<model>.model`:

    name: multiscale_resnet       # the model's name (namespace); names resume state and errors
    architecture: multiscale_resnet | vgg16 | inception_v3 | densenet121 | efficientnet_b0
    backbone: resnet18|34|50|101  # multiscale_resnet only
    scales: [64, 128]             # pyramid sizes (px); baselines use exactly one
    fusion: concat|mean|attention # multiscale_resnet only
    shared_trunk: true            # multiscale_resnet only
    batchnorm: shared|per_scale   # multiscale_resnet only: BatchNorm of a shared trunk
    dropout: 0.0                  # before the classifier
    pretrained: none | imagenet | /path/to/state_dict.pt

Baselines are torchvision networks with a grey first convolution and a 14-way head, wrapped in
`SingleScaleNet` so they share the multi-scale model's input contract.

Every model normalises its grey input with the statistics its architecture's pretrained weights
were trained with (`ARCHITECTURE_NORMALISATION`, values in `common.NORMALISATIONS`) and exposes
them as `model.normalisation` (recorded in the checkpoint metadata).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torchvision
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.models.common import NORMALISATIONS, Preprocess, grey_conv_from
from rare_cxr.models.multiscale import BATCHNORM_MODES, RESNET_FEATURES, MultiScaleResNet

logger = logging.getLogger(__name__)

BACKBONES = tuple(RESNET_FEATURES)
FUSIONS = ("concat", "mean", "attention")
# architecture -> key of common.NORMALISATIONS: the statistics of its torchvision weights.
ARCHITECTURE_NORMALISATION = {
    "multiscale_resnet": "imagenet",
    "vgg16": "imagenet",
    "inception_v3": "inception",
    "densenet121": "imagenet",
    "efficientnet_b0": "imagenet",
}
# The ImageNet grey statistics (ResNet, VGG16, DenseNet121, EfficientNet-B0); kept for old
# readers. A model's own statistics are `model.normalisation` / `normalisation_for(arch)`.
NORMALISATION = NORMALISATIONS["imagenet"]
# torchvision's Inception-v3 downsamples 5 times with valid padding: below 75 px it fails.
MIN_INPUT = {"inception_v3": 75, "vgg16": 32}


class SingleScaleNet(nn.Module):
    """A torchvision classifier behind the project's input contract (grey `[0,1]`, any size)."""

    def __init__(
        self,
        net: nn.Module,
        scale: int,
        cam_layer: str,
        head_path: str,
        normalisation: Mapping[str, Any] = NORMALISATION,
    ) -> None:
        super().__init__()
        if getattr(net, "transform_input", False):
            # torchvision's Inception re-normalises inside forward when transform_input is on;
            # with our Preprocess that would normalise twice.
            raise ValueError("build Inception-v3 with transform_input=False: Preprocess normalises")
        self.normalisation = dict(normalisation)
        self.preprocess = Preprocess(scale, normalisation["mean"], normalisation["std"])
        self.net = net
        self.scales = [int(scale)]
        self._cam_layer = cam_layer
        self._head_path = head_path

    def forward(self, x):
        out = self.net(self.preprocess(x))
        # Inception-v3 in training mode returns (logits, aux_logits) when built with its aux
        # head; we build it without, but keep this guard for state dicts that bring one back.
        return out.logits if hasattr(out, "logits") else out

    def cam_layers(self) -> dict[str, nn.Module]:
        return {self._cam_layer: self.net.get_submodule(self._cam_layer)}

    def head(self) -> nn.Module:
        return self.net.get_submodule(self._head_path)

    def pretrained_targets(self) -> list[nn.Module]:
        return [self.net]


def _vgg16() -> nn.Module:
    net = torchvision.models.vgg16(weights=None)
    net.features[0] = grey_conv_from(net.features[0])
    net.classifier[6] = nn.Linear(net.classifier[6].in_features, len(FINDINGS))
    return net


def _inception_v3() -> nn.Module:
    # Built without the auxiliary head: it only exists to help 2015-era training from scratch,
    # would need its own loss term, and ImageNet weights load fine without it (AuxLogits.* keys
    # are reported as skipped). init_weights=False avoids scipy's slow truncated-normal init.
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, transform_input=False
    )
    net.Conv2d_1a_3x3.conv = grey_conv_from(net.Conv2d_1a_3x3.conv)
    net.fc = nn.Linear(net.fc.in_features, len(FINDINGS))
    return net


def _densenet121() -> nn.Module:
    net = torchvision.models.densenet121(weights=None)
    net.features.conv0 = grey_conv_from(net.features.conv0)
    net.classifier = nn.Linear(net.classifier.in_features, len(FINDINGS))
    return net


def _efficientnet_b0() -> nn.Module:
    net = torchvision.models.efficientnet_b0(weights=None)
    net.features[0][0] = grey_conv_from(net.features[0][0])
    net.classifier[1] = nn.Linear(net.classifier[1].in_features, len(FINDINGS))
    return net


def normalisation_for(architecture: str) -> dict[str, Any]:
    """The input normalisation of `architecture` (a copy of its `common.NORMALISATIONS` entry)."""
    return dict(NORMALISATIONS[ARCHITECTURE_NORMALISATION[architecture]])


# architecture -> (constructor, Grad-CAM layer, classifier path)
BASELINES: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "vgg16": (_vgg16, "features.29", "classifier.6"),
    "inception_v3": (_inception_v3, "Mixed_7c", "fc"),
    "densenet121": (_densenet121, "features.norm5", "classifier"),
    "efficientnet_b0": (_efficientnet_b0, "features.8", "classifier.1"),
}
ARCHITECTURES = ("multiscale_resnet", *BASELINES)


def validate_model_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a model spec and fill defaults; errors name the offending key.

    Called by the training node before any data is touched, so a typo in `backbone` fails in
    a second rather than after the image cache has been read.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"model: expected a mapping of model parameters, got {type(spec).__name__}"
        )
    known = {
        "name",
        "architecture",
        "backbone",
        "scales",
        "fusion",
        "shared_trunk",
        "batchnorm",
        "dropout",
        "pretrained",
    }
    unknown = sorted(set(spec) - known)
    arch = spec.get("architecture")
    name = str(spec.get("name", arch))
    where = f"{name}.model"
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{where}.architecture: unknown architecture {arch!r}; "
            f"choose from {list(ARCHITECTURES)}"
        )
    out: dict[str, Any] = {"name": name, "architecture": arch}
    scales = spec.get("scales", [224])
    if (
        not isinstance(scales, list | tuple)
        or not scales
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in scales)
    ):
        raise ValueError(
            f"{where}.scales: expected a non-empty list of positive integers, got {scales!r}"
        )
    out["scales"] = [int(s) for s in scales]
    if arch == "multiscale_resnet":
        backbone = spec.get("backbone", "resnet18")
        if backbone not in BACKBONES:
            raise ValueError(
                f"{where}.backbone: unknown backbone {backbone!r}; choose from {list(BACKBONES)}"
            )
        fusion = spec.get("fusion", "concat")
        if fusion not in FUSIONS:
            raise ValueError(
                f"{where}.fusion: unknown fusion {fusion!r}; choose from {list(FUSIONS)}"
            )
        shared = spec.get("shared_trunk", True)
        if not isinstance(shared, bool):
            raise ValueError(f"{where}.shared_trunk: expected true or false, got {shared!r}")
        batchnorm = spec.get("batchnorm", "shared")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(
                f"{where}.batchnorm: unknown mode {batchnorm!r}; "
                f"choose from {list(BATCHNORM_MODES)}"
            )
        out.update(backbone=backbone, fusion=fusion, shared_trunk=shared, batchnorm=batchnorm)
    else:
        for key in ("backbone", "fusion", "shared_trunk", "batchnorm"):
            if key in spec:
                raise ValueError(f"{where}.{key}: only used by multiscale_resnet, not {arch}")
        if len(out["scales"]) != 1:
            raise ValueError(f"{where}.scales: {arch} takes exactly one scale, got {out['scales']}")
        minimum = MIN_INPUT.get(arch, 1)
        if out["scales"][0] < minimum:
            raise ValueError(
                f"{where}.scales: {arch} needs inputs of at least {minimum} px, "
                f"got {out['scales'][0]}"
            )
    dropout = spec.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{where}.dropout: expected a number in [0, 1), got {dropout!r}")
    out["dropout"] = float(dropout)
    pretrained = spec.get("pretrained", "none")
    if pretrained is None:
        pretrained = "none"
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(
            f"{where}.pretrained: expected 'none', 'imagenet' or a file path, got {pretrained!r}"
        )
    out["pretrained"] = pretrained
    return out


def build_model(spec: Mapping[str, Any], load_weights: bool = True) -> nn.Module:
    """Build the model a spec describes; `load_weights=False` skips `pretrained` (for reloads).

    Returns a module with input `[B, 1, H, W]` in `[0, 1]`, output logits `[B, 14]`,
    `.scales`, `.normalisation`, `.cam_layers()`, `.head()` and `.pretrained_targets()`.
    """
    spec = validate_model_spec(spec)
    arch = spec["architecture"]
    if arch == "multiscale_resnet":
        model: nn.Module = MultiScaleResNet(
            backbone=spec["backbone"],
            scales=spec["scales"],
            fusion=spec["fusion"],
            shared_trunk=spec["shared_trunk"],
            batchnorm=spec["batchnorm"],
            dropout=spec["dropout"],
        )
    else:
        ctor, cam, head = BASELINES[arch]
        net = ctor()
        if spec["dropout"] > 0 and arch in ("inception_v3", "densenet121"):
            head_module = net.get_submodule(head)
            net.set_submodule(head, nn.Sequential(nn.Dropout(spec["dropout"]), head_module))
            head = f"{head}.1"
        model = SingleScaleNet(net, spec["scales"][0], cam, head, normalisation_for(arch))
    model.spec = spec  # plain dict: goes into checkpoint metadata
    if load_weights and spec["pretrained"] != "none":
        from rare_cxr.models.transfer import load_pretrained

        load_pretrained(model, spec)
    return model
