"""Pixels: one `ImagePlan` -> an 8-bit grayscale film, and its lesion boxes in pixels.

Rendering is a handful of whole-array numpy operations on float32 grids (no per-pixel Python),
about 10-20 ms for a 256 px film on one core; each film has its own seeded generator, so the
bytes do not depend on the order films are rendered in.
"""

from __future__ import annotations

import numpy as np

from rare_cxr.phantom.anatomy import SIDES, render_anatomy, to_image
from rare_cxr.phantom.cohort import ImagePlan, render_seed_key
from rare_cxr.phantom.lesions import MODELS, RenderContext, smooth_noise

f32 = np.float32
MARKING_DENSITY = 0.09  # how white vascular markings are


def render_image(plan: ImagePlan, size: int) -> np.ndarray:
    """The film as a `uint8 [size, size]` array (0 = black = air, 255 = bone/metal)."""
    rng = np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=render_seed_key(plan)))
    fields = render_anatomy(plan.anatomy, plan.pose, size)
    ctx = RenderContext(
        fields=fields,
        anatomy=plan.anatomy,
        pose=plan.pose,
        rng=rng,
        size=size,
        density=fields.density.copy(),
        marking_gain=np.ones((size, size), dtype=np.float32),
    )
    for lesion in plan.lesions:
        MODELS[lesion.finding].render(lesion, ctx)

    markings = sum(fields.markings[s] * fields.lungs[s] for s in SIDES)
    mottle = smooth_noise(rng, size, max(8, size // 8))
    density = (
        ctx.density
        + f32(MARKING_DENSITY * plan.anatomy.marking_gain) * markings * ctx.marking_gain
        + f32(0.012) * mottle
    )

    pose = plan.pose
    film = (density + f32(pose.exposure - 0.02)) * f32(1.2 * pose.contrast)
    film = np.clip(film, 0.0, 1.0) ** f32(pose.gamma)
    # quantum noise (fine) and a slow exposure gradient across the detector (heel effect)
    film += f32(pose.noise) * rng.standard_normal((size, size), dtype=np.float32)
    film += f32(0.03) * smooth_noise(rng, size, 3)
    return (np.clip(film, 0.0, 1.0) * f32(255.0) + f32(0.5)).astype(np.uint8)


def lesion_boxes(plan: ImagePlan, size: int) -> list[tuple[str, float, float, float, float]]:
    """`(finding, x, y, w, h)` in pixels of the written image, one per planted finding,
    clipped to the image (the anatomy box's corners mapped through the film's pose)."""
    boxes = []
    for lesion in plan.lesions:
        x0, y0, x1, y1 = MODELS[lesion.finding].box(lesion, plan.anatomy, plan.pose)
        xs, ys = to_image(plan.pose, np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]), size)
        left, right = float(np.clip(xs.min(), 0, size)), float(np.clip(xs.max(), 0, size))
        top, bottom = float(np.clip(ys.min(), 0, size)), float(np.clip(ys.max(), 0, size))
        boxes.append((lesion.finding, left, top, right - left, bottom - top))
    return boxes
