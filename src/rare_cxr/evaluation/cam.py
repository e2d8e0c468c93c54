"""Grad-CAM (Selvaraju et al. 2017) on the layers each model names in `model.cam_layers()`.

Why per layer: the multi-scale model exposes one tap per scale, so a reader sees *where each
scale looks* -- the question a multi-scale design raises -- instead of one blended map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(
    model: nn.Module, images: torch.Tensor, class_index: int | Sequence[int] | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Class-activation maps `{layer name: [B, H, W]}` in [0, 1], at the input resolution.

    `class_index` is one class for the whole batch, or one per image: several findings of one
    image are then one batched pass (the same image repeated) instead of one pass each; in
    eval mode the images of a batch do not influence each other's maps.

    Map = ReLU(sum_k mean_spatial(d score / d A_k) * A_k), upsampled bilinearly and divided by
    its per-image maximum (all-zero maps stay zero). Hooks clone the activation so in-place
    ops after the layer (VGG's and DenseNet's in-place ReLU) cannot corrupt the gradient.
    """
    layers = model.cam_layers()
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            acts[name] = output
            return output.clone()

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().float()
            logits = model(x)
            index = torch.as_tensor(class_index, device=logits.device).long()
            if index.ndim == 0:
                index = index.expand(len(logits))
            score = logits.gather(1, index.view(-1, 1)).sum()
            names = list(acts)
            grads = torch.autograd.grad(score, [acts[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    for name, act, maybe_grad in zip(names, (acts[n] for n in names), grads, strict=True):
        grad = torch.zeros_like(act) if maybe_grad is None else maybe_grad
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        cam = cam.clamp_min(0)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        out[name] = cam / peak
    return out
