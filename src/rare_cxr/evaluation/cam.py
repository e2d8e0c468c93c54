"""Grad-CAM (Selvaraju et al. 2017) on the layers each model names in `model.cam_layers()`.

Why per layer: the multi-scale model exposes one tap per scale, so a reader sees *where each
scale looks* -- the question a multi-scale design raises -- instead of one blended map.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rare_cxr.evaluation import localisation
from rare_cxr.evaluation.metrics import from_json_number
from rare_cxr.findings import FINDINGS
from rare_cxr.progress import progress


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


# --- Grad-CAM over the test images of the image cache (the reporting nodes' work) -------------

BOX_BATCH = 16  # boxed images per Grad-CAM pass (one finding at a time)


def localisation_records(
    model: nn.Module,
    name: str,
    test: Any,
    *,
    boxes: pd.DataFrame,
    sizes: pd.DataFrame,
    device: str,
) -> list[dict[str, Any]]:
    """One record per (boxed test image, box, CAM layer): pointing-game hit and in-box energy.

    `test` is the image cache's test split (`.images`, `.table`); `boxes` the parsed BBox list
    (original pixels), already restricted to images of `test`; `sizes` the image index by
    image id (original width and height, to rescale each box to the cache's pixels)."""
    position = {i: k for k, i in enumerate(test.table["image_id"].astype(str))}
    patient_of = dict(
        zip(test.table["image_id"].astype(str), test.table["patient_id"], strict=True)
    )
    records: list[dict[str, Any]] = []
    with progress(total=len(boxes), desc=f"{name} localisation Grad-CAM", unit="box") as bar:
        for finding, part in boxes.groupby("finding", sort=True):
            rows = list(part.itertuples(index=False))
            for start in range(0, len(rows), BOX_BATCH):  # batched Grad-CAM
                chunk = rows[start : start + BOX_BATCH]
                images = np.stack(
                    [np.asarray(test.images[position[str(r.image_id)]]) for r in chunk]
                )
                x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].to(device)
                maps = grad_cam(model, x, FINDINGS.index(str(finding)))
                for k, r in enumerate(chunk):
                    records += _box_records(
                        name,
                        str(finding),
                        r,
                        maps=maps,
                        k=k,
                        sizes=sizes,
                        shape=images.shape[1:],
                        patient_of=patient_of,
                    )
                bar.update(len(chunk))
    return records


def _box_records(
    name: str,
    finding: str,
    r: Any,
    *,
    maps: dict[str, torch.Tensor],
    k: int,
    sizes: pd.DataFrame,
    shape: tuple[int, ...],
    patient_of: dict[str, Any],
) -> list[dict[str, Any]]:
    """The records of one box `r` (k-th image of the batch), one per CAM layer."""
    width = float(sizes.loc[str(r.image_id), "width"])
    height = float(sizes.loc[str(r.image_id), "height"])
    box = localisation.rescale_box((r.x, r.y, r.w, r.h), (width, height), shape)
    out = []
    for layer, m in maps.items():
        heat = m[k].detach().cpu().numpy()
        out.append(
            {
                "model": name,
                "layer": layer,
                "finding": finding,
                "image_id": str(r.image_id),
                "patient_id": patient_of[str(r.image_id)],
                "hit": localisation.pointing_hit(heat, box),
                "energy": localisation.energy_in_box(heat, box),
            }
        )
    return out


def select_examples(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: Mapping[str, Any],
    *,
    findings: Sequence[str],
    available: Container[str],
    per_finding: int,
) -> list[tuple[str, float, pd.Series]]:
    """(finding, threshold, prediction row) of the best-scored test true positives of each of
    `findings` among the image ids in `available`, chosen before any Grad-CAM runs.

    `predictions` are the primary seed's test rows with text image ids."""
    truth = labels.set_index(labels["image_id"].astype(str))
    selected = []
    for finding in findings:
        t = from_json_number(thresholds.get(finding))
        if math.isnan(t):
            continue
        positive = truth.loc[predictions["image_id"], finding].to_numpy() == 1
        hits = predictions[positive & (predictions[finding].to_numpy() >= t)]
        hits = hits[hits["image_id"].isin(available)].nlargest(int(per_finding), finding)
        selected += [(finding, t, hit) for _, hit in hits.iterrows()]
    return selected


def example_rows(
    model: nn.Module,
    name: str,
    test: Any,
    *,
    selected: Sequence[tuple[str, float, pd.Series]],
    boxes: pd.DataFrame,
    sizes: pd.DataFrame,
    device: str,
) -> list[dict[str, Any]]:
    """The panels of the Grad-CAM figure (`figures.gradcam_panel`): per selected example the
    cached image, one map per CAM layer, its box (rescaled to the cache) and a title."""
    position = {str(i): k for k, i in enumerate(test.table["image_id"].astype(str))}
    rows = []
    with progress(total=len(selected), desc=f"{name} Grad-CAM examples", unit="img") as bar:
        for finding, t, hit in selected:
            img = np.asarray(test.images[position[hit["image_id"]]])
            x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None].to(device)
            maps = grad_cam(model, x, FINDINGS.index(finding))
            rows.append(
                {
                    "image": img,
                    "maps": {n: m[0].cpu().numpy() for n, m in maps.items()},
                    "box": _example_box(hit["image_id"], finding, img.shape, boxes, sizes),
                    "title": f"{finding} p={hit[finding]:.2f} (t={t:.2f})\n{hit['image_id']}",
                }
            )
            bar.update()
    return rows


def _example_box(
    image_id: str, finding: str, shape: tuple[int, ...], boxes: pd.DataFrame, sizes: pd.DataFrame
) -> tuple[float, float, float, float] | None:
    """The first box of `finding` on the image, in the cached image's pixels (or None)."""
    b = boxes[(boxes["image_id"] == image_id) & (boxes["finding"] == finding)]
    if not len(b) or image_id not in sizes.index:
        return None
    scale_x = shape[1] / float(sizes.loc[image_id, "width"])
    scale_y = shape[0] / float(sizes.loc[image_id, "height"])
    r = b.iloc[0]
    return (r["x"] * scale_x, r["y"] * scale_y, r["w"] * scale_x, r["h"] * scale_y)
