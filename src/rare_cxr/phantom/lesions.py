"""The 14 findings: each has its own visual signature *and its own spatial scale*.

That range of scales is the point of the phantom as a multi-scale test bed: a Nodule is a
few pixels wide at 256 px (gone at 64 px), a Mass is ten times larger, Effusion, Cardiomegaly
and Emphysema change whole regions, and Fibrosis/Infiltration live in fine texture.

Each finding is a `FindingModel` with four parts, kept apart so that labels and boxes can be
produced without pixels:

* `sample(rng, anatomy)`: the lesion's geometry (plain numbers, anatomy frame);
* `modify(anatomy, lesion)`: findings that *are* anatomy (big heart, hyperinflation, volume
  loss) change a copy of the patient's anatomy before rendering;
* `box(lesion, anatomy, pose)`: its extent in the anatomy frame (for BBox_List_2017.csv);
* `render(lesion, ctx)`: what it adds to the density map (and to the lung-marking gain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from rare_cxr.findings import FINDINGS
from rare_cxr.phantom.anatomy import (
    SIDES,
    Anatomy,
    AnatomyFields,
    Pose,
    dome_y,
    ellipse_level,
    heart_half_width,
    ramp,
    side_sign,
)

f32 = np.float32
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in the anatomy frame


@dataclass(frozen=True)
class Lesion:
    """One planted finding: its name and geometry (anatomy frame, pixel-free)."""

    finding: str
    side: str = "R"
    geometry: dict[str, float] = field(default_factory=dict)


@dataclass
class RenderContext:
    """Per-film state lesions draw into."""

    fields: AnatomyFields
    anatomy: Anatomy
    pose: Pose
    rng: np.random.Generator
    size: int
    density: np.ndarray  # lesions add here
    marking_gain: np.ndarray  # multiplies the vascular markings (pneumothorax: 0)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (~unit std): a cells x cells random grid upsampled bicubically."""
    cells = max(2, int(cells))
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def disc(  # noqa: PLR0917 - geometry reads best positionally
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float
) -> np.ndarray:
    """Soft-edged ellipse, edge width in anatomy units (a pixel or two: sharp)."""
    dx = (x - f32(cx)) * f32(1.0 / rx)
    dy = (y - f32(cy)) * f32(1.0 / ry)
    return ramp((1.0 - np.sqrt(dx * dx + dy * dy)) * f32(min(rx, ry)), edge)


def _point_in_lung(
    rng: np.random.Generator, anatomy: Anatomy, side: str, zone: tuple[float, float]
) -> tuple[float, float]:
    """A point inside one lung; `zone` is the (top, bottom) fraction of the lung height."""
    sign = side_sign(side)
    top = anatomy.lung_cy - anatomy.lung_b * 0.75
    bottom = anatomy.dome_r if side == "R" else anatomy.dome_l
    fy = rng.uniform(*zone)
    y = top + fy * (bottom - 0.08 - top)
    x = sign * (anatomy.lung_cx + rng.uniform(-0.55, 0.55) * anatomy.lung_a)
    return float(x), float(y)


def _lung_extent(anatomy: Anatomy, pose: Pose, side: str) -> Box:
    sign = side_sign(side)
    inner = sign * (anatomy.lung_cx - anatomy.lung_a)
    outer = sign * (anatomy.lung_cx + anatomy.lung_a)
    top = anatomy.lung_cy - anatomy.lung_b
    bottom = dome_y(anatomy, pose, side) + anatomy.dome_curve
    return min(inner, outer), top, max(inner, outer), bottom


def _union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _rotated_ellipse_box(cx: float, cy: float, rx: float, ry: float, angle: float) -> Box:
    c, s = math.cos(angle), math.sin(angle)
    hx = math.hypot(rx * c, ry * s)
    hy = math.hypot(rx * s, ry * c)
    return cx - hx, cy - hy, cx + hx, cy + hy


class FindingModel:
    """Default: a localized lesion with no anatomy change (subclasses override)."""

    name: str = ""

    def sample(self, rng: np.random.Generator, anatomy: Anatomy) -> Lesion:
        raise NotImplementedError

    def modify(self, anatomy: Anatomy, lesion: Lesion) -> Anatomy:
        return anatomy

    def box(self, lesion: Lesion, anatomy: Anatomy, pose: Pose) -> Box:
        g = lesion.geometry
        return g["cx"] - g["rx"], g["cy"] - g["ry"], g["cx"] + g["rx"], g["cy"] + g["ry"]

    def render(self, lesion: Lesion, ctx: RenderContext) -> None:
        raise NotImplementedError


def _side(rng: np.random.Generator) -> str:
    return SIDES[int(rng.integers(2))]


class Nodule(FindingModel):
    """Tiny, sharp, dense round opacity: 2-4 px across at 256 px, below resolution at 64."""

    name = "Nodule"

    def sample(self, rng, anatomy):
        side = _side(rng)
        cx, cy = _point_in_lung(rng, anatomy, side, (0.1, 0.85))
        r = rng.uniform(0.011, 0.018)
        return Lesion(self.name, side, {"cx": cx, "cy": cy, "rx": r, "ry": r})

    def render(self, lesion, ctx):
        g, px = lesion.geometry, ctx.fields.pixel
        spot = disc(ctx.fields.x, ctx.fields.y, g["cx"], g["cy"], g["rx"], g["ry"], px)
        ctx.density += f32(0.34) * spot


class Mass(FindingModel):
    """Larger (> 3 cm) lobulated opacity with a fairly sharp margin."""

    name = "Mass"

    def sample(self, rng, anatomy):
        side = _side(rng)
        cx, cy = _point_in_lung(rng, anatomy, side, (0.1, 0.75))
        r = rng.uniform(0.06, 0.10)
        return Lesion(
            self.name,
            side,
            {
                "cx": cx,
                "cy": cy,
                "rx": r * 1.2,
                "ry": r * 1.2,
                "r": r,
                "p1": rng.uniform(0, 2 * math.pi),
                "p2": rng.uniform(0, 2 * math.pi),
            },
        )

    def render(self, lesion, ctx):
        g = lesion.geometry
        dx, dy = ctx.fields.x - f32(g["cx"]), ctx.fields.y - f32(g["cy"])
        rho = np.sqrt(dx * dx + dy * dy)
        ang = np.arctan2(dy, dx)
        outline = f32(g["r"]) * (
            1.0 + 0.13 * np.cos(3 * ang + f32(g["p1"])) + 0.08 * np.cos(5 * ang + f32(g["p2"]))
        )
        ctx.density += f32(0.28) * ramp(outline - rho, 0.008 + ctx.fields.pixel)


class Effusion(FindingModel):
    """Fluid layering at the lung base: meniscus rising laterally, blunted costophrenic angle."""

    name = "Effusion"

    def sample(self, rng, anatomy):
        return Lesion(
            self.name,
            _side(rng),
            {"height": rng.uniform(0.12, 0.32), "meniscus": rng.uniform(0.06, 0.14)},
        )

    def _level(self, lesion, anatomy, pose) -> float:
        return dome_y(anatomy, pose, lesion.side) - lesion.geometry["height"]

    def box(self, lesion, anatomy, pose):
        x0, _, x1, bottom = _lung_extent(anatomy, pose, lesion.side)
        top = self._level(lesion, anatomy, pose) - lesion.geometry["meniscus"]
        return x0, top, x1, bottom

    def render(self, lesion, ctx):
        a, g = ctx.anatomy, lesion.geometry
        sign = side_sign(lesion.side)
        rel = np.clip((ctx.fields.x - f32(sign * a.lung_cx)) * f32(sign / a.lung_a), 0, 1.3)
        surface = f32(self._level(lesion, a, ctx.pose)) - f32(g["meniscus"]) * rel * rel
        fluid = ramp(ctx.fields.y - surface, 0.04)
        hemithorax = ramp(
            ellipse_level(
                ctx.fields.x,
                ctx.fields.y,
                sign * a.lung_cx,
                a.lung_cy,
                a.lung_a * 1.08,
                a.lung_b * 1.08,
            ),
            0.1,
        )
        lung = ctx.fields.lungs[lesion.side]
        ctx.density += fluid * (f32(a.lung_air * 0.9) * lung + f32(0.04) * hemithorax)
        ctx.marking_gain *= 1.0 - fluid * lung


class Pneumothorax(FindingModel):
    """Air between lung and chest wall: no lung markings apically/laterally, a pleural line."""

    name = "Pneumothorax"

    def sample(self, rng, anatomy):
        return Lesion(self.name, _side(rng), {"collapse": rng.uniform(0.15, 0.32)})

    def _collapsed(self, lesion: Lesion, a: Anatomy) -> tuple[float, float, float, float]:
        c = lesion.geometry["collapse"]
        sign = side_sign(lesion.side)
        a2, b2 = a.lung_a * (1 - 0.6 * c), a.lung_b * (1 - c)
        cx = sign * (a.lung_cx - 0.9 * (a.lung_a - a2))  # medial edge stays (hilum)
        cy = a.lung_cy + 0.9 * (a.lung_b - b2)  # base stays
        return cx, cy, a2, b2

    def box(self, lesion, anatomy, pose):
        x0, top, x1, _ = _lung_extent(anatomy, pose, lesion.side)
        _, cy, _, b2 = self._collapsed(lesion, anatomy)
        return x0, top, x1, min(cy + 0.2 * b2, dome_y(anatomy, pose, lesion.side))

    def render(self, lesion, ctx):
        cx, cy, a2, b2 = self._collapsed(lesion, ctx.anatomy)
        x, y = ctx.fields.x, ctx.fields.y
        lung = ctx.fields.lungs[lesion.side]
        dx, dy = (x - f32(cx)) * f32(1 / a2), (y - f32(cy)) * f32(1 / b2)
        rho = np.sqrt(dx * dx + dy * dy)
        pleural_space = ramp((rho - 1.0) * f32(min(a2, b2)), 0.004 + ctx.fields.pixel) * lung
        line = ramp(0.004 + ctx.fields.pixel - np.abs(rho - 1.0) * f32(min(a2, b2)), 0.004)
        upper = ramp(f32(cy + 0.4 * b2) - y, 0.1)  # the line shows at the apex and laterally
        ctx.marking_gain *= 1.0 - pleural_space
        ctx.density += f32(0.12) * line * lung * upper - f32(0.07) * pleural_space


class Cardiomegaly(FindingModel):
    """Enlarged cardiac silhouette: cardiothoracic ratio 0.54-0.66 (> 0.5) on a PA film."""

    name = "Cardiomegaly"

    def sample(self, rng, anatomy):
        return Lesion(self.name, "L", {"ctr": rng.uniform(0.54, 0.66)})

    def modify(self, anatomy, lesion):
        hh = anatomy.heart_half_height * 1.15  # grows up and out, still resting on the dome
        return replace(
            anatomy,
            ctr=lesion.geometry["ctr"],
            heart_half_height=hh,
            heart_cy=anatomy.heart_cy - (hh - anatomy.heart_half_height),
        )

    def box(self, lesion, anatomy, pose):
        hw = heart_half_width(anatomy, pose)
        hh = anatomy.heart_half_height
        return (
            anatomy.heart_cx - hw,
            anatomy.heart_cy - hh,
            anatomy.heart_cx + hw,
            anatomy.heart_cy + hh,
        )

    def render(self, lesion, ctx):
        return None  # the anatomy change is the finding


class Atelectasis(FindingModel):
    """Plate-like (discoid) linear opacity at a base with volume loss: raised hemidiaphragm."""

    name = "Atelectasis"

    def sample(self, rng, anatomy):
        side = _side(rng)
        cx, cy = _point_in_lung(rng, anatomy, side, (0.7, 0.95))
        return Lesion(
            self.name,
            side,
            {
                "cx": cx,
                "cy": cy,
                "length": rng.uniform(0.10, 0.16),
                "thickness": rng.uniform(0.014, 0.024),
                "angle": rng.uniform(-0.35, 0.35),
            },
        )

    def modify(self, anatomy, lesion):
        key = "dome_r" if lesion.side == "R" else "dome_l"
        return replace(anatomy, **{key: getattr(anatomy, key) - 0.06})

    def box(self, lesion, anatomy, pose):
        g = lesion.geometry
        return _rotated_ellipse_box(
            g["cx"], g["cy"], g["length"] * 1.3, g["thickness"] * 3, g["angle"]
        )

    def render(self, lesion, ctx):
        g = lesion.geometry
        c, s = math.cos(g["angle"]), math.sin(g["angle"])
        dx, dy = ctx.fields.x - f32(g["cx"]), ctx.fields.y - f32(g["cy"])
        u = (c * dx + s * dy) * f32(1 / g["length"])
        v = (-s * dx + c * dy) * f32(1 / g["thickness"])
        band = ramp(1.0 - np.sqrt(u * u + v * v), 0.15)
        haze = ramp(1.0 - np.sqrt(u * u * 0.6 + v * v * 0.08), 0.5)
        lung = ctx.fields.lungs[lesion.side]
        ctx.density += (f32(0.26) * band + f32(0.07) * haze) * lung


class Consolidation(FindingModel):
    """Dense, homogeneous, lobar opacity bounded by the lung, with dark air bronchograms."""

    name = "Consolidation"

    def sample(self, rng, anatomy):
        side = _side(rng)
        cx, cy = _point_in_lung(rng, anatomy, side, (0.15, 0.8))
        return Lesion(
            self.name,
            side,
            {
                "cx": cx,
                "cy": cy,
                "rx": rng.uniform(0.12, 0.18),
                "ry": rng.uniform(0.12, 0.2),
                "phase": rng.uniform(0, 2 * math.pi),
            },
        )

    def render(self, lesion, ctx):
        g = lesion.geometry
        x, y = ctx.fields.x, ctx.fields.y
        level = ellipse_level(x, y, g["cx"], g["cy"], g["rx"], g["ry"])
        wobble = smooth_noise(ctx.rng, ctx.size, 10)
        region = ramp(level + f32(0.25) * wobble, 0.15) * ctx.fields.lungs[lesion.side]
        theta = np.arctan2(y - f32(g["cy"]), x - f32(g["cx"]))
        bronchi = np.clip(np.cos(f32(7.0) * theta + f32(g["phase"])) - 0.9, 0, None) * f32(10)
        inner = ramp(level - 0.35, 0.2)
        ctx.density += region * (f32(0.27) - f32(0.08) * bronchi * inner)
        ctx.marking_gain *= 1.0 - region


class Pneumonia(FindingModel):
    """Patchy, fluffy, ill-defined airspace opacities clustered in one (mostly lower) zone."""

    name = "Pneumonia"

    def sample(self, rng, anatomy):
        side = _side(rng)
        cx, cy = _point_in_lung(rng, anatomy, side, (0.4, 0.9))
        sigma = rng.uniform(0.09, 0.13)
        return Lesion(
            self.name, side, {"cx": cx, "cy": cy, "rx": 2 * sigma, "ry": 2 * sigma, "sigma": sigma}
        )

    def render(self, lesion, ctx):
        g = lesion.geometry
        dx, dy = ctx.fields.x - f32(g["cx"]), ctx.fields.y - f32(g["cy"])
        envelope = np.exp((dx * dx + dy * dy) * f32(-0.5 / g["sigma"] ** 2))
        patches = np.clip(smooth_noise(ctx.rng, ctx.size, 18) * 0.7 + 0.6, 0, 1)
        ctx.density += f32(0.3) * envelope * patches * ctx.fields.lungs[lesion.side]


class Infiltration(FindingModel):
    """Hazy, ill-defined increase in density with a fine reticulonodular texture."""

    name = "Infiltration"

    def sample(self, rng, anatomy):
        side = _side(rng)
        cx, cy = _point_in_lung(rng, anatomy, side, (0.1, 0.7))
        return Lesion(
            self.name,
            side,
            {"cx": cx, "cy": cy, "rx": rng.uniform(0.13, 0.2), "ry": rng.uniform(0.16, 0.26)},
        )

    def render(self, lesion, ctx):
        g = lesion.geometry
        level = ellipse_level(ctx.fields.x, ctx.fields.y, g["cx"], g["cy"], g["rx"], g["ry"])
        region = ramp(level, 0.8) * ctx.fields.lungs[lesion.side]
        fine = np.clip(smooth_noise(ctx.rng, ctx.size, max(8, ctx.size // 5)), 0, None)
        ctx.density += region * (f32(0.09) + f32(0.08) * fine)


class Edema(FindingModel):
    """Bilateral perihilar 'bat-wing' haze, Kerley B lines at the bases, engorged vessels."""

    name = "Edema"

    def sample(self, rng, anatomy):
        return Lesion(self.name, "B", {"sigma": rng.uniform(0.15, 0.2)})

    def box(self, lesion, anatomy, pose):
        r, l_ = _lung_extent(anatomy, pose, "R"), _lung_extent(anatomy, pose, "L")
        both = _union(r, l_)
        return both[0], anatomy.lung_cy - 0.45, both[2], both[3]

    def render(self, lesion, ctx):
        a, x, y = ctx.anatomy, ctx.fields.x, ctx.fields.y
        sigma = lesion.geometry["sigma"]
        for side in SIDES:
            sign = side_sign(side)
            dx, dy = x - f32(sign * 0.22), (y - f32(0.05)) * f32(0.75)
            wing = np.exp((dx * dx + dy * dy) * f32(-0.5 / sigma**2))
            lateral = ramp(np.abs(x) - f32(a.lung_cx + 0.5 * a.lung_a), 0.02)
            base = ramp(y - f32(dome_y(a, ctx.pose, side) - 0.28), 0.05)
            kerley = np.clip(np.cos(y * f32(2 * math.pi * 24)) - 0.75, 0, None) * f32(4)
            lung = ctx.fields.lungs[side]
            ctx.density += lung * (f32(0.22) * wing + f32(0.08) * kerley * lateral * base)
        ctx.marking_gain *= f32(1.5)


class Emphysema(FindingModel):
    """Hyperinflated, hyperlucent lungs: flat low domes, narrow heart, sparse vessels, bullae."""

    name = "Emphysema"

    def sample(self, rng, anatomy):
        n = int(rng.integers(1, 4))
        g: dict[str, float] = {"n_bullae": float(n)}
        for i in range(n):
            side = _side(rng)
            cx, cy = _point_in_lung(rng, anatomy, side, (0.0, 0.35))
            g.update({f"bx{i}": cx, f"by{i}": cy, f"br{i}": rng.uniform(0.04, 0.07)})
        return Lesion(self.name, "B", g)

    def modify(self, anatomy, lesion):
        return replace(
            anatomy,
            lung_a=anatomy.lung_a * 1.04,
            lung_b=anatomy.lung_b * 1.07,
            dome_r=anatomy.dome_r + 0.08,
            dome_l=anatomy.dome_l + 0.08,
            dome_curve=anatomy.dome_curve * 0.3,
            ctr=anatomy.ctr * 0.88,
            lung_air=anatomy.lung_air + 0.07,
            marking_gain=anatomy.marking_gain * 0.4,
        )

    def box(self, lesion, anatomy, pose):
        return _union(_lung_extent(anatomy, pose, "R"), _lung_extent(anatomy, pose, "L"))

    def render(self, lesion, ctx):
        g, x, y = lesion.geometry, ctx.fields.x, ctx.fields.y
        lungs = np.maximum(ctx.fields.lungs["R"], ctx.fields.lungs["L"])
        for i in range(int(g["n_bullae"])):
            cx, cy, r = g[f"bx{i}"], g[f"by{i}"], g[f"br{i}"]
            inside = disc(x, y, cx, cy, r, r, 0.006 + ctx.fields.pixel)
            wall = disc(x, y, cx, cy, r + 0.006, r + 0.006, ctx.fields.pixel) - inside
            ctx.density += lungs * (f32(0.06) * wall - f32(0.06) * inside)
            ctx.marking_gain *= 1.0 - inside


class Fibrosis(FindingModel):
    """Coarse reticular (net-like) pattern, peripheral and basal, both lungs, volume loss."""

    name = "Fibrosis"

    def sample(self, rng, anatomy):
        return Lesion(self.name, "B", {"extent": rng.uniform(0.45, 0.7)})

    def modify(self, anatomy, lesion):
        return replace(
            anatomy,
            dome_r=anatomy.dome_r - 0.05,
            dome_l=anatomy.dome_l - 0.05,
            lung_b=anatomy.lung_b * 0.96,
        )

    def box(self, lesion, anatomy, pose):
        both = _union(_lung_extent(anatomy, pose, "R"), _lung_extent(anatomy, pose, "L"))
        top = both[3] - lesion.geometry["extent"] * (both[3] - both[1]) - 0.1
        return both[0], top, both[2], both[3]

    def render(self, lesion, ctx):
        a, x, y = ctx.anatomy, ctx.fields.x, ctx.fields.y
        lungs = np.maximum(ctx.fields.lungs["R"], ctx.fields.lungs["L"])
        bottom = max(dome_y(a, ctx.pose, "R"), dome_y(a, ctx.pose, "L"))
        top = bottom - lesion.geometry["extent"] * (bottom - (a.lung_cy - a.lung_b))
        basal = ramp(y - f32(top), 0.25)
        peripheral = ramp(np.abs(x) - f32(a.lung_cx - 0.2 * a.lung_a), 0.2)
        n = smooth_noise(ctx.rng, ctx.size, max(8, ctx.size // 4))
        net = np.clip(1.0 - np.abs(n) * f32(2.5), 0, None)
        ctx.density += (f32(0.16) * net + f32(0.03)) * basal * peripheral * lungs


class PleuralThickening(FindingModel):
    """A dense band lining the lung edge: apical cap or along the lateral chest wall."""

    name = "Pleural_Thickening"

    def sample(self, rng, anatomy):
        return Lesion(
            self.name,
            _side(rng),
            {"thickness": rng.uniform(0.03, 0.05), "apical": float(rng.random() < 0.5)},
        )

    def box(self, lesion, anatomy, pose):
        x0, top, x1, bottom = _lung_extent(anatomy, pose, lesion.side)
        if lesion.geometry["apical"]:
            return x0, top, x1, anatomy.lung_cy - 0.45 * anatomy.lung_b
        sign = side_sign(lesion.side)
        inner = sign * anatomy.lung_cx
        outer = sign * (anatomy.lung_cx + anatomy.lung_a)
        return min(inner, outer), anatomy.lung_cy - 0.6 * anatomy.lung_b, max(inner, outer), bottom

    def render(self, lesion, ctx):
        a, g, x, y = ctx.anatomy, lesion.geometry, ctx.fields.x, ctx.fields.y
        sign = side_sign(lesion.side)
        dx = (x - f32(sign * a.lung_cx)) * f32(1 / a.lung_a)
        dy = (y - f32(a.lung_cy)) * f32(1 / a.lung_b)
        depth = (1.0 - np.sqrt(dx * dx + dy * dy)) * f32(a.lung_a)  # ~distance inside the edge
        above_dome = ramp(f32(dome_y(a, ctx.pose, lesion.side)) - y, 0.03)
        band = ramp(f32(g["thickness"]) - depth, 0.01) * ramp(depth + 0.01, 0.01) * above_dome
        if g["apical"]:
            where = ramp(f32(a.lung_cy - 0.45 * a.lung_b) - y, 0.05)
        else:
            where = ramp(dx * f32(sign) - 0.2, 0.1) * ramp(y - f32(a.lung_cy - 0.6 * a.lung_b), 0.1)
        ctx.density += f32(0.22) * band * where


class Hernia(FindingModel):
    """Hiatal hernia: a round retrocardiac opacity with an air-fluid level above the diaphragm."""

    name = "Hernia"

    def sample(self, rng, anatomy):
        r = rng.uniform(0.07, 0.1)
        return Lesion(
            self.name,
            "L",
            {
                "cx": rng.uniform(0.0, 0.08),
                "cy": anatomy.heart_cy + rng.uniform(0.02, 0.08),
                "rx": r,
                "ry": r * 0.85,
                "fluid": rng.uniform(0.2, 0.6),
            },
        )

    def render(self, lesion, ctx):
        g, px = lesion.geometry, ctx.fields.pixel
        x, y = ctx.fields.x, ctx.fields.y
        sac = disc(x, y, g["cx"], g["cy"], g["rx"], g["ry"], 0.004 + px)
        wall = disc(x, y, g["cx"], g["cy"], g["rx"] + 0.008, g["ry"] + 0.008, px) - sac
        level = g["cy"] + g["ry"] * (1 - 2 * g["fluid"])
        air = ramp(f32(level) - y, px)
        ctx.density += f32(0.12) * wall + sac * (f32(0.08) - f32(0.3) * air)


MODELS: dict[str, FindingModel] = {
    m.name: m
    for m in (
        Atelectasis(),
        Cardiomegaly(),
        Consolidation(),
        Edema(),
        Effusion(),
        Emphysema(),
        Fibrosis(),
        Hernia(),
        Infiltration(),
        Mass(),
        Nodule(),
        PleuralThickening(),
        Pneumonia(),
        Pneumothorax(),
    )
}
if tuple(sorted(MODELS)) != tuple(sorted(FINDINGS)):  # pragma: no cover - import-time guard
    raise RuntimeError("phantom lesion models do not cover rare_cxr.findings.FINDINGS exactly")
