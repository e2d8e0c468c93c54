"""Nodes of the `augmentation` pipeline (see docs/augmentation.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from pydantic import Field

from rare_cxr.augment import AugmentationPolicy, BatchAugmenter, validate_policy
from rare_cxr.image_cache import (
    ImageCache,
    ImageCacheParams,
    ImageCachePlan,
    plan_image_cache,
    validate_cache_params,
)
from rare_cxr.parameters import Params, check
from rare_cxr.pipelines.data_processing.validation import ImageParams, check_image_params

logger = logging.getLogger(__name__)


def build_image_cache(
    splits: pd.DataFrame,
    image_index: pd.DataFrame,
    labels: pd.DataFrame,
    params: ImageCacheParams,
    image_params: ImageParams,
) -> ImageCachePlan:
    """Plan the decode-once cache: which `ok` images of each split, their labels, the size.

    Returns a plan, not pixels: `ImageCacheDataset.save` executes it in place (atomically,
    with a process pool, skipping the work when an up-to-date cache exists), so the node
    stays a pure function and tens of gigabytes never pass through memory or pickle.
    Images the index marks `missing`/`corrupt`, or that it does not list, are recorded in
    the cache's `skipped.csv`, as are files that fail to decode during the build.
    """
    size, workers = validate_cache_params(params)
    # the same pixel limit as the image index (data_processing.images.max_image_pixels), so an
    # image the index accepted is never refused here
    max_pixels = check_image_params(image_params)["max_image_pixels"]
    plan = plan_image_cache(
        splits, image_index, labels, size=size, workers=workers, max_image_pixels=max_pixels
    )
    for split in plan.splits:
        logger.info("image cache plan: %s: %d images at %d px", split.name, len(split.paths), size)
    if len(plan.skipped):
        logger.warning(
            "image cache plan: %d image(s) skipped before decoding: %s",
            len(plan.skipped),
            plan.skipped["reason"].value_counts().to_dict(),
        )
    return plan


def build_augmentation(params: AugmentationPolicy) -> dict[str, Any]:
    """Validate `params:augmentation` into the complete policy dict the trainer uses."""
    policy = validate_policy(params)
    BatchAugmenter(policy)  # fail here, not in epoch 1, if the policy cannot be built
    if policy["hflip_probability"] > 0:
        logger.warning(
            "augmentation.hflip_probability=%s: horizontal flips put the heart on the right, "
            "an anatomy (dextrocardia) the model should not learn as normal",
            policy["hflip_probability"],
        )
    return policy


class PreviewParams(Params):
    """`params:augmentation_preview` (conf/base/parameters_augmentation.yml)."""

    # which cached split and row to show (another split is used if the cache lacks it)
    split: str = "train"
    index: int = Field(0, ge=0)
    draws: int = Field(8, ge=0)
    seed: int = Field(0, ge=0)
    # the image is also shown at these sizes (px)
    scales: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)


def _validate_preview(params: Mapping[str, Any] | PreviewParams) -> dict[str, Any]:
    return check(PreviewParams, params, "augmentation_preview").model_dump()


def preview_augmentation(
    augmentation_policy: dict[str, Any], image_cache: ImageCache, params: PreviewParams
) -> Figure:
    """One training image, a grid of augmented draws, and the original at every scale.

    Lets a radiologist check that the policy produces plausible films (no cropped-off
    lungs, no burnt-out contrast) before hours of training.
    """
    p = _validate_preview(params)
    split_name = p["split"] if p["split"] in image_cache.split_names else image_cache.split_names[0]
    split = image_cache.split(split_name)
    if len(split) == 0:
        raise ValueError(f"augmentation_preview: image cache split {split_name!r} is empty")
    index = min(p["index"], len(split) - 1)
    image = np.asarray(split.images[index])
    image_id = split.table["image_id"].iloc[index]

    augmenter = BatchAugmenter(augmentation_policy)
    batch = torch.from_numpy(image.astype(np.float32) / 255.0)[None, None].repeat(
        p["draws"], 1, 1, 1
    )
    generator = torch.Generator().manual_seed(p["seed"])
    draws = augmenter(batch, generator=generator)[:, 0].numpy()

    scales = p["scales"] or [image_cache.size]
    columns = max(4, len(scales) + 1)
    rows_draws = -(-p["draws"] // columns) if p["draws"] else 0
    figure = Figure(figsize=(2.4 * columns, 2.6 * (1 + rows_draws)), layout="constrained")
    axes = figure.subplots(1 + rows_draws, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title(f"{image_id}\ncache {image_cache.size}px", fontsize=8)
    for col, scale in enumerate(scales, start=1):
        if col >= columns:
            break
        resized = Image.fromarray(image).resize((scale, scale), Image.Resampling.BILINEAR)
        axes[0, col].imshow(np.asarray(resized), cmap="gray", vmin=0, vmax=255)
        axes[0, col].set_title(f"scale {scale}px", fontsize=8)
    for i, draw in enumerate(draws):
        ax = axes[1 + i // columns, i % columns]
        ax.imshow(draw, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"draw {i + 1}", fontsize=8)
    state = "enabled" if augmenter.enabled else "disabled (identity)"
    figure.suptitle(f"augmentation preview: {split_name} image, policy {state}", fontsize=10)
    return figure
