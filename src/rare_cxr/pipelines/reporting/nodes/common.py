"""What several reporting node modules share: inputs keyed by model, the device, the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def by_model(inputs: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """`{model: value}` of the keyword inputs named `<model>__<kind>` (the combined nodes get
    every model's output that way, so a row is labelled by the namespace that produced it)."""
    return {k.rsplit("__", 1)[0]: v for k, v in inputs.items() if k.endswith(f"__{kind}")}


def model_name(checkpoint: Mapping[str, Any]) -> str:
    """The namespace a checkpoint was trained in (`model_spec.name`)."""
    return str(checkpoint.get("metadata", {}).get("model_spec", {}).get("name", "model"))


def resolve_device(name: str) -> str:
    """`auto` = cuda when available, else cpu (Grad-CAM over every boxed image and the cost
    measurement of a study want the GPU it trained on; conf/nih uses auto)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_model(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    """The checkpoint's model in eval mode (through the training pipeline's one loader)."""
    from rare_cxr.pipelines.training.nodes import load_checkpoint_model

    return load_checkpoint_model(checkpoint).eval()
