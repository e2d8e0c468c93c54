"""Transfer learning: ImageNet or file weights into any factory model, saying what loaded.

Partial loads are the normal case here (a 1000-way ImageNet head never fits a 14-way head, an
RGB first conv is folded to grey), so every load returns a `LoadReport` listing loaded, adapted,
skipped (shape mismatch), unexpected and missing keys, and logs it: a silent partial load is how
"pre-trained" models quietly train from scratch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

# torchvision weight enums used for `pretrained: imagenet` (DEFAULT = best published weights).
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "vgg16": "VGG16_Weights",
    "inception_v3": "Inception_V3_Weights",
    "densenet121": "DenseNet121_Weights",
    "efficientnet_b0": "EfficientNet_B0_Weights",
}
# Old DenseNet checkpoints name layers 'norm.1' where the module is now 'norm1' (torchvision
# applies the same rename in its own loader).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# A per-scale BatchNorm (`multiscale.PerScaleBatchNorm2d`) stores scale i's copy of the
# BatchNorm `<bn>` as `<bn>.norms.<i>.<param>`.
_PER_SCALE_BN = re.compile(
    r"^(?P<bn>.+)\.norms\.\d+\.(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)$"
)


@dataclass
class LoadReport:
    """What a state-dict load did, key by key."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # RGB first conv summed to grey
    per_scale: list[str] = field(default_factory=list)  # one BatchNorm copied to every scale
    skipped: list[str] = field(default_factory=list)  # present in both, shapes differ
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    missing: list[str] = field(default_factory=list)  # in the model, not in the file

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.adapted:
            parts.append(f"adapted RGB->grey: {few(self.adapted)}")
        if self.per_scale:
            parts.append(f"BatchNorm copied into every scale's set: {few(self.per_scale)}")
        if self.skipped:
            parts.append(f"skipped (shape mismatch): {few(self.skipped)}")
        if self.unexpected:
            parts.append(f"unexpected (not in model): {few(self.unexpected)}")
        if self.missing:
            parts.append(f"missing (kept initial values): {few(self.missing)}")
        return "; ".join(parts)


def expand_per_scale_batchnorm(
    state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map one-BatchNorm-per-layer weights onto a model with per-scale BatchNorm.

    A torchvision (or shared-BatchNorm rare-cxr) state dict has `<bn>.<param>`; a per-scale
    model has `<bn>.norms.<i>.<param>` for every scale i. Each such model key that the state
    dict lacks receives the tensor `<bn>.<param>`, so every scale starts from the same
    pretrained BatchNorm (affine parameters and running statistics); the source key is then
    consumed (not reported as unexpected). Returns (state dict, model keys filled this way).
    """
    out = dict(state_dict)
    filled, used = [], set()
    for key in model_keys:
        match = _PER_SCALE_BN.match(key)
        if match is None or key in state_dict:
            continue
        source = f"{match['bn']}.{match['param']}"
        if source in state_dict:
            out[key] = state_dict[source]
            filled.append(key)
            used.add(source)
    for source in used:
        del out[source]
    return out, filled


def load_state_dict_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy every tensor whose name and shape fit; fold 3-channel first convs into 1 channel;
    copy a single BatchNorm into every scale's set of a per-scale-BatchNorm trunk."""
    report = LoadReport()
    own = module.state_dict()
    state_dict, per_scale = expand_per_scale_batchnorm(state_dict, own)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if not isinstance(value, torch.Tensor):
            report.skipped.append(key)
        elif value.shape == target.shape:
            to_load[key] = value
            report.loaded.append(key)
        elif (
            value.dim() == 4
            and target.dim() == 4
            and value.shape[1] == 3
            and target.shape[1] == 1
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            to_load[key] = value.sum(dim=1, keepdim=True)
            report.loaded.append(key)
            report.adapted.append(key)
        else:
            report.skipped.append(key)
    report.missing = [k for k in own if k not in to_load]
    report.per_scale = [k for k in per_scale if k in to_load]
    module.load_state_dict(to_load, strict=False)
    return report


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `arch`, from the torch hub cache (downloading if online).

    Offline, the error names the exact file to place in the cache, so an air-gapped GPU box can
    be prepared by copying one file.
    """
    if arch not in IMAGENET_WEIGHTS:
        raise ValueError(
            f"no ImageNet weights known for {arch!r}; known: {sorted(IMAGENET_WEIGHTS)}"
        )
    weights = getattr(torchvision.models, IMAGENET_WEIGHTS[arch]).DEFAULT
    filename = Path(weights.url).name
    expected = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        state = torch.hub.load_state_dict_from_url(
            weights.url, progress=False, check_hash=False, weights_only=True, map_location="cpu"
        )
    except Exception as err:
        raise RuntimeError(
            f"could not load ImageNet weights for {arch}: {type(err).__name__}: {err}. "
            f"Without internet, download {weights.url} elsewhere and place it at {expected} "
            f"(the torch hub cache; TORCH_HOME moves it), or set pretrained: none / a file path."
        ) from err
    if arch == "densenet121":
        for key in list(state):
            match = _DENSENET_KEY.match(key)
            if match:
                state[match.group(1) + match.group(2)] = state.pop(key)
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain `{name: tensor}` or a project checkpoint's `state_dict`.

    Loaded with `weights_only=True`: a weight file can never execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict ({{name: tensor}})")
    return dict(obj)


def load_pretrained(model: nn.Module, spec: Mapping[str, Any]) -> LoadReport:
    """Apply `spec["pretrained"]` (imagenet or a path) to a factory model; return what loaded.

    The weights go to whichever target matches the most keys: the whole model (a checkpoint of
    this project, e.g. a stage-1 or another run's model) or each backbone (a torchvision /
    ImageNet state dict, loaded into every trunk of a per-scale multi-scale model).
    """
    source = spec["pretrained"]
    if source == "imagenet":
        arch = spec["architecture"]
        state = imagenet_state_dict(spec["backbone"] if arch == "multiscale_resnet" else arch)
        targets = list(model.pretrained_targets())
    else:
        state = read_state_dict(source)
        whole = set(model.state_dict())
        backbone_keys = set(model.pretrained_targets()[0].state_dict())

        def fits(keys: set[str]) -> int:  # counted after the per-scale BatchNorm mapping
            return len(keys & set(expand_per_scale_batchnorm(state, keys)[0]))

        targets = (
            [model] if fits(whole) >= fits(backbone_keys) else list(model.pretrained_targets())
        )
    reports = [load_state_dict_into(t, state) for t in targets]
    report = reports[0]
    if not report.loaded:
        raise ValueError(
            f"{spec.get('name')}.model.pretrained: no tensor of {source!r} fits the model "
            f"({report.summary()})"
        )
    logger.info("pretrained weights %s -> %s: %s", source, spec.get("name"), report.summary())
    return report
