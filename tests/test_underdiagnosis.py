"""Underdiagnosis ("predicted no finding while sick") by sex and age band, on a hand-made table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rare_cxr.evaluation import underdiagnosis as U
from rare_cxr.evaluation.bootstrap import patient_weights
from rare_cxr.findings import FINDINGS

F = len(FINDINGS)
EDGES = [0, 40, 200]
MASS, HERNIA = FINDINGS.index("Mass"), FINDINGS.index("Hernia")


def hand_made():
    """10 films of 8 patients. Thresholds 0.5, Hernia without one (never called).

    film  patient sex age  sick (labels)   called (a score >= 0.5)   missed
    0     p1      F   30   Mass            no                        yes
    1     p1      F   31   Mass            Mass 0.7                  no
    2     p2      F   35   Hernia          Hernia 0.9 (no threshold) yes
    3     p3      F   70   -               Mass 0.6                  (healthy)
    4     p4      M   25   Mass, Effusion  Effusion 0.5              no
    5     p5      M   65   Mass            no                        yes
    6     p6      M   66   Effusion        Effusion 0.8              no
    7     p7      M   70   Effusion        Mass 0.55 (wrong finding) no  (any-finding decision)
    8     p8      M   72   -               no                        (healthy)
    9     p8      M   "x"  Mass            no                        yes (age unknown)
    """
    effusion = FINDINGS.index("Effusion")
    y = np.zeros((10, F), int)
    s = np.full((10, F), 0.1)
    for film, finding in ((0, MASS), (1, MASS), (2, HERNIA), (4, MASS), (4, effusion)):
        y[film, finding] = 1
    for film, finding in ((5, MASS), (6, effusion), (7, effusion), (9, MASS)):
        y[film, finding] = 1
    s[1, MASS], s[2, HERNIA], s[3, MASS], s[4, effusion] = 0.7, 0.9, 0.6, 0.5
    s[6, effusion], s[7, MASS] = 0.8, 0.55
    thresholds = np.full(F, 0.5)
    thresholds[HERNIA] = np.nan
    meta = pd.DataFrame(
        {
            "patient_id": ["p1", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p8"],
            "sex": ["F", "F", "F", "F", "M", "M", "M", "M", "M", "M"],
            "age": [30, 31, 35, 70, 25, 65, 66, 70, 72, "x"],
        }
    )
    return y, s, thresholds, meta


def table(**kwargs):
    y, s, t, meta = hand_made()
    options = {"age_edges": EDGES, "n_resamples": 200, "seed": 3, "min_positives": 2}
    return U.underdiagnosis_table(y, s, t, meta, **{**options, **kwargs})


def test_any_finding_decision_ignores_findings_without_a_threshold():
    _, s, t, _ = hand_made()
    assert U.any_finding_decision(s, t).tolist() == [0, 1, 0, 1, 1, 0, 1, 1, 0, 0]


def test_rates_and_gaps_by_hand():
    out = table()
    assert list(out.columns) == list(U.COLUMNS)
    keys = list(zip(out["attribute"], out["subgroup"], strict=True))
    assert keys == [("all", "all"), ("sex", "F"), ("sex", "M"), ("age", "0-39"),
                    ("age", "40+"), ("age", "unknown")]  # fmt: skip
    rows = out.set_index("subgroup")
    # all: 8 sick films (0, 1, 2, 4, 5, 6, 7, 9), missed 0, 2, 5, 9 -> 4/8
    assert rows.loc["all", ["sick_images", "missed", "images"]].tolist() == [8, 4, 10]
    assert rows.loc["all", "sick_patients"] == 7
    assert rows.loc["all", "underdiagnosis_rate"] == pytest.approx(0.5)
    assert rows.loc["all", "gap"] == 0.0
    # F: sick 0, 1, 2 (p1, p2), missed 0, 2 -> 2/3; M: sick 4, 5, 6, 7, 9, missed 5, 9 -> 2/5
    assert rows.loc["F", ["sick_images", "missed", "sick_patients"]].tolist() == [3, 2, 2]
    assert rows.loc["F", "underdiagnosis_rate"] == pytest.approx(2 / 3)
    assert rows.loc["F", "gap"] == pytest.approx(2 / 3 - 0.5)
    assert rows.loc["M", "underdiagnosis_rate"] == pytest.approx(2 / 5)
    assert rows.loc["M", "gap"] == pytest.approx(-0.1)
    # ages: 0-39 sick 0, 1, 2, 4 missed 0, 2 -> 1/2; 40+ sick 5, 6, 7 missed 5 -> 1/3;
    # unknown ("x"): film 9, missed -> 1/1
    assert rows.loc["0-39", "underdiagnosis_rate"] == pytest.approx(0.5)
    assert rows.loc["40+", "underdiagnosis_rate"] == pytest.approx(1 / 3)
    assert rows.loc["unknown", ["sick_images", "missed"]].tolist() == [1, 1]
    assert rows.loc["unknown", "underdiagnosis_rate"] == 1.0


def test_intervals_are_the_patient_bootstrap_or_binomial_where_it_degenerates():
    y, s, t, meta = hand_made()
    out = table().set_index("subgroup")
    # reference: the same resamples, rates recomputed by hand from the weights
    w = np.concatenate(list(patient_weights(meta["patient_id"].to_numpy(), 200, 3)))
    sick = y.any(axis=1)
    missed = sick & ~U.any_finding_decision(s, t)
    female = (meta["sex"] == "F").to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_all = (w @ missed) / (w @ sick)
        rate_f = (w @ (missed & female)) / (w @ (sick & female))
    gap = rate_f - rate_all
    lo, hi = np.nanquantile(gap, [0.025, 0.975])
    assert out.loc["F", "gap_ci_low"] == pytest.approx(lo)
    assert out.loc["F", "gap_ci_high"] == pytest.approx(hi)
    assert out.loc["F", "resamples_dropped"] == np.isnan(rate_f).sum() > 0
    assert out.loc["all", "interval"] == "bootstrap"
    assert out.loc["all", "ci_low"] == pytest.approx(np.nanquantile(rate_all, 0.025))
    assert math.isnan(out.loc["all", "gap_ci_low"])
    # rate 1 of 1 (age unknown): the bootstrap would print [1, 1]; Clopper-Pearson on 1 patient
    assert out.loc["unknown", "interval"] == "Clopper-Pearson (patients)"
    assert out.loc["unknown", "ci_low"] == pytest.approx(0.025)
    assert out.loc["unknown", "ci_high"] == 1.0
    assert not out.loc["unknown", "reliable"] and out.loc["M", "reliable"]
    wilson = table(proportion_method="wilson").set_index("subgroup")
    assert wilson.loc["unknown", "interval"] == "Wilson (patients)"
    # fewer sick patients than min_positives: binomial everywhere, and unreliable
    strict = table(min_positives=10).set_index("subgroup")
    assert (strict["interval"] != "bootstrap").all() and not strict["reliable"].any()


def test_inputs_are_checked():
    y, s, t, meta = hand_made()
    with pytest.raises(ValueError, match="meta: expected 10 rows"):
        U.underdiagnosis_table(y, s, t, meta.head(3), age_edges=EDGES, n_resamples=5)
    with pytest.raises(ValueError, match="patient_id"):
        U.underdiagnosis_table(y, s, t, meta.drop(columns="patient_id"), age_edges=EDGES)
    with pytest.raises(ValueError, match="thresholds"):
        U.any_finding_decision(s, t[:3])
