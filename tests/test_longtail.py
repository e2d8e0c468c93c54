"""Long-tail metrics: each checked against scikit-learn or a reference written here."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)

from rare_cxr.evaluation import longtail
from rare_cxr.evaluation.bootstrap import patient_weights
from rare_cxr.findings import FINDINGS

F = len(FINDINGS)
HERNIA = FINDINGS.index("Hernia")
FIBROSIS = FINDINGS.index("Fibrosis")


def data(n_patients: int = 45, seed: int = 5):
    """Patients with 1-5 images each, ties in the scores, Hernia absent, Fibrosis rare."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=n_patients)
    patients = np.repeat(np.arange(100, 100 + n_patients), sizes)
    n = len(patients)
    prevalence = np.linspace(0.4, 0.05, F)
    y = rng.random((n, F)) < prevalence[None, :]
    y[:, HERNIA] = False
    y[:, FIBROSIS] = False
    y[rng.choice(n, 3, replace=False), FIBROSIS] = True
    s = np.round(np.clip(0.35 * y + 0.65 * rng.random((n, F)), 0, 1), 2)
    thresholds = np.full(F, 0.5)
    thresholds[FINDINGS.index("Mass")] = np.nan  # undefined on validation
    return y.astype(int), s, thresholds, patients


TRAIN = dict(
    zip(
        FINDINGS,
        [5000, 3000, 2000, 1500, 900, 800, 120, 40, 700, 600, 99, 100, 1001, 1000],
        strict=True,
    )
)


# --- balanced accuracy, sensitivity at specificity --------------------------------------------


def test_balanced_accuracy_matches_sklearn():
    y, s, _, _ = data()
    for i in range(4):
        for t in (0.2, 0.5, 0.77):
            expected = balanced_accuracy_score(y[:, i], (s[:, i] >= t).astype(int))
            assert longtail.balanced_accuracy(y[:, i], s[:, i], t) == pytest.approx(expected)


def test_balanced_accuracy_nan_cases():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.4, 0.3])
    assert math.isnan(longtail.balanced_accuracy(y, s, float("nan")))
    assert math.isnan(longtail.balanced_accuracy(np.zeros(4), s, 0.5))  # no positives
    assert math.isnan(longtail.balanced_accuracy(np.ones(4), s, 0.5))  # no negatives


def brute_force_sens_at_spec(y, s, target):
    """Every threshold (each distinct score, and +inf); best sensitivity, then specificity."""
    y = np.asarray(y).astype(bool)
    best = None
    for t in [math.inf, *sorted(set(s.tolist()))]:
        pred = s >= t
        sens = np.sum(pred & y) / np.sum(y)
        spec = np.sum(~pred & ~y) / np.sum(~y)
        if spec >= target and (best is None or (sens, spec) > (best[0], best[1])):
            best = (sens, spec, t)
    return best


def test_sensitivity_at_specificity_matches_brute_force():
    y, s, _, _ = data()
    for i in (0, 3, 6, FIBROSIS):
        for target in (0.0, 0.5, 0.8, 0.9, 0.95, 1.0):
            got = longtail.sensitivity_at_specificity(y[:, i], s[:, i], target)
            sens, spec, t = brute_force_sens_at_spec(y[:, i], s[:, i], target)
            assert got["sensitivity"] == pytest.approx(sens)
            assert got["specificity"] == pytest.approx(spec)
            assert got["threshold"] == t


def test_sensitivity_at_specificity_nan_without_both_classes():
    s = np.array([0.1, 0.5, 0.9])
    for y in (np.zeros(3), np.ones(3)):
        got = longtail.sensitivity_at_specificity(y, s, 0.9)
        assert all(math.isnan(v) for v in got.values())
    with pytest.raises(ValueError, match="specificity target"):
        longtail.sensitivity_at_specificity(np.array([0, 1, 0]), s, 1.5)


# --- groups ------------------------------------------------------------------------------------


def test_frequency_groups_boundaries():
    counts = {"a": 100, "b": 99, "c": 10, "d": 9, "e": 0, "f": 5000}
    assert longtail.frequency_groups(counts, head_min=100, tail_max=10) == {
        "a": "head",
        "b": "medium",
        "c": "medium",
        "d": "tail",
        "e": "tail",
        "f": "head",
    }
    # The NIH-CXR-LT convention: > 1,000 many-shot, 100-1,000 medium, < 100 few-shot.
    nih = {"x": 1001, "y": 1000, "z": 100, "w": 99}
    assert longtail.frequency_groups(
        nih, head_min=longtail.NIH_CXR_LT_HEAD_MIN, tail_max=longtail.NIH_CXR_LT_TAIL_MAX
    ) == {"x": "head", "y": "medium", "z": "medium", "w": "tail"}


def test_frequency_groups_validation_names_the_key():
    with pytest.raises(ValueError, match=r"reporting\.long_tail\.head_min"):
        longtail.frequency_groups({"a": 1}, head_min=10, tail_max=10)
    with pytest.raises(ValueError, match=r"reporting\.long_tail\.head_min"):
        longtail.frequency_groups({"a": 1}, head_min=5, tail_max=10)
    with pytest.raises(ValueError, match=r"reporting\.long_tail\.tail_max"):
        longtail.frequency_groups({"a": 1}, head_min=10, tail_max=-1)


def tables(n_resamples: int = 40, seed: int = 11, confidence: float = 0.9):
    y, s, t, patients = data()
    per, groups = longtail.long_tail_tables(
        y,
        s,
        t,
        TRAIN,
        patients,
        head_min=1001,
        tail_max=100,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
    )
    return y, s, t, patients, per, groups


def test_per_finding_table_against_sklearn():
    y, s, t, patients, per, _ = tables()
    assert list(per.columns) == [
        "finding",
        "group",
        "train_positives",
        "test_positives",
        "test_positive_patients",
        "auroc",
        "auprc",
        "balanced_accuracy",
        "specificity",
        "sensitivity_at_spec_90",
        "sensitivity_at_spec_95",
        "reliable",
    ]
    assert per["finding"].tolist() == list(FINDINGS)
    row = per.set_index("finding")
    assert row.loc["Atelectasis", "group"] == "head"
    assert row.loc["Pneumonia", "group"] == "head"  # 1001
    assert row.loc["Pneumothorax", "group"] == "medium"  # 1000
    assert row.loc["Pleural_Thickening", "group"] == "medium"  # 100
    assert row.loc["Nodule", "group"] == "tail"  # 99
    for i, f in enumerate(FINDINGS):
        r = row.loc[f]
        assert r["test_positives"] == y[:, i].sum()
        n_patients = len(np.unique(patients[y[:, i] == 1]))
        assert r["test_positive_patients"] == n_patients
        assert r["reliable"] == (n_patients >= 10)
        if f == "Hernia":  # no positives: undefined, not dropped
            assert math.isnan(r["auroc"]) and math.isnan(r["auprc"])
            assert math.isnan(r["balanced_accuracy"]) and math.isnan(r["sensitivity_at_spec_90"])
            continue
        assert r["auroc"] == pytest.approx(roc_auc_score(y[:, i], s[:, i]))
        assert r["auprc"] == pytest.approx(average_precision_score(y[:, i], s[:, i]))
        if f == "Mass":  # undefined validation threshold
            assert math.isnan(r["balanced_accuracy"]) and math.isnan(r["specificity"])
        else:
            pred = (s[:, i] >= t[i]).astype(int)
            assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[:, i], pred))
            assert r["specificity"] == pytest.approx(
                np.sum((pred == 0) & (y[:, i] == 0)) / np.sum(y[:, i] == 0)
            )
        for target, col in ((0.9, "sensitivity_at_spec_90"), (0.95, "sensitivity_at_spec_95")):
            assert r[col] == pytest.approx(brute_force_sens_at_spec(y[:, i], s[:, i], target)[0])
    assert not row.loc["Fibrosis", "reliable"]  # 3 positives


def test_reliable_counts_patients_not_films():
    """Positive films of two patients are two units: reliable only if min_positives <= 2;
    a single positive patient never is (its clustered variance is undefined)."""
    y, s, t, patients = data()
    first_two = np.unique(patients)[:2]
    y[:, FIBROSIS] = np.isin(patients, first_two)
    assert y[:, FIBROSIS].sum() >= 4

    def fibrosis(minimum: int):
        per, _ = longtail.long_tail_tables(
            y,
            s,
            t,
            TRAIN,
            patients,
            head_min=1001,
            tail_max=100,
            min_positives=minimum,
            n_resamples=5,
        )
        return per.set_index("finding").loc["Fibrosis"]

    for minimum, want in ((10, False), (3, False), (2, True), (1, True)):
        row = fibrosis(minimum)
        assert row["test_positive_patients"] == 2 and row["test_positives"] >= 4
        assert bool(row["reliable"]) is want, minimum
    y[:, FIBROSIS] = patients == first_two[0]
    assert not fibrosis(1)["reliable"]


def test_group_means_by_hand():
    _, _, _, _, per, groups = tables()
    # the three groups, then every finding (the CXR-LT challenges' overall mAP)
    assert groups["group"].tolist() == ["head", "medium", "tail", "all"]
    members = {
        "head": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pneumonia"],
        "medium": [
            "Effusion",
            "Emphysema",
            "Fibrosis",
            "Infiltration",
            "Mass",
            "Pleural_Thickening",
            "Pneumothorax",
        ],
        "tail": ["Hernia", "Nodule"],
        "all": list(FINDINGS),
    }
    row = per.set_index("finding")
    for _, g in groups.iterrows():
        assert g["findings"] == "|".join(members[g["group"]])
        assert g["n_findings"] == len(members[g["group"]])
        # the group mean of AUPRC is named mAP, as the CXR-LT challenges name it
        for m, column in (("auroc", "auroc"), ("auprc", "mAP"), ("balanced_accuracy",) * 2):
            vals = [row.loc[f, m] for f in members[g["group"]] if not math.isnan(row.loc[f, m])]
            assert g[column] == pytest.approx(sum(vals) / len(vals))
    # tail: Hernia undefined, so the mean is Nodule's alone
    tail = groups.set_index("group").loc["tail"]
    assert tail["auroc"] == pytest.approx(row.loc["Nodule", "auroc"])


def test_only_groups_with_findings_appear():
    y, s, t, patients = data()
    _, groups = longtail.long_tail_tables(
        y, s, t, dict.fromkeys(FINDINGS, 50), patients, head_min=1001, tail_max=10, n_resamples=5
    )
    assert groups["group"].tolist() == ["medium", "all"]
    assert groups["n_findings"].tolist() == [F, F]


def expanded_group_samples(y, s, t, patients, groups_of, *, n_resamples, seed):
    """Reference: repeat each image by its patient's resample count and score with sklearn;
    each group mean over the findings defined on the test set as is (NaN when the resample
    lost one of them)."""
    full = per_finding_sklearn(y, s, t)
    out = {
        m: {g: [] for g in ("head", "medium", "tail", "all")}
        for m in ("auroc", "auprc", "balanced_accuracy")
    }
    w_all = np.concatenate(list(patient_weights(patients, n_resamples, seed)), axis=0)
    for w in w_all:
        rows = np.repeat(np.arange(len(y)), w.astype(int))
        per = per_finding_sklearn(y[rows], s[rows], t)
        for m, by_group in out.items():
            for g, values in by_group.items():
                members = [
                    f for f in FINDINGS if g in (groups_of[f], "all") and not np.isnan(full[m][f])
                ]
                values.append(np.mean([per[m][f] for f in members]) if members else np.nan)
    return {m: {g: np.array(v) for g, v in d.items()} for m, d in out.items()}


def per_finding_sklearn(y, s, t):
    per = {m: {} for m in ("auroc", "auprc", "balanced_accuracy")}
    for i, f in enumerate(FINDINGS):
        both = 0 < y[:, i].sum() < len(y)
        per["auroc"][f] = roc_auc_score(y[:, i], s[:, i]) if both else np.nan
        per["auprc"][f] = average_precision_score(y[:, i], s[:, i]) if y[:, i].sum() else np.nan
        if both and not np.isnan(t[i]):
            per["balanced_accuracy"][f] = balanced_accuracy_score(
                y[:, i], (s[:, i] >= t[i]).astype(int)
            )
        else:
            per["balanced_accuracy"][f] = np.nan
    return per


def test_group_bootstrap_matches_expanded_rows_and_nanquantile():
    n_resamples, seed, confidence = 40, 11, 0.9
    y, s, t, patients, _, groups = tables(n_resamples, seed, confidence)
    groups_of = longtail.frequency_groups(TRAIN, 1001, 100)
    got = longtail.group_bootstrap_samples(
        y, s, t, patients, groups_of, n_resamples=n_resamples, seed=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = expanded_group_samples(
            y, s, t, patients, groups_of, n_resamples=n_resamples, seed=seed
        )
    for m in ref:
        for g in ref[m]:
            # the first few resamples, one by one
            np.testing.assert_allclose(got[m][g][:5], ref[m][g][:5], rtol=1e-10, equal_nan=True)
            np.testing.assert_allclose(got[m][g], ref[m][g], rtol=1e-10, equal_nan=True)
    by_group = groups.set_index("group")
    alpha = (1 - confidence) / 2
    for m in ref:
        c = longtail.GROUP_COLUMNS[m]  # auprc -> mAP
        for g in ref[m]:
            lo, hi = np.nanquantile(ref[m][g], [alpha, 1 - alpha])
            assert by_group.loc[g, f"{c}_ci_low"] == pytest.approx(lo)
            assert by_group.loc[g, f"{c}_ci_high"] == pytest.approx(hi)
            assert by_group.loc[g, f"{c}_ci_low"] <= by_group.loc[g, f"{c}_ci_high"]
            assert by_group.loc[g, f"{c}_resamples_dropped"] == np.isnan(ref[m][g]).sum()
    # Fibrosis (3 positive patients, medium group here) is lost by some resamples: dropped
    assert by_group.loc["medium", "auroc_resamples_dropped"] > 0


def test_group_table_columns_and_seed():
    *_, g1 = tables(n_resamples=20, seed=3)
    *_, g2 = tables(n_resamples=20, seed=3)
    assert list(g1.columns) == [
        "group",
        "findings",
        "n_findings",
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "mAP",
        "mAP_ci_low",
        "mAP_ci_high",
        "balanced_accuracy",
        "balanced_accuracy_ci_low",
        "balanced_accuracy_ci_high",
        "auroc_resamples_dropped",
        "mAP_resamples_dropped",
        "balanced_accuracy_resamples_dropped",
    ]
    assert g1.equals(g2)


def test_long_tail_tables_input_errors():
    y, s, t, patients = data()
    with pytest.raises(ValueError, match="train_positives"):
        longtail.long_tail_tables(y, s, t, {"Atelectasis": 1}, patients, head_min=10, tail_max=1)
    with pytest.raises(ValueError, match="patient_ids"):
        longtail.long_tail_tables(y, s, t, TRAIN, patients[:-1], head_min=10, tail_max=1)


def test_old_auprc_group_columns_are_read_as_map():
    """long_tail.csv and bundles written before issue 20 name the group mean AUPRC `auprc`."""
    import pandas as pd

    old = pd.DataFrame({"group": ["tail"], "auprc": [0.25], "auprc_ci_low": [0.1], "auroc": [0.7]})
    new = longtail.read_group_table(old)
    assert list(new.columns) == ["group", "mAP", "mAP_ci_low", "auroc"]
    row = old.iloc[0].to_dict()
    assert longtail.group_field(row, "mAP") == 0.25
    assert longtail.group_field(row, "mAP_ci_low") == 0.1
    assert longtail.group_field(row, "mAP_ci_high") is None
    assert longtail.group_field({"mAP": 0.3, "auprc": 0.9}, "mAP") == 0.3  # the new name wins
    assert longtail.read_group_table(new).equals(new)


def test_ranking_by_tail_map_and_auroc_with_the_paired_test_against_the_leader():
    import pandas as pd

    def table(m, auroc):
        return pd.DataFrame(
            [
                {"group": "head", "findings": "A", "mAP": 0.9, "auroc": 0.9},
                {
                    "group": "tail",
                    "findings": "Hernia|Nodule",
                    "mAP": m,
                    "mAP_ci_low": m - 0.1,
                    "mAP_ci_high": m + 0.1,
                    "auroc": auroc,
                    "auroc_ci_low": auroc - 0.1,
                    "auroc_ci_high": auroc + 0.1,
                },
            ]
        )

    groups = {"a": table(0.20, 0.80), "b": table(0.35, 0.70), "c": table(0.20, np.nan)}
    # the old name (a file from before issue 20) is read as mAP
    groups["c"] = groups["c"].rename(columns={"mAP": "auprc"})
    calls = []

    def paired(model, leader, metric):
        calls.append((model, leader, metric))
        p = {"a": 0.01, "c": 0.04}[model] if metric == "auprc" else 0.2
        return {
            "delta": -0.1,
            "ci_low": -0.2,
            "ci_high": -0.01,
            "p_value": p,
            "seeds": 1,
            "resamples_dropped": 3,
        }

    ranking = longtail.group_ranking(groups, paired, group="tail", confidence=0.95)
    assert list(ranking.columns) == list(longtail.RANKING_COLUMNS)
    by_map = ranking[ranking["metric"] == "mAP"]
    assert by_map["model"].tolist() == ["b", "a", "c"]
    assert by_map["rank"].tolist() == [1, 2, 2]  # equal values share a rank
    assert (by_map["leader"] == "b").all()
    assert sorted(calls[:2]) == [("a", "b", "auprc"), ("c", "b", "auprc")]
    # Holm over the two comparisons: 0.01 -> 0.02, 0.04 -> 0.04
    holm = by_map.set_index("model")["p_holm"]
    assert holm["a"] == pytest.approx(0.02) and holm["c"] == pytest.approx(0.04)
    assert pd.isna(by_map.iloc[0]["differs_from_leader"]) and by_map.iloc[0]["method"] == ""
    by_auroc = ranking[ranking["metric"] == "auroc"]
    assert by_auroc["model"].tolist() == ["a", "b", "c"]  # undefined last, never tested
    assert calls[2:] == [("b", "a", "auroc")]
    assert not by_auroc.iloc[1]["differs_from_leader"]
    assert longtail.group_ranking({}, paired).empty
