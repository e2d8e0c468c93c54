"""Subgroup AUROCs: against roc_auc_score on the subset, bootstrap inside the subgroup."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from rare_cxr.evaluation import subgroups
from rare_cxr.evaluation.bootstrap import patient_weights
from rare_cxr.findings import FINDINGS

F = len(FINDINGS)
EDGES = [0, 18, 40, 60, 80, 200]
CARDIO = FINDINGS.index("Cardiomegaly")
HERNIA = FINDINGS.index("Hernia")


def data(n_patients: int = 50, seed: int = 2):
    """Patients with 1-4 images; sex per patient; ages and views per image; some odd values."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n_patients)
    pid = np.repeat(np.arange(1000, 1000 + n_patients), sizes)
    n = len(pid)
    sex_of = rng.choice(["M", "F"], size=n_patients)
    age_of = rng.integers(5, 95, size=n_patients)
    meta = pd.DataFrame(
        {
            "patient_id": pid,
            "sex": np.repeat(sex_of, sizes),
            "age": np.repeat(age_of, sizes).astype(float),
            "view": rng.choice(["PA", "AP"], size=n),
        }
    )
    meta.loc[0, "age"] = np.nan
    meta.loc[1, "age"] = 414.0  # the 2017 NIH file has such ages
    y = (rng.random((n, F)) < 0.3).astype(int)
    y[:, HERNIA] = 0
    y[meta["sex"].to_numpy() == "F", CARDIO] = 0  # one class only among women
    s = np.round(np.clip(0.3 * y + 0.7 * rng.random((n, F)), 0, 1), 2)
    return y, s, meta


def test_age_band_labels_and_validation():
    assert subgroups.age_band_labels(EDGES) == ["0-17", "18-39", "40-59", "60-79", "80+"]
    assert subgroups.age_band_labels([0, 50]) == ["0+"]
    for bad in ([0], [0, 18, 18], [40, 18], [-5, 10]):
        with pytest.raises(ValueError, match=r"reporting\.subgroups\.age_edges"):
            subgroups.age_band_labels(bad)


def test_assign_age_bands_boundaries_and_unknown():
    ages = [0, 17, 17.5, 18, 39, 40, 79, 80, 199, 200, 414, -1, np.nan, None, "58"]
    assert subgroups.assign_age_bands(ages, EDGES).tolist() == [
        "0-17",
        "0-17",
        "0-17",
        "18-39",
        "18-39",
        "40-59",
        "60-79",
        "80+",
        "80+",
        "unknown",
        "unknown",
        "unknown",
        "unknown",
        "unknown",
        "40-59",
    ]


def run(y, s, meta, *, n_resamples=30, seed=4, confidence=0.9):
    return subgroups.subgroup_aurocs(
        y, s, meta, age_edges=EDGES, n_resamples=n_resamples, seed=seed, confidence=confidence
    )


def test_subgroup_auroc_matches_sklearn_on_the_subset():
    y, s, meta = data()
    table = run(y, s, meta)
    assert list(table.columns) == [
        "attribute",
        "subgroup",
        "finding",
        "n_images",
        "n_patients",
        "positives",
        "auroc",
        "ci_low",
        "ci_high",
        "resamples_dropped",
    ]
    bands = subgroups.assign_age_bands(meta["age"], EDGES)
    masks = {
        ("sex", "F"): meta["sex"].to_numpy() == "F",
        ("sex", "M"): meta["sex"].to_numpy() == "M",
        ("view", "AP"): meta["view"].to_numpy() == "AP",
        ("view", "PA"): meta["view"].to_numpy() == "PA",
        **{("age", b): bands == b for b in [*subgroups.age_band_labels(EDGES), "unknown"]},
    }
    seen = set(zip(table["attribute"], table["subgroup"], strict=True))
    assert seen == {k for k, m in masks.items() if m.any()}
    assert table.loc[table["attribute"] == "age", "subgroup"].iloc[-1] == "unknown"
    for (attribute, subgroup), mask in masks.items():
        if not mask.any():
            continue
        part = table[(table["attribute"] == attribute) & (table["subgroup"] == subgroup)]
        assert part["finding"].tolist() == [*FINDINGS, "macro"]  # nothing dropped
        row = part.set_index("finding")
        defined = []
        for i, f in enumerate(FINDINGS):
            r = row.loc[f]
            assert r["n_images"] == mask.sum()
            assert r["n_patients"] == len(set(meta.loc[mask, "patient_id"]))
            assert r["positives"] == y[mask, i].sum()
            if 0 < y[mask, i].sum() < mask.sum():
                expected = roc_auc_score(y[mask, i], s[mask, i])
                assert r["auroc"] == pytest.approx(expected)
                defined.append(expected)
            else:
                assert math.isnan(r["auroc"])
        assert row.loc["macro", "auroc"] == pytest.approx(np.mean(defined))
        assert row.loc["macro", "positives"] == y[mask].sum()


def test_one_class_subgroup_is_nan_not_dropped():
    y, s, meta = data()
    table = run(y, s, meta).set_index(["attribute", "subgroup", "finding"])
    women = table.loc[("sex", "F", "Cardiomegaly")]
    assert women["positives"] == 0
    assert math.isnan(women["auroc"]) and math.isnan(women["ci_low"])
    assert math.isnan(women["ci_high"])
    assert not math.isnan(table.loc[("sex", "M", "Cardiomegaly"), "auroc"])
    hernia = table.xs("Hernia", level="finding")
    assert len(hernia) == len(table.xs("macro", level="finding"))
    assert hernia["auroc"].isna().all()


def test_bootstrap_stays_inside_the_subgroup(monkeypatch):
    y, s, meta = data()
    # A patient only in PA / M / 40-59, whose positives all score 0: any leak would show.
    outsider = "999999"
    extra = pd.DataFrame({"patient_id": [999999] * 3, "sex": "M", "age": 50.0, "view": "PA"})
    meta = pd.concat([meta, extra], ignore_index=True)
    y = np.vstack([y, np.ones((3, F), dtype=int)])
    s = np.vstack([s, np.zeros((3, F))])
    calls: list[np.ndarray] = []

    def spy(patient_ids, n_resamples, seed, chunk_size=200):
        calls.append(np.asarray(patient_ids).astype(str))
        yield from patient_weights(patient_ids, n_resamples, seed, chunk_size)

    monkeypatch.setattr(subgroups, "patient_weights", spy)
    table = run(y, s, meta)
    values = {
        "sex": meta["sex"].to_numpy(),
        "age": subgroups.assign_age_bands(meta["age"], EDGES),
        "view": meta["view"].to_numpy(),
    }
    keys = table.drop_duplicates(["attribute", "subgroup"])[["attribute", "subgroup"]]
    assert len(calls) == len(keys)  # one bootstrap per subgroup
    homes = {("view", "PA"), ("sex", "M"), ("age", "40-59")}
    for ids, (attribute, subgroup) in zip(calls, keys.itertuples(index=False), strict=True):
        mask = values[attribute] == subgroup
        # exactly the subgroup's rows, in order: no patient from outside, none missing
        assert ids.tolist() == meta.loc[mask, "patient_id"].astype(str).tolist()
        assert (outsider in set(ids)) == ((attribute, subgroup) in homes)


def test_subgroup_intervals_match_expanded_rows():
    """Reference: resample the subgroup's patients, repeat rows, score with sklearn."""
    y, s, meta = data()
    n_resamples, seed, confidence = 30, 4, 0.9
    table = run(y, s, meta, n_resamples=n_resamples, seed=seed, confidence=confidence)
    # ages 18-39: a small subgroup whose resamples lose a finding now and then
    mask = np.asarray(subgroups.assign_age_bands(meta["age"], EDGES)) == "18-39"
    ys, ss = y[mask], s[mask]
    w_all = np.concatenate(
        list(patient_weights(meta.loc[mask, "patient_id"].to_numpy(), n_resamples, seed))
    )
    samples = np.full((n_resamples, F), np.nan)
    for r, w in enumerate(w_all):
        rows = np.repeat(np.arange(len(ys)), w.astype(int))
        for i in range(F):
            if 0 < ys[rows, i].sum() < len(rows):
                samples[r, i] = roc_auc_score(ys[rows, i], ss[rows, i])
    alpha = (1 - confidence) / 2
    part = table[(table["attribute"] == "age") & (table["subgroup"] == "18-39")]
    part = part.set_index("finding")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(samples, [alpha, 1 - alpha], axis=0)
        defined = np.isfinite(
            [
                roc_auc_score(ys[:, i], ss[:, i]) if 0 < ys[:, i].sum() < len(ys) else np.nan
                for i in range(F)
            ]
        )
        macro = samples[:, defined].mean(axis=1)  # one set; NaN where it lost one of them
    for i, f in enumerate(FINDINGS):
        if np.isnan(lo[i]):
            assert math.isnan(part.loc[f, "ci_low"])
        else:
            assert part.loc[f, "ci_low"] == pytest.approx(lo[i])
            assert part.loc[f, "ci_high"] == pytest.approx(hi[i])
    mlo, mhi = np.nanquantile(macro, [alpha, 1 - alpha])
    assert part.loc["macro", "ci_low"] == pytest.approx(mlo)
    assert part.loc["macro", "ci_high"] == pytest.approx(mhi)
    assert part.loc["macro", "resamples_dropped"] == np.isnan(macro).sum() > 0
    for i, f in enumerate(FINDINGS):
        want = np.isnan(samples[:, i]).sum() if defined[i] else 0
        assert part.loc[f, "resamples_dropped"] == want, f


def test_input_errors():
    y, s, meta = data()
    with pytest.raises(ValueError, match="missing column"):
        run(y, s, meta.drop(columns="view"))
    with pytest.raises(ValueError, match="aligned"):
        run(y[:-1], s[:-1], meta)
