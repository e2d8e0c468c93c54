"""ΔAUROC by planted lesion size (rare_cxr.evaluation.lesion_size) on a hand-made case whose
answer is known, and the reporting node's behaviour without a box list."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rare_cxr.evaluation import lesion_size
from rare_cxr.evaluation.localisation import BBOX_COLUMNS
from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.reporting.nodes import lesion_size_delta

NODULE = FINDINGS.index("Nodule")


def _case(n_seeds: int = 2):
    """Six boxed Nodule positives (areas 1..6), one unboxed positive, four negatives.

    The model puts every positive above every negative (AUROC 1 in each bin). The reference
    misses the small lesions (below every negative: AUROC 0), half-finds the medium ones (0.45
    beats two of the four negatives: 0.5) and finds the large ones (1)."""
    ids = np.array([f"img{i}" for i in range(11)])
    patients = np.array([f"p{i}" for i in range(11)])
    y = np.zeros((11, len(FINDINGS)), dtype=np.int8)
    y[:7, NODULE] = 1
    negatives = [0.3, 0.4, 0.5, 0.6]
    model = np.array([0.9] * 7 + negatives)
    reference = np.array([0.0, 0.0, 0.45, 0.45, 0.9, 0.9, 0.9, *negatives])
    s_m = np.zeros((n_seeds, 11, len(FINDINGS)))
    s_r = np.zeros((n_seeds, 11, len(FINDINGS)))
    s_m[:, :, NODULE], s_r[:, :, NODULE] = model, reference
    sides = [(1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 3)]  # areas 1, 2, 3, 4, 5, 6
    boxes = pd.DataFrame(
        [[f"img{i}", "Nodule", 0.0, 0.0, float(w), float(h)] for i, (w, h) in enumerate(sides)]
        # a smaller second Nodule box on img5 (the largest counts) and a Mass box on img6 (the
        # unboxed Nodule positive: a box of another finding does not place it in a bin)
        + [["img5", "Nodule", 0.0, 0.0, 0.5, 0.5], ["img6", "Mass", 0.0, 0.0, 9.0, 9.0]],
        columns=BBOX_COLUMNS,
    )
    return ids, patients, y, s_m, s_r, boxes


def test_terciles_of_box_area_give_the_known_auroc_differences():
    ids, patients, y, s_m, s_r, boxes = _case()
    rows = lesion_size.lesion_size_rows(
        "multi", "single", ids, patients, y, s_m, s_r, boxes,
        findings=("Nodule", "Mass"), n_resamples=200, seed=1,
    )  # fmt: skip
    assert list(rows.columns) == list(lesion_size.COLUMNS)
    # Mass has no labelled positive here: no rows for it
    assert rows["finding"].tolist() == ["Nodule"] * 3
    assert rows["size_bin"].tolist() == [1, 2, 3]
    assert rows[["area_min", "area_max"]].to_numpy().tolist() == [[1, 2], [3, 4], [5, 6]]
    assert rows["positives"].tolist() == [2, 2, 2]
    assert (rows["negatives"] == 4).all() and (rows["unboxed"] == 1).all()
    assert rows["auroc_model"].tolist() == [1.0, 1.0, 1.0]
    assert rows["auroc_reference"].tolist() == [0.0, 0.5, 1.0]
    assert rows["delta"].tolist() == [1.0, 0.5, 0.0]
    assert (rows["seeds"] == 2).all() and (rows["seed_sd"] == 0.0).all()
    # small lesions: every resample with a positive says +1; large: identical, p = 1
    small, large = rows.iloc[0], rows.iloc[2]
    assert (small["ci_low"], small["ci_high"]) == (1.0, 1.0) and small["p_value"] < 0.05
    assert (large["ci_low"], large["ci_high"], large["p_value"]) == (0.0, 0.0, 1.0)
    # a resample without either of a bin's two positive patients has no AUROC: dropped
    assert rows["resamples_dropped"].between(1, 199).all()


def test_size_bins_split_by_count_smallest_first():
    bins = lesion_size.size_bins(np.array([5.0, 1.0, 3.0, 2.0]), 3)
    assert [b.tolist() for b in bins] == [[1, 3], [2], [0]]
    assert [b.tolist() for b in lesion_size.size_bins(np.array([2.0]), 3)] == [[0]]
    with pytest.raises(ValueError, match="n_bins"):
        lesion_size.size_bins(np.array([1.0]), 0)


def test_node_without_a_box_list_gives_an_empty_table_with_its_columns():
    table = lesion_size_delta(
        pd.DataFrame(), "", {"bootstrap": {"n_resamples": 10}}, pairs=[("a", "b")]
    )
    assert table.empty and list(table.columns) == list(lesion_size.COLUMNS)
