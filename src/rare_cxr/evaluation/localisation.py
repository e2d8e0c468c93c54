"""Does a Grad-CAM map point at the finding? Measured on *every* boxed test image.

The Grad-CAM figure shows one hand-picked true positive per finding, which can only illustrate;
NIH's `BBox_List_2017.csv` (984 radiologist boxes on 880 test images) allows a measurement. Two
standard, complementary scores per (image, box, model, CAM layer):

* pointing game (Zhang et al. 2016): is the map's maximum inside the box? Robust to the map's
  spread, blind to everything but the peak;
* energy in box (the "energy-based pointing game" of Score-CAM, Wang et al. 2020): the share of
  the map's mass inside the box. Sensitive to spread, so a map that lights up the whole chest
  scores the box's area fraction, not 1.

Pixel membership (one rule for both scores): the box `(x, y, w, h)` is in the map's pixel
coordinates, pixel column `c` covering `[c, c + 1)`. A pixel is inside when the box overlaps
it at all, i.e. columns `floor(x) .. ceil(x + w) - 1` inclusive (rows alike), clipped to the
map. Why generous: after rescaling a 1024-px box to a 32-px cache a box edge usually falls
inside a pixel, and a map at that resolution cannot say on which side of the edge its peak is.
A zero-width box still covers the one pixel its edge lies in.

The headline hit rate is hits / ALL boxes of the group: a map that cannot point (all zero, or
non-finite: "undecided") counts as a miss. Such maps come mostly from images the model missed
(Grad-CAM's ReLU leaves nothing when no channel argues for the class), so leaving them out of
the denominator would score a model on the images it already found. The rate among decided
boxes follows as a second number (`hit_rate_decided`), with the count of undecided boxes.

Intervals come from the same patient bootstrap as the classification metrics (`bootstrap.py`):
images of a patient -- and the boxes of an image -- move together.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from rare_cxr.evaluation.bootstrap import patient_weights, percentile_interval
from rare_cxr.findings import FINDINGS, finding_index

Box = tuple[float, float, float, float]

RECORD_COLUMNS = ("model", "layer", "finding", "image_id", "patient_id", "hit", "energy")
GROUP_COLUMNS = ("model", "layer", "finding")
SUMMARY_COLUMNS = (
    "model",
    "layer",
    "finding",
    "n_boxes",
    "n_images",
    "hit_rate",
    "hit_ci_low",
    "hit_ci_high",
    "energy",
    "energy_ci_low",
    "energy_ci_high",
    "undecided",
    # additive (issue 18): the hit rate among decided boxes only, after the headline
    "hit_rate_decided",
)


def rescale_box(
    box_xywh: Sequence[float], original_wh: Sequence[float], target_hw: Sequence[int]
) -> Box:
    """A box in original-image pixels -> the same box in a `target_hw` image (cache pixels).

    The rule of `cam.gradcam_example_rows`: x and w scale by target width / original
    width, y and h by target height / original height (NIH films are not all square, caches
    are). Note the argument orders: NIH states sizes as (width, height), arrays as (H, W).
    """
    x, y, w, h = (float(v) for v in box_xywh)
    width, height = (float(v) for v in original_wh)
    if not (width > 0 and height > 0):
        raise ValueError(f"original image size must be positive, got {tuple(original_wh)!r}")
    scale_x = float(target_hw[1]) / width
    scale_y = float(target_hw[0]) / height
    return (x * scale_x, y * scale_y, w * scale_x, h * scale_y)


def box_slices(box: Sequence[float], shape: Sequence[int]) -> tuple[slice, slice]:
    """(row slice, column slice) of the pixels a box overlaps, clipped to `shape` (H, W).

    See the module docstring for the rule; a box wholly outside the map gives empty slices.
    """
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        raise ValueError(f"box (x, y, w, h) must be finite with w, h >= 0, got {tuple(box)!r}")

    def span(start: float, length: float, size: int) -> slice:
        first = math.floor(start)
        last = max(first, math.ceil(start + length) - 1)
        return slice(max(first, 0), max(min(last, size - 1) + 1, 0))

    return span(y, h, int(shape[0])), span(x, w, int(shape[1]))


def _map(cam: np.ndarray | object) -> np.ndarray:
    if hasattr(cam, "detach"):  # a torch tensor: no torch import needed here
        cam = cam.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(cam, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D map [H, W], got shape {arr.shape}")
    return arr


def pointing_hit(cam: np.ndarray, box: Sequence[float]) -> bool | None:
    """Is the map's maximum inside the box? None when the map cannot point.

    Ties: True when *any* maximal pixel is inside. Why: Grad-CAM maps are upsampled from 7-32 px
    activations and divided by their maximum, so plateaus of equal maxima are common; picking
    one tied pixel (first in memory order, as `argmax` would) would make the score depend on
    the box's position in raster order rather than on the map.

    None (undecided): a map with a non-finite value, or with no positive value (all zero --
    Grad-CAM's ReLU returns that when no channel argues for the class). Such a map has no peak
    to point with: `localisation_summary` counts it as a miss in the headline hit rate and
    leaves it out of the "decided only" rate, and counts it (`undecided`), so "looked
    elsewhere" and "looked nowhere" stay distinguishable.
    """
    m = _map(cam)
    if m.size == 0 or not np.isfinite(m).all() or not (m > 0).any():
        return None
    rows, cols = box_slices(box, m.shape)
    inside = m[rows, cols]
    return bool(inside.size and (inside == m.max()).any())


def energy_in_box(cam: np.ndarray, box: Sequence[float]) -> float:
    """Share of the map's non-negative mass inside the box, in [0, 1]; NaN when undefined.

    Negative values are clipped to 0 first (Grad-CAM maps are already non-negative; clipping
    keeps the share in [0, 1] for other saliency maps). NaN for a map with no positive mass or
    any non-finite value: there is no mass to share.
    """
    m = _map(cam)
    if m.size == 0 or not np.isfinite(m).all():
        return float("nan")
    m = np.clip(m, 0.0, None)
    total = float(m.sum())
    if total <= 0:
        return float("nan")
    rows, cols = box_slices(box, m.shape)
    return float(m[rows, cols].sum()) / total


# --- the bootstrap summary ------------------------------------------------------------------


def _checked_records(records: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"localisation records: missing column(s) {missing}")
    out = records[list(RECORD_COLUMNS)].reset_index(drop=True).copy()
    hit = np.empty(len(out))
    for row, value in enumerate(out["hit"].tolist()):
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            hit[row] = np.nan
        elif isinstance(value, bool | np.bool_ | int | np.integer | float) and value in (0, 1):
            hit[row] = float(value)
        else:
            raise ValueError(
                f"localisation records: column 'hit' must be True, False or None (undecided); "
                f"row {row} has {value!r}"
            )
    out["hit"] = hit
    out["energy"] = pd.to_numeric(out["energy"], errors="raise").astype(float)
    for column in ("model", "layer", "finding", "image_id", "patient_id"):
        out[column] = out[column].astype(str)
    return out


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per resample (row of `w [R, n]`), the weighted mean of the finite `values`."""
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    den = w[:, finite].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (w * v).sum(axis=1) / den, np.nan)


def localisation_resamples(
    records: pd.DataFrame, *, n_resamples: int = 1000, seed: int = 0
) -> Iterator[tuple[tuple[str, str, str], np.ndarray, np.ndarray]]:
    """`((model, layer, finding), hit_rate [R], energy [R])` per group, one value a resample.

    `hit_rate` is the headline: hits / all boxes, an undecided box counting as a miss.

    One resample draws the *test patients of all records* with replacement (`patient_weights`,
    patients numbered by first appearance in `records`) and every group is scored on that same
    draw: the models and layers are compared on the same resampled patients (paired), as
    `bootstrap.py` scores all findings of one resample together. A box's weight is its
    patient's draw count, so an image's boxes and a patient's images move together. A group
    none of whose patients is drawn gets NaN for that resample (ignored by the interval).
    """
    rec = _checked_records(records)
    codes, uniques = pd.factorize(rec["patient_id"])
    groups = list(rec.groupby(list(GROUP_COLUMNS), sort=True).indices.items())
    hits: dict[tuple, list[np.ndarray]] = {key: [] for key, _ in groups}
    energies: dict[tuple, list[np.ndarray]] = {key: [] for key, _ in groups}
    hit_all = rec["hit"].to_numpy(dtype=float)
    if len(rec):
        # drawn per patient ([r, P]) and expanded per group: the same draws as expanding to
        # every record at once, without an [R, records] matrix
        for block in patient_weights(np.asarray(uniques), n_resamples, seed):
            for key, index in groups:
                w = block[:, codes[index]]
                hits[key].append(_weighted_mean(np.nan_to_num(hit_all[index], nan=0.0), w))
                energies[key].append(_weighted_mean(rec["energy"].to_numpy()[index], w))
    for key, _ in groups:
        yield key, np.concatenate(hits[key]), np.concatenate(energies[key])


def localisation_summary(
    records: pd.DataFrame,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Pointing-game hit rate and energy-in-box per (model, layer, finding), with intervals.

    `records` has one row per (model, layer, box): `model, layer, finding, image_id,
    patient_id, hit` (True / False / None = undecided) and `energy` (NaN when undefined).

    * `n_boxes`: rows of the group; `n_images`: distinct images among them;
    * `hit_rate` (the headline): hits / all boxes, an undecided box (empty or non-finite map)
      counting as a miss; `undecided` counts those boxes; `hit_rate_decided`: hits / decided
      boxes, the second number (NaN when none is decided);
    * `energy`: mean energy-in-box over boxes where it is defined;
    * `*_ci_low/high`: percentile interval of the patient bootstrap
      (`localisation_resamples`; `hit_ci_*` belongs to the headline `hit_rate`), NaN where
      every resample is undefined.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence!r}")
    rec = _checked_records(records)
    rows = []
    grouped = rec.groupby(list(GROUP_COLUMNS), sort=True)
    for (model, layer, finding), hit_samples, energy_samples in localisation_resamples(
        rec, n_resamples=n_resamples, seed=seed
    ):
        part = grouped.get_group((model, layer, finding))
        decided = part["hit"].dropna()
        energy = part["energy"][np.isfinite(part["energy"])]
        hit_lo, hit_hi = percentile_interval(hit_samples, confidence)
        en_lo, en_hi = percentile_interval(energy_samples, confidence)
        rows.append(
            {
                "model": model,
                "layer": layer,
                "finding": finding,
                "n_boxes": int(len(part)),
                "n_images": int(part["image_id"].nunique()),
                "hit_rate": float(decided.sum()) / len(part) if len(part) else float("nan"),
                "hit_ci_low": float(hit_lo),
                "hit_ci_high": float(hit_hi),
                "energy": float(energy.mean()) if len(energy) else float("nan"),
                "energy_ci_low": float(en_lo),
                "energy_ci_high": float(en_hi),
                "undecided": int(part["hit"].isna().sum()),
                "hit_rate_decided": float(decided.mean()) if len(decided) else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


BBOX_COLUMNS = ["image_id", "finding", "x", "y", "w", "h"]


def parse_bbox_list(raw_bbox_list: str | None) -> pd.DataFrame:
    """`BBox_List_2017.csv` text -> image_id, finding (canonical), x, y, w, h (original px).

    Empty text (the optional file is absent) gives an empty table: no boxes are drawn."""
    if not raw_bbox_list or not raw_bbox_list.strip():
        return pd.DataFrame(columns=BBOX_COLUMNS)
    # image ids and names as written (`NA` or `0001` must not become missing or a number)
    raw = pd.read_csv(
        io.StringIO(raw_bbox_list),
        header=None,
        skiprows=1,
        usecols=range(6),
        dtype={0: str, 1: str},
        keep_default_na=False,
    )
    raw.columns = BBOX_COLUMNS
    for column in ("x", "y", "w", "h"):
        raw[column] = pd.to_numeric(raw[column], errors="coerce")
    raw["finding"] = raw["finding"].map(lambda n: FINDINGS[finding_index(str(n).strip())])
    return raw
