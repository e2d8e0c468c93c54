"""`build_model(spec)`: one entry point for every architecture, with spec validation.

A spec is the plain dict of `params:<model>.model`:

    name: multiscale_resnet       # the model's name (namespace); names resume state and errors
    architecture: multiscale_resnet | vgg16 | inception_v3 | densenet121 | efficientnet_b0
    backbone: resnet18|34|50|101  # multiscale_resnet only
    scales: [64, 128]             # pyramid sizes (px); baselines use exactly one
    fusion: concat|mean|attention # multiscale_resnet only
    shared_trunk: true            # multiscale_resnet only
    batchnorm: shared|per_scale   # multiscale_resnet only: BatchNorm of a shared trunk
    batchnorm_momentum: 0.5       # optional, not vgg16: momentum of BatchNorm running stats
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
from typing import Annotated, Any, Literal

import torchvision
from pydantic import Field, model_validator
from torch import nn

from rare_cxr.findings import FINDINGS
from rare_cxr.models.common import NORMALISATIONS, Preprocess, grey_conv_from
from rare_cxr.models.multiscale import BATCHNORM_MODES, RESNET_FEATURES, MultiScaleResNet
from rare_cxr.parameters import KeyProblem, ParameterError, Params, check
from rare_cxr.training.config import TrainingOverrides

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
    # would need its own loss term, and ImageNet weights load fine without it (the file's
    # AuxLogits.* keys are listed as "unexpected (not in model)" in the load report).
    # init_weights=False avoids scipy's slow truncated-normal init.
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


ScaleList = Annotated[list[Annotated[int, Field(gt=0)]], Field(strict=False, min_length=1)]
MULTISCALE_ONLY = ("backbone", "fusion", "shared_trunk", "batchnorm")
# torchvision's plain VGG16 (no `_bn`): a `batchnorm_momentum` there would silently do nothing
WITHOUT_BATCHNORM = ("vgg16",)


class ModelSpec(Params):
    """`params:<model>.model`: what to build (see the module doc and parameters_training.yml).

    `training` holds the model's exceptions to the shared `training` block (merged key by key,
    see `rare_cxr.pipelines.training.nodes.split_training_overrides`).
    """

    name: str = Field(min_length=1)
    architecture: Literal[ARCHITECTURES]  # type: ignore[valid-type]
    scales: ScaleList = Field(default_factory=lambda: [224])
    backbone: Literal[BACKBONES] | None = None  # type: ignore[valid-type]
    fusion: Literal[FUSIONS] | None = None  # type: ignore[valid-type]
    shared_trunk: bool | None = None
    batchnorm: Literal[BATCHNORM_MODES] | None = None  # type: ignore[valid-type]
    # Momentum of every BatchNorm layer's running statistics (PyTorch's convention: the weight of
    # the newest batch); None = the architecture's own (0.1 for every torchvision model here).
    # See docs/training.md, "BatchNorm running statistics in a short training".
    batchnorm_momentum: float | None = Field(None, gt=0.0, le=1.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    pretrained: str = Field("none", min_length=1)  # none | imagenet | /path/to/state_dict.pt
    training: TrainingOverrides | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            data.setdefault("name", data.get("architecture"))  # direct calls (tests, bench)
            if "pretrained" in data and data["pretrained"] is None:
                data["pretrained"] = "none"
        return data

    @model_validator(mode="after")
    def _architecture_keys(self) -> ModelSpec:
        arch = self.architecture
        if self.batchnorm_momentum is not None and arch in WITHOUT_BATCHNORM:
            raise KeyProblem("batchnorm_momentum", f"{arch} has no BatchNorm layer")
        if arch == "multiscale_resnet":
            return self
        for key in MULTISCALE_ONLY:
            if key in self.model_fields_set:
                raise KeyProblem(key, f"only used by multiscale_resnet, not {arch}")
        if len(self.scales) != 1:
            raise KeyProblem("scales", f"{arch} takes exactly one scale, got {self.scales}")
        minimum = MIN_INPUT.get(arch, 1)
        if self.scales[0] < minimum:
            raise KeyProblem(
                "scales", f"{arch} needs inputs of at least {minimum} px, got {self.scales[0]}"
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        """The plain spec every reader uses (checkpoint metadata, training fingerprint):
        the multi-scale keys only for multiscale_resnet, defaults filled in, no overrides."""
        out: dict[str, Any] = {
            "name": self.name,
            "architecture": self.architecture,
            "scales": list(self.scales),
        }
        if self.architecture == "multiscale_resnet":
            out.update(
                backbone=self.backbone or "resnet18",
                fusion=self.fusion or "concat",
                shared_trunk=True if self.shared_trunk is None else self.shared_trunk,
                batchnorm=self.batchnorm or "shared",
            )
        if self.batchnorm_momentum is not None:
            # only when set: a spec without it keeps its training fingerprint (resume, reuse)
            out["batchnorm_momentum"] = float(self.batchnorm_momentum)
        out.update(dropout=float(self.dropout), pretrained=self.pretrained)
        return out


def spec_where(spec: Any) -> str:
    """`<name>.model`: where a spec lives in the parameters (its namespace = its name)."""
    if isinstance(spec, ModelSpec):
        return f"{spec.name}.model"
    name = spec.get("name", spec.get("architecture")) if isinstance(spec, Mapping) else None
    return f"{name}.model" if name else "model"


def validate_model_spec(spec: Mapping[str, Any] | ModelSpec) -> dict[str, Any]:
    """Check a model spec and fill defaults; errors name the offending key (`<name>.model.x`).

    Called by the training node before any data is touched, so a typo in `backbone` fails in
    a second rather than after the image cache has been read. A `training:` block of overrides
    is checked but not returned (see `ModelSpec.training`).
    """
    if not isinstance(spec, Mapping | ModelSpec):
        raise ParameterError(
            f"model: expected a mapping of model parameters, got {type(spec).__name__}"
        )
    return check(ModelSpec, spec, spec_where(spec)).as_dict()


def set_batchnorm_momentum(model: nn.Module, momentum: float) -> int:
    """Set the running-statistics momentum of every BatchNorm layer of `model`; returns how many.

    Why a model-wide knob: eval mode (validation, early stopping, prediction) normalises with the
    running statistics, which start at mean 0 / variance 1 and move towards the batch statistics
    by `momentum` per training step. A short training (the phantom: 8 steps per epoch) with
    layers whose activations are far from variance 1 at initialisation ends an epoch with
    statistics that still mostly reflect the initial values (docs/training.md).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


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
    if spec.get("batchnorm_momentum") is not None:
        set_batchnorm_momentum(model, spec["batchnorm_momentum"])
    model.spec = spec  # plain dict: goes into checkpoint metadata
    if load_weights and spec["pretrained"] != "none":
        from rare_cxr.models.transfer import load_pretrained

        load_pretrained(model, spec)
    return model
