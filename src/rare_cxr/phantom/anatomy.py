"""Normal chest anatomy of the phantom: geometry (sampled, pixel-free) and its rendering.

Coordinates. Anatomy lives in a normalised frame: x, y in [-1, 1], x to the image's right
(the patient's left, as on a PA film), y downwards. A `Pose` maps that frame onto the written
image (zoom, rotation, shift), so lesion boxes can be computed from geometry alone — label and
box logic never needs pixels — and rendered by sampling the anatomy at inverse-mapped pixel
centres (every pixel is computed once, vectorised; nothing is drawn by loops).

Rendering produces a *density* map (roughly: how much the body attenuates; higher = whiter);
`render.py` adds lesions and turns density into an 8-bit film with exposure, gamma and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIDES = ("R", "L")  # patient right is on the image's left (x < 0)


def side_sign(side: str) -> float:
    """-1 for the patient's right lung (image left), +1 for the left lung."""
    return -1.0 if side == "R" else 1.0


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest; shared by all their follow-ups (findings may modify a copy)."""

    thorax_half_width: float  # inner rib cage, x
    body_half_width: float  # soft tissue outline (chest wall, arms)
    lung_cx: float  # |x| of each lung centre
    lung_cy: float
    lung_a: float  # half width of a lung
    lung_b: float  # half height of a lung
    dome_r: float  # y of the right hemidiaphragm dome top
    dome_l: float  # y of the left one (usually a little lower)
    dome_curve: float  # how much lower the dome is laterally
    heart_cx: float
    heart_cy: float
    ctr: float  # cardiothoracic ratio of the heart shadow, PA view (> 0.5 = cardiomegaly)
    heart_half_height: float
    rib_count: float
    rib_phase: float
    marking_freqs: tuple[float, float, float]
    marking_phases: tuple[float, float, float]
    soft_tissue: float  # body habitus: density of soft tissue
    lung_air: float  # how dark aerated lung is (emphysema: darker)
    marking_gain: float  # vascular markings strength (emphysema: fewer)


@dataclass(frozen=True)
class Pose:
    """Per-film acquisition: view, positioning, exposure. Never shared across follow-ups."""

    view: str  # "PA" or "AP"
    zoom: float
    rotation: float  # radians, anatomy -> image
    shift_x: float
    shift_y: float
    inspiration: float  # added to the domes' y (positive = shallower breath)
    exposure: float
    contrast: float
    gamma: float
    noise: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A normal chest with plausible inter-patient variation."""
    thw = rng.uniform(0.76, 0.84)
    dome_r = rng.uniform(0.50, 0.58)
    dome_l = dome_r + rng.uniform(0.02, 0.06)
    heart_half_height = rng.uniform(0.25, 0.29)
    return Anatomy(
        thorax_half_width=thw,
        body_half_width=thw + rng.uniform(0.10, 0.16),
        lung_cx=rng.uniform(0.40, 0.44),
        lung_cy=rng.uniform(0.0, 0.06),
        lung_a=rng.uniform(0.29, 0.32),
        lung_b=rng.uniform(0.82, 0.88),
        dome_r=dome_r,
        dome_l=dome_l,
        dome_curve=rng.uniform(0.10, 0.16),
        heart_cx=rng.uniform(0.08, 0.13),
        # the heart rests on the left dome (no aerated lung below it)
        heart_cy=dome_l + rng.uniform(0.10, 0.14) - heart_half_height,
        ctr=rng.uniform(0.36, 0.44),
        heart_half_height=heart_half_height,
        rib_count=rng.uniform(8.5, 10.0),
        rib_phase=rng.uniform(0, 2 * math.pi),
        marking_freqs=tuple(rng.uniform(14, 26, size=3).round(3).tolist()),
        marking_phases=tuple(rng.uniform(0, 2 * math.pi, size=3).round(4).tolist()),
        soft_tissue=rng.uniform(0.43, 0.48),
        lung_air=rng.uniform(0.22, 0.26),
        marking_gain=1.0,
    )


def sample_pose(rng: np.random.Generator, ap_probability: float = 0.4) -> Pose:
    """View and positioning of one film (AP: supine/bedside, shallower breath)."""
    view = "AP" if rng.random() < ap_probability else "PA"
    return Pose(
        view=view,
        zoom=rng.uniform(0.92, 1.02),
        rotation=math.radians(float(np.clip(rng.normal(0.0, 2.0), -6.0, 6.0))),
        shift_x=rng.uniform(-0.03, 0.03),
        shift_y=rng.uniform(-0.03, 0.03),
        inspiration=rng.normal(0.0, 0.015) + (0.04 if view == "AP" else 0.0),
        exposure=rng.normal(0.0, 0.04),
        contrast=rng.uniform(0.85, 1.15),
        gamma=rng.uniform(0.8, 1.25),
        noise=rng.uniform(0.008, 0.025),
    )


# AP films are taken with the source in front and the detector behind: the heart, anterior,
# is further from the detector and magnified (~10-15 %), the classic AP cardiomegaly pitfall.
AP_HEART_MAGNIFICATION = 1.12


def heart_half_width(anatomy: Anatomy, pose: Pose) -> float:
    """Half width of the cardiac shadow, including the AP magnification."""
    magnification = AP_HEART_MAGNIFICATION if pose.view == "AP" else 1.0
    return anatomy.ctr * anatomy.thorax_half_width * magnification


def dome_y(anatomy: Anatomy, pose: Pose, side: str) -> float:
    return (anatomy.dome_r if side == "R" else anatomy.dome_l) + pose.inspiration


def to_image(pose: Pose, x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates -> pixel coordinates of the written image (x right, y down)."""
    c, s = math.cos(pose.rotation), math.sin(pose.rotation)
    xi = pose.zoom * (c * x - s * y) + pose.shift_x
    yi = pose.zoom * (s * x + c * y) + pose.shift_y
    return (xi + 1.0) * size / 2.0, (yi + 1.0) * size / 2.0


def anatomy_grid(pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates sampled at every pixel centre (inverse of `to_image`)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    xi = centres[None, :] - np.float32(pose.shift_x)
    yi = centres[:, None] - np.float32(pose.shift_y)
    c, s = np.float32(math.cos(pose.rotation)), np.float32(math.sin(pose.rotation))
    inv = np.float32(1.0 / pose.zoom)
    x = (c * xi + s * yi) * inv
    y = (-s * xi + c * yi) * inv
    return x, y


def ramp(value: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 across `width` around value == 0: anti-aliased, cheap edges."""
    return np.clip(0.5 + value * np.float32(1.0 / width), 0.0, 1.0)


def ellipse_level(  # noqa: PLR0917 - geometry reads best positionally
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float
) -> np.ndarray:
    """1 - ((x-cx)/a)^2 - ((y-cy)/b)^2: positive inside, ~0 on the outline."""
    dx = (x - np.float32(cx)) * np.float32(1.0 / a)
    dy = (y - np.float32(cy)) * np.float32(1.0 / b)
    return 1.0 - dx * dx - dy * dy


@dataclass
class AnatomyFields:
    """What lesions need from the normal anatomy of one rendered film."""

    x: np.ndarray
    y: np.ndarray
    lungs: dict[str, np.ndarray]  # soft mask per side (aerated lung, above the dome)
    density: np.ndarray  # normal density without lung markings
    markings: dict[str, np.ndarray]  # vascular markings per side (before masking)
    pixel: float  # one pixel in anatomy units (for sharp edges)


def lung_mask(  # noqa: PLR0917
    x: np.ndarray, y: np.ndarray, anatomy: Anatomy, pose: Pose, side: str, edge: float
) -> np.ndarray:
    """Aerated lung: an ellipse cut below by a dome that dips laterally (costophrenic angle)."""
    sign = side_sign(side)
    cx = sign * anatomy.lung_cx
    level = ellipse_level(x, y, cx, anatomy.lung_cy, anatomy.lung_a, anatomy.lung_b)
    rel = (x - np.float32(cx)) * np.float32(1.0 / anatomy.lung_a)
    dome = np.float32(dome_y(anatomy, pose, side)) + np.float32(anatomy.dome_curve) * rel * rel
    return ramp(level, 0.10 + edge) * ramp(dome - y, 0.02 + edge)


def render_anatomy(anatomy: Anatomy, pose: Pose, size: int) -> AnatomyFields:
    """Density of a normal chest at `size` pixels, plus the masks lesions are placed with."""
    x, y = anatomy_grid(pose, size)
    pixel = 2.0 / (size * pose.zoom)
    f32 = np.float32
    ax = np.abs(x)

    # soft tissue: trunk and arms, neck at the top, everything below the domes is abdomen
    body = ramp(ellipse_level(x, y, 0.0, 0.08, anatomy.body_half_width, 1.05), 0.04)
    density = f32(anatomy.soft_tissue) * body

    lungs = {side: lung_mask(x, y, anatomy, pose, side, pixel) for side in SIDES}
    aerated = np.maximum(lungs["R"], lungs["L"])

    # mediastinum, aortic knob, heart: water-dense structures that displace aerated lung
    medi = ramp(0.10 - np.abs(x - f32(0.01)), 0.04) * ramp(0.45 - y, 0.2)
    knob = ramp(ellipse_level(x, y, 0.12, -0.28, 0.07, 0.06), 0.3)
    hw = heart_half_width(anatomy, pose)
    heart = ramp(
        ellipse_level(x, y, anatomy.heart_cx, anatomy.heart_cy, hw, anatomy.heart_half_height),
        0.12 + pixel,
    )
    opaque = np.maximum(np.maximum(medi, knob), heart)
    lungs = {side: mask * (1.0 - opaque) for side, mask in lungs.items()}
    density -= f32(anatomy.lung_air) * aerated * (1.0 - opaque)
    density += f32(0.16) * opaque * body

    # trachea: an air column down to the carina
    density -= f32(0.10) * ramp(0.028 - np.abs(x), 0.012) * ramp(-0.30 - y, 0.05) * body

    # spine through the mediastinum, faint vertebral rhythm
    vertebrae = 0.75 + 0.25 * np.cos(y * f32(2 * math.pi * 7.5))
    density += f32(0.09) * ramp(0.065 - ax, 0.02) * vertebrae * body

    # posterior ribs: arches falling laterally, spacing widening downwards; anterior fainter
    cage = (
        ramp(anatomy.thorax_half_width - ax, 0.03)
        * ramp(0.72 - y, 0.1)
        * ramp(ax - 0.06, 0.03)
        * ramp(y + 0.86, 0.05)
        * body
    )
    curve = y + f32(0.12) * ax - f32(0.35) * ax * ax
    u = np.clip((curve + f32(0.95)) * f32(1.0 / 1.75), 0.0, 1.0)
    phase = f32(anatomy.rib_count) * np.sqrt(u)
    posterior = np.clip(np.cos(f32(2 * math.pi) * phase + f32(anatomy.rib_phase)) - 0.45, 0, None)
    anterior_curve = y - f32(0.35) * ax
    anterior = np.clip(np.cos(anterior_curve * f32(2 * math.pi * 4.2)) - 0.55, 0, None)
    density += cage * (f32(0.2) * posterior + f32(0.07) * anterior)

    # clavicles
    clav_y = -0.66 + 0.12 * (ax - 0.15) - 0.15 * (ax - 0.3) ** 2
    clavicle = ramp(0.022 - np.abs(y - clav_y), 0.01 + pixel) * ramp(0.58 - ax, 0.04)
    density += f32(0.14) * clavicle * ramp(ax - 0.06, 0.02)

    markings = {}
    for side in SIDES:
        hx = side_sign(side) * 0.17
        dx, dy = x - f32(hx), y - f32(0.02)
        theta = np.arctan2(dy, dx * f32(side_sign(side)))
        r = np.sqrt(dx * dx + dy * dy)
        f1, f2, f3 = anatomy.marking_freqs
        p1, p2, p3 = anatomy.marking_phases
        bend = f32(4.0) * np.sin(r * f32(9.0) + f32(p3))  # vessels curve and branch
        wave = (
            np.cos(f32(f1 * 0.6) * theta + f32(p1) + bend)
            + np.cos(f32(f2 * 0.6) * theta + f32(p2) - f32(1.3) * bend)
            + np.cos(f32(f3) * theta + f32(p3) + f32(14.0) * r)
        )
        taper = np.exp(-r * f32(2.5)) * ramp(r - f32(0.06), 0.08)
        markings[side] = np.clip(wave - f32(1.2), 0, None) * taper

    return AnatomyFields(
        x=x, y=y, lungs=lungs, density=density, markings=markings, pixel=float(pixel)
    )
