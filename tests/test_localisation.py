"""Localisation of Grad-CAM maps: pointing game, energy in box, patient-bootstrap summary.

Every expected number is computed by hand (or by the naive expand-and-average bootstrap), never
by calling the function under test a second way.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rare_cxr.evaluation.bootstrap import patient_weights
from rare_cxr.evaluation.localisation import (
    SUMMARY_COLUMNS,
    energy_in_box,
    localisation_resamples,
    localisation_summary,
    pointing_hit,
    rescale_box,
)

# ------------------------------------------------------------------ box rescaling


def test_rescale_box_follows_the_gradcam_examples_rule():
    # 1024-px NIH film -> 32-px cache: every coordinate / 32
    assert rescale_box((300, 400, 100, 60), (1024, 1024), (32, 32)) == pytest.approx(
        (9.375, 12.5, 3.125, 1.875)
    )
    # non-square original (width 2500, height 2048): x, w by 32/2500; y, h by 32/2048
    assert rescale_box((250, 512, 125, 1024), (2500, 2048), (32, 32)) == pytest.approx(
        (3.2, 8.0, 1.6, 16.0)
    )
    # target given as (H, W), original as (W, H)
    assert rescale_box((100, 100, 10, 10), (200, 400), (40, 20)) == pytest.approx(
        (10.0, 10.0, 1.0, 1.0)
    )
    with pytest.raises(ValueError, match="original image size"):
        rescale_box((1, 1, 1, 1), (0, 1024), (32, 32))


# ------------------------------------------------------------------ pointing game


def peak_map(row: int, col: int, shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    m = np.full(shape, 0.1)
    m[row, col] = 1.0
    return m


def test_pointing_hit_inside_outside_and_inclusive_bounds():
    m = peak_map(2, 5)
    assert pointing_hit(m, (5.0, 2.0, 0.5, 0.5)) is True  # a box within the peak pixel
    assert pointing_hit(m, (6.0, 2.0, 1.0, 1.0)) is False  # the next column
    # box [3, 5) covers columns 3, 4 only: the right edge x + w = 5 does not reach pixel 5
    assert pointing_hit(m, (3.0, 0.0, 2.0, 8.0)) is False
    # a hair more and pixel 5 is overlapped: inside (generous, inclusive rule)
    assert pointing_hit(m, (3.0, 0.0, 2.01, 8.0)) is True
    # the box's left edge inside the peak pixel counts too
    assert pointing_hit(m, (5.99, 2.5, 3.0, 1.0)) is True
    # rows alike: box y in [3, 6) misses row 2
    assert pointing_hit(m, (0.0, 3.0, 8.0, 3.0)) is False
    # a zero-size box covers the one pixel it lies in
    assert pointing_hit(m, (5.0, 2.0, 0.0, 0.0)) is True


def test_pointing_hit_boxes_touching_and_crossing_the_border():
    assert pointing_hit(peak_map(0, 0), (-3.0, -3.0, 3.5, 3.5)) is True  # clipped to pixel 0
    assert pointing_hit(peak_map(0, 0), (-3.0, -3.0, 3.0, 3.0)) is False  # ends at edge 0
    assert pointing_hit(peak_map(7, 7), (6.0, 6.0, 10.0, 10.0)) is True  # beyond bottom-right
    assert pointing_hit(peak_map(7, 7), (8.0, 8.0, 2.0, 2.0)) is False  # wholly outside
    assert pointing_hit(peak_map(0, 7), (7.0, 0.0, 1.0, 1.0)) is True  # top-right corner pixel


def test_pointing_hit_ties_count_when_any_maximum_is_inside():
    m = np.zeros((8, 8))
    m[1, 1] = m[6, 6] = 2.0
    assert pointing_hit(m, (6.0, 6.0, 1.0, 1.0)) is True  # the second maximum in raster order
    assert pointing_hit(m, (1.0, 1.0, 1.0, 1.0)) is True
    assert pointing_hit(m, (3.0, 3.0, 2.0, 2.0)) is False


def test_pointing_hit_undecided_for_empty_or_non_finite_maps():
    assert pointing_hit(np.zeros((8, 8)), (0, 0, 8, 8)) is None
    assert pointing_hit(-np.ones((8, 8)), (0, 0, 8, 8)) is None  # no positive evidence
    nan_map = peak_map(2, 2)
    nan_map[0, 0] = np.nan
    assert pointing_hit(nan_map, (2, 2, 1, 1)) is None
    inf_map = peak_map(2, 2)
    inf_map[0, 0] = np.inf
    assert pointing_hit(inf_map, (0, 0, 1, 1)) is None
    with pytest.raises(ValueError, match="2-D"):
        pointing_hit(np.zeros((1, 8, 8)), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="w, h >= 0"):
        pointing_hit(peak_map(1, 1), (0, 0, -1, 1))


def test_rescaled_nih_box_on_a_32_px_cache():
    # NIH box (300, 400, 100, 60) on a 1024 film -> (9.375, 12.5, 3.125, 1.875) in the cache:
    # columns 9..12 (9.375 .. 12.5), rows 12..14 (12.5 .. 14.375)
    box = rescale_box((300, 400, 100, 60), (1024, 1024), (32, 32))
    assert pointing_hit(peak_map(14, 12, (32, 32)), box) is True
    assert pointing_hit(peak_map(12, 9, (32, 32)), box) is True
    assert pointing_hit(peak_map(15, 12, (32, 32)), box) is False
    assert pointing_hit(peak_map(14, 13, (32, 32)), box) is False
    assert pointing_hit(peak_map(11, 10, (32, 32)), box) is False
    # uniform map: energy = covered pixels / all pixels = (4 x 3) / 1024
    assert energy_in_box(np.ones((32, 32)), box) == pytest.approx(12 / 1024)
    # the same as a torch tensor (what grad_cam returns)
    assert pointing_hit(torch.from_numpy(peak_map(14, 12, (32, 32))), box) is True


# ------------------------------------------------------------------ energy


def test_energy_in_box_by_hand():
    m = np.arange(16, dtype=float).reshape(4, 4)  # total 120
    # box over columns 1..2, rows 0..1: values 1, 2, 5, 6
    assert energy_in_box(m, (1.0, 0.0, 2.0, 2.0)) == pytest.approx(14 / 120)
    # fractional box (0.5, 2.5, 1.0, 1.0) overlaps columns 0..1 and rows 2..3: 8, 9, 12, 13
    assert energy_in_box(m, (0.5, 2.5, 1.0, 1.0)) == pytest.approx(42 / 120)
    # the whole map, and a box larger than the map: all of the mass
    assert energy_in_box(m, (0, 0, 4, 4)) == pytest.approx(1.0)
    assert energy_in_box(m, (-10, -10, 40, 40)) == pytest.approx(1.0)
    # a box touching the bottom-right border from outside covers nothing
    assert energy_in_box(m, (4.0, 4.0, 3.0, 3.0)) == 0.0
    # negative values are clipped before sharing: mass = 3 + 1, box holds the 3
    signed = np.array([[3.0, -5.0], [0.0, 1.0]])
    assert energy_in_box(signed, (0, 0, 1, 1)) == pytest.approx(3 / 4)


def test_energy_undefined_for_empty_or_non_finite_maps():
    assert math.isnan(energy_in_box(np.zeros((4, 4)), (0, 0, 2, 2)))
    assert math.isnan(energy_in_box(-np.ones((4, 4)), (0, 0, 2, 2)))
    m = np.ones((4, 4))
    m[3, 3] = np.nan
    assert math.isnan(energy_in_box(m, (0, 0, 2, 2)))


# ------------------------------------------------------------------ bootstrap summary


def make_records(seed: int = 0) -> pd.DataFrame:
    """2 models x 2 layers x 2 findings on 12 patients, 1-3 images each, some with 2 boxes."""
    rng = np.random.default_rng(seed)
    boxes = []
    for patient in range(12):
        for follow_up in range(int(rng.integers(1, 4))):
            image = f"{patient:08d}_{follow_up:03d}.png"
            finding = "Nodule" if patient % 2 else "Pneumothorax"
            for _ in range(int(rng.integers(1, 3))):
                boxes.append((image, f"P{patient}", finding))
    rows = []
    for model in ("baseline", "multiscale"):
        for layer in ("scale_224", "scale_448"):
            for image, patient, finding in boxes:
                u = rng.random()
                hit = None if u < 0.1 else bool(u < 0.6)
                energy = float("nan") if hit is None else float(rng.random())
                rows.append((model, layer, finding, image, patient, hit, energy))
    return pd.DataFrame(
        rows, columns=["model", "layer", "finding", "image_id", "patient_id", "hit", "energy"]
    )


def expanded_mean(values: list, counts: np.ndarray, undefined_as: float | None = None) -> float:
    """The naive bootstrap: repeat each box `count` times, drop undefined boxes (or count them
    as `undefined_as`), average."""
    if undefined_as is not None:
        values = [undefined_as if v is None or pd.isna(v) else v for v in values]
    repeated = [v for v, c in zip(values, counts, strict=True) for _ in range(int(c))]
    defined = [float(v) for v in repeated if v is not None and not pd.isna(v)]
    return float(np.mean(defined)) if defined else float("nan")


def test_summary_point_estimates_and_counts_by_hand():
    records = make_records()
    out = localisation_summary(records, n_resamples=20, seed=1)
    assert list(out.columns) == list(SUMMARY_COLUMNS)
    assert len(out) == 2 * 2 * 2
    for _, row in out.iterrows():
        part = records[
            (records["model"] == row["model"])
            & (records["layer"] == row["layer"])
            & (records["finding"] == row["finding"])
        ]
        decided = [h for h in part["hit"] if h is not None]
        assert row["n_boxes"] == len(part)
        assert row["n_images"] == len(set(part["image_id"]))
        assert row["undecided"] == len(part) - len(decided)
        assert row["hit_rate"] == pytest.approx(sum(decided) / len(part))  # undecided = miss
        assert row["hit_rate_decided"] == pytest.approx(sum(decided) / len(decided))
        assert row["energy"] == pytest.approx(np.nanmean(part["energy"]))


def test_bootstrap_equals_expanding_patient_weights_into_repeated_rows():
    records = make_records()
    n_resamples, seed = 40, 7
    # the draw of the whole test set of patients, expanded to one weight per box
    weights = np.concatenate(
        list(patient_weights(records["patient_id"].to_numpy(), n_resamples, seed))
    )
    samples = {key: (h, e) for key, h, e in localisation_resamples(records, n_resamples=40, seed=7)}
    summary = localisation_summary(records, n_resamples=n_resamples, seed=seed, confidence=0.9)
    for key, (hit_samples, energy_samples) in samples.items():
        mask = (
            (records["model"] == key[0])
            & (records["layer"] == key[1])
            & (records["finding"] == key[2])
        ).to_numpy()
        hits, energies = records["hit"][mask].tolist(), records["energy"][mask].tolist()
        by_hand_hit = [expanded_mean(hits, weights[r, mask], 0.0) for r in range(n_resamples)]
        by_hand_energy = [expanded_mean(energies, weights[r, mask]) for r in range(n_resamples)]
        for r in range(5):  # the first few resamples, one by one
            assert hit_samples[r] == pytest.approx(by_hand_hit[r], nan_ok=True)
            assert energy_samples[r] == pytest.approx(by_hand_energy[r], nan_ok=True)
        row = summary[
            (summary["model"] == key[0])
            & (summary["layer"] == key[1])
            & (summary["finding"] == key[2])
        ].iloc[0]
        assert row["hit_ci_low"] == pytest.approx(np.nanquantile(by_hand_hit, 0.05))
        assert row["hit_ci_high"] == pytest.approx(np.nanquantile(by_hand_hit, 0.95))
        assert row["energy_ci_low"] == pytest.approx(np.nanquantile(by_hand_energy, 0.05))
        assert row["energy_ci_high"] == pytest.approx(np.nanquantile(by_hand_energy, 0.95))
        assert row["hit_ci_low"] <= row["hit_ci_high"]


def test_boxes_of_an_image_and_images_of_a_patient_move_together():
    # patient A: 3 boxes, all hits; patient B: 1 box, a miss. A resample is one of
    # {A, A}, {A, B}, {B, B}: hit rates 1, 3/4, 0 -- never 1/2 (which box-level resampling gives)
    records = pd.DataFrame(
        {
            "model": "m",
            "layer": "l",
            "finding": "Mass",
            "image_id": ["a1", "a1", "a2", "b1"],
            "patient_id": ["A", "A", "A", "B"],
            "hit": [True, True, True, False],
            "energy": [0.5, 0.5, 0.5, 0.1],
        }
    )
    ((_, hits, energies),) = list(localisation_resamples(records, n_resamples=200, seed=0))
    assert set(np.round(hits, 6)) == {1.0, 0.75, 0.0}
    assert set(np.round(energies, 6)) == {0.5, 0.4, 0.1}


def test_summary_is_reproducible_and_validates_its_input():
    records = make_records()
    a = localisation_summary(records, n_resamples=30, seed=3)
    b = localisation_summary(records.sample(frac=1.0, random_state=0), n_resamples=30, seed=3)
    pd.testing.assert_frame_equal(a, localisation_summary(records, n_resamples=30, seed=3))
    # row order changes the patient numbering, not the point estimates
    pd.testing.assert_series_equal(a["hit_rate"], b["hit_rate"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['energy'\]"):
        localisation_summary(records.drop(columns="energy"), n_resamples=5)
    bad = records.copy()
    bad["hit"] = bad["hit"].astype(object)
    bad.loc[3, "hit"] = "yes"
    with pytest.raises(ValueError, match="row 3 has 'yes'"):
        localisation_summary(bad, n_resamples=5)
    with pytest.raises(ValueError, match="confidence"):
        localisation_summary(records, n_resamples=5, confidence=95)
    empty = localisation_summary(records.iloc[:0], n_resamples=5)
    assert empty.empty and list(empty.columns) == list(SUMMARY_COLUMNS)


def test_all_undecided_group_has_nan_rate_and_counts_undecided():
    records = pd.DataFrame(
        {
            "model": "m",
            "layer": "l",
            "finding": "Hernia",
            "image_id": ["x", "y"],
            "patient_id": [1, 2],
            "hit": [None, None],
            "energy": [float("nan"), float("nan")],
        }
    )
    row = localisation_summary(records, n_resamples=10, seed=0).iloc[0]
    assert row["undecided"] == 2 and row["n_boxes"] == 2
    # the headline counts the empty maps as misses; the "decided only" rate has nothing
    assert row["hit_rate"] == row["hit_ci_low"] == row["hit_ci_high"] == 0.0
    for column in ("hit_rate_decided", "energy", "energy_ci_low"):
        assert math.isnan(row[column]), column


def test_pointing_game_denominator_on_hand_made_maps():
    """Five boxed positives of one finding, maps made by hand: 2 hits, 1 miss, 1 all-zero map
    and 1 map with a NaN. Headline 2/5 (empty maps are misses), decided only 2/3."""
    box = (2.0, 2.0, 3.0, 3.0)  # pixels 2..4 in both directions, 8x8 maps
    hit_map = np.zeros((8, 8))
    hit_map[3, 3] = 1.0
    miss_map = np.zeros((8, 8))
    miss_map[7, 7] = 1.0
    nan_map = hit_map.copy()
    nan_map[0, 0] = np.nan
    maps = [hit_map, hit_map * 0.5, miss_map, np.zeros((8, 8)), nan_map]
    hits = [pointing_hit(m, box) for m in maps]
    assert hits == [True, True, False, None, None]
    records = pd.DataFrame(
        {
            "model": "m",
            "layer": "l",
            "finding": "Nodule",
            "image_id": [f"i{k}" for k in range(5)],
            "patient_id": [f"p{k}" for k in range(5)],
            "hit": hits,
            "energy": [energy_in_box(m, box) for m in maps],
        }
    )
    row = localisation_summary(records, n_resamples=50, seed=0).iloc[0]
    assert row["n_boxes"] == 5 and row["undecided"] == 2
    assert row["hit_rate"] == pytest.approx(2 / 5)
    assert row["hit_rate_decided"] == pytest.approx(2 / 3)
    assert row["hit_ci_low"] <= 2 / 5 <= row["hit_ci_high"]
