"""The Google 2019 expert relabels: parsing (real file and malformed rows), the mapping from
the 14 NIH findings, the NIH-vs-expert AUROC comparison, and the phantom's expert file."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data_missing
from sklearn.metrics import roc_auc_score

from rare_cxr.evaluation.bootstrap import patient_weights
from rare_cxr.evaluation.expert import (
    COMPARISON_COLUMNS,
    EVALUATED_FINDINGS,
    EXPERT_FINDINGS,
    EXPERT_HEADER,
    LABEL_COLUMNS,
    NIH_SOURCES,
    expert_comparison,
    map_nih_labels,
    map_scores,
    parse_expert_labels,
)
from rare_cxr.findings import FINDINGS
from rare_cxr.phantom import sample_cohort, split_patients, validate_params
from rare_cxr.phantom.writer import data_entry_csv, expert_labels_csv
from rare_cxr.pipelines.data_processing.nodes import parse_labels

REAL_FILE = "google2019_nih-chest-xray-labels.csv.gz"
# Header of the real file, copied from it (16 fields).
REAL_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],Fracture,Pneumothorax,"
    "Airspace opacity,Nodule or mass,Set Id"
)
ROW = "00000013_008.png,No Finding,8,13,60,M,AP,3056,2544,0.139,0.139,{f},{p},{a},{n},{s}"


def row(*, f="NO", p="NO", a="NO", n="NO", s="test", image="00000013_008.png", patient="13"):
    text = ROW.format(f=f, p=p, a=a, n=n, s=s)
    return text.replace("00000013_008.png", image).replace(",8,13,", f",8,{patient},")


# ------------------------------------------------------------------ the real file


@pytest.mark.real_data
def test_parse_the_real_google_file(nih_meta: Path):
    if not (nih_meta / REAL_FILE).exists():
        shared_data_missing(f"{REAL_FILE} not found in {nih_meta} (set RARE_CXR_SHARED_DATA)")
    raw = gzip.decompress((nih_meta / REAL_FILE).read_bytes()).decode("utf-8")
    assert "\r\n" in raw  # the real file's Windows line ends reach the parser as they are
    labels = parse_expert_labels(raw)
    assert list(labels.columns) == list(LABEL_COLUMNS)
    assert labels["set"].value_counts().to_dict() == {"val": 2414, "test": 1962}
    assert labels["image_id"].is_unique and not labels["image_id"].str.endswith("\r").any()
    for column in ("fracture", "pneumothorax", "airspace_opacity", "nodule_or_mass"):
        assert labels[column].dtype == np.int8
    # YES per finding and set, counted in the file itself by plain text splitting
    lines = raw.splitlines()
    header = lines[0].split(",")
    assert lines[0] == REAL_HEADER == EXPERT_HEADER
    fields = [line.split(",") for line in lines[1:]]
    for name, column in (
        ("Fracture", "fracture"),
        ("Pneumothorax", "pneumothorax"),
        ("Airspace opacity", "airspace_opacity"),
        ("Nodule or mass", "nodule_or_mass"),
    ):
        k = header.index(name)
        for split in ("val", "test"):
            yes = sum(f[k] == "YES" and f[-1] == split for f in fields)
            assert int(labels.loc[labels["set"] == split, column].sum()) == yes, (name, split)
    # and the numbers themselves (test set), so a miscount in both places cannot agree
    test = labels[labels["set"] == "test"]
    columns = ["fracture", "pneumothorax", "airspace_opacity", "nodule_or_mass"]
    assert test[columns].sum().tolist() == [72, 195, 1135, 295]
    val = labels[labels["set"] == "val"]
    assert val[columns].sum().tolist() == [114, 43, 1031, 310]
    # the sets follow the official split lists
    test_list = set((nih_meta / "test_list.txt").read_text().split())
    assert set(test["image_id"]) <= test_list
    assert not set(labels.loc[labels["set"] == "val", "image_id"]) & test_list


# ------------------------------------------------------------------ malformed input


def test_parse_accepts_crlf_bom_and_missing_final_newline():
    text = "\ufeff" + "\r\n".join([REAL_HEADER, row(p="YES"), row(image="x.png", a="YES")])
    out = parse_expert_labels(text)
    assert out["image_id"].tolist() == ["00000013_008.png", "x.png"]
    assert out["pneumothorax"].tolist() == [1, 0]
    assert out["airspace_opacity"].tolist() == [0, 1]
    assert out["set"].tolist() == ["test", "test"]
    assert parse_expert_labels("\n".join([REAL_HEADER, row()]) + "\n\n").shape == (1, 7)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row(), row(image="b.png", p="MAYBE")], r"line 3, column 'Pneumothorax'.*'MAYBE'"),
        ([row(n="yes")], r"line 2, column 'Nodule or mass': expected YES or NO, got 'yes'"),
        ([row(a="")], r"line 2, column 'Airspace opacity'"),
        ([row(s="train")], r"line 2, column 'Set Id'.*'train'"),
        ([row(patient="P13")], r"line 2, column 'Patient ID'.*'P13'"),
        ([row(), row()], r"line 3, column 'Image Index'.*already on line 2"),
        ([row(image="")], r"line 2, column 'Image Index' is empty"),
        ([row() + ",extra"], r"line 2 has 17 fields, expected 16"),
        ([row(), row().rsplit(",", 1)[0]], r"line 3 has 15 fields"),
    ],
)
def test_malformed_rows_name_the_line_and_column(rows: list[str], message: str):
    with pytest.raises(ValueError, match=message):
        parse_expert_labels("\r\n".join([REAL_HEADER, *rows]))


def test_wrong_header_or_empty_file_is_refused():
    with pytest.raises(ValueError, match="line 1 is not the Google 2019 header"):
        parse_expert_labels(REAL_HEADER.replace("Fracture", "Fractures") + "\n" + row())
    with pytest.raises(ValueError, match="empty"):
        parse_expert_labels("\r\n")


# ------------------------------------------------------------------ the mapping


def frame_of(rows: list[dict[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{f: r.get(f, 0) for f in FINDINGS} for r in rows])


def test_mapping_rule_is_the_documented_one():
    assert EXPERT_FINDINGS == ("Pneumothorax", "Nodule or mass", "Airspace opacity", "Fracture")
    assert EVALUATED_FINDINGS == ("Pneumothorax", "Nodule or mass", "Airspace opacity")
    assert NIH_SOURCES["Fracture"] == ()
    assert "Atelectasis" not in NIH_SOURCES["Airspace opacity"]
    assert all(n in FINDINGS for sources in NIH_SOURCES.values() for n in sources)


def test_map_scores_takes_the_maximum_of_the_mapped_findings():
    predictions = frame_of(
        [
            {"Nodule": 0.2, "Mass": 0.7, "Pneumothorax": 0.1, "Edema": 0.3, "Atelectasis": 0.99},
            {"Nodule": 0.6, "Mass": 0.1, "Consolidation": 0.05, "Infiltration": 0.4},
            {"Pneumonia": 0.8, "Effusion": 0.9, "Pneumothorax": 0.55},
        ]
    )
    out = map_scores(predictions)
    assert list(out.columns) == ["pneumothorax", "nodule_or_mass", "airspace_opacity"]
    assert out["pneumothorax"].tolist() == pytest.approx([0.1, 0.0, 0.55])
    assert out["nodule_or_mass"].tolist() == pytest.approx([0.7, 0.6, 0.0])
    # Atelectasis (0.99) and Effusion (0.9) do not feed airspace opacity
    assert out["airspace_opacity"].tolist() == pytest.approx([0.3, 0.4, 0.8])
    with_nan = predictions.astype(float)
    with_nan.loc[0, "Nodule"] = np.nan
    assert math.isnan(map_scores(with_nan).loc[0, "nodule_or_mass"])
    with pytest.raises(ValueError, match=r"predictions: missing finding column\(s\) \['Mass'\]"):
        map_scores(predictions.drop(columns="Mass"))


def test_map_nih_labels_is_an_or_of_the_mapped_findings():
    labels = frame_of(
        [
            {"Mass": 1},
            {"Nodule": 1, "Mass": 1, "Edema": 1},
            {"Atelectasis": 1, "Effusion": 1},
            {"Pneumothorax": 1, "Infiltration": 1},
            {},
        ]
    ).astype(np.int8)
    out = map_nih_labels(labels)
    assert out["nodule_or_mass"].tolist() == [1, 1, 0, 0, 0]
    assert out["airspace_opacity"].tolist() == [0, 1, 0, 1, 0]
    assert out["pneumothorax"].tolist() == [0, 0, 0, 1, 0]
    assert (out.dtypes == np.int8).all()
    labels.loc[4, "Pneumonia"] = 2
    with pytest.raises(ValueError, match="must be 0/1"):
        map_nih_labels(labels)


# ------------------------------------------------------------------ the comparison


def comparison_data(seed: int = 0):
    """Predictions on val + test, NIH labels, and an expert file that covers only part of it."""
    rng = np.random.default_rng(seed)
    n = 160
    ids = [f"{i:08d}_000.png" for i in range(n)]
    patients = np.repeat(np.arange(n // 2), 2)  # two images per patient
    truth = rng.random((n, 3)) < [0.2, 0.25, 0.4]  # pneumothorax, nodule/mass, opacity
    labels = pd.DataFrame(0, index=range(n), columns=list(FINDINGS), dtype=np.int8)
    flip = rng.random((n, 3)) < 0.2  # NIH = truth with 20 % of labels flipped
    nih = truth ^ flip
    labels["Pneumothorax"] = nih[:, 0].astype(np.int8)
    labels["Nodule"] = (nih[:, 1] & (rng.random(n) < 0.5)).astype(np.int8)
    labels["Mass"] = (nih[:, 1] & ~labels["Nodule"].astype(bool)).astype(np.int8)
    labels["Edema"] = nih[:, 2].astype(np.int8)
    labels.insert(0, "image_id", ids)
    labels.insert(1, "patient_id", patients)
    scores = np.round(np.clip(truth * 0.35 + rng.random((n, 3)) * 0.65, 0, 1), 2)  # ties
    predictions = pd.DataFrame(rng.random((n, len(FINDINGS))) * 0.1, columns=list(FINDINGS))
    predictions["Pneumothorax"] = scores[:, 0]
    predictions["Mass"] = scores[:, 1]
    predictions["Consolidation"] = scores[:, 2]
    predictions.insert(0, "image_id", ids)
    predictions.insert(1, "patient_id", patients)
    predictions.insert(2, "split", np.where(np.arange(n) < 120, "test", "val"))
    # the expert file: images 20..139 (20..119 test, 120..139 "test" here but val in the
    # predictions: not test images) plus 5 images nobody predicted
    rows = []
    for i in range(20, 140):
        rows.append((ids[i], patients[i], "test", 0, *truth[i].astype(int)))
    for k in range(5):
        rows.append((f"9{k:07d}_000.png", 900 + k, "test", 0, 1, 1, 1))
    for i in range(0, 20):
        rows.append((ids[i], patients[i], "val", 0, *truth[i].astype(int)))
    expert = pd.DataFrame(
        rows,
        columns=[
            "image_id",
            "patient_id",
            "set",
            "fracture",
            "pneumothorax",
            "nodule_or_mass",
            "airspace_opacity",
        ],
    )
    return predictions, labels, expert, truth, nih, scores, patients


def test_expert_comparison_matches_sklearn_on_the_same_images():
    predictions, labels, expert, truth, nih, scores, patients = comparison_data()
    out = expert_comparison(predictions, labels, expert, n_resamples=30, seed=4, confidence=0.9)
    assert list(out.columns) == list(COMPARISON_COLUMNS)
    assert out["expert_finding"].tolist() == list(EVALUATED_FINDINGS)
    same = np.arange(20, 120)  # expert test AND prediction test AND labelled
    assert (out["n_images"] == 100).all() and (out["n_patients"] == 50).all()
    # hand bootstrap: the same patient draws, sklearn with sample weights
    order = np.array(sorted(range(len(same)), key=lambda k: f"{same[k]:08d}"))
    w = np.concatenate(list(patient_weights(patients[same][order], 30, 4)))
    for k, column in enumerate(("pneumothorax", "nodule_or_mass", "airspace_opacity")):
        got = out.iloc[k]
        sources = {
            "pneumothorax": ["Pneumothorax"],
            "nodule_or_mass": ["Nodule", "Mass"],
            "airspace_opacity": ["Consolidation", "Infiltration", "Pneumonia", "Edema"],
        }[column]
        s = predictions[sources].to_numpy()[same].max(axis=1)
        assert np.array_equal(s, scores[same, k]) == (column == "pneumothorax")
        assert got["positives_nih"] == nih[same, k].sum()
        assert got["positives_expert"] == truth[same, k].sum()
        for ref, y in (("nih", nih[same, k]), ("expert", truth[same, k])):
            assert got[f"auroc_{ref}"] == pytest.approx(roc_auc_score(y, s)), (column, ref)
            resampled = [
                roc_auc_score(y[order], s[order], sample_weight=w[r]) for r in range(len(w))
            ]
            assert got[f"auroc_{ref}_ci_low"] == pytest.approx(np.quantile(resampled, 0.05))
            assert got[f"auroc_{ref}_ci_high"] == pytest.approx(np.quantile(resampled, 0.95))
        # the scores were built from the truth: the experts' reference rates them higher
        assert got["auroc_expert"] > got["auroc_nih"]


def test_expert_comparison_needs_common_images_and_finite_scores():
    predictions, labels, expert, *_ = comparison_data()
    with pytest.raises(ValueError, match="no test image"):
        expert_comparison(predictions.iloc[120:], labels, expert, n_resamples=5)
    broken = predictions.copy()
    broken.loc[50, "Mass"] = np.nan
    broken.loc[50, "Nodule"] = np.nan
    with pytest.raises(ValueError, match="NaN score for 'Nodule or mass'"):
        expert_comparison(broken, labels, expert, n_resamples=5)
    with pytest.raises(ValueError, match="confidence"):
        expert_comparison(predictions, labels, expert, n_resamples=5, confidence=0)


# ------------------------------------------------------------------ the phantom's file


def phantom(label_noise: float):
    params = validate_params(
        {"n_patients": 40, "label_noise": label_noise, "prevalence_scale": 4.0, "seed": 3}
    )
    plans = sample_cohort(params)
    test_ids = {p.image_id for p in plans if p.patient_id in split_patients(params, plans)}
    return params, plans, test_ids


def test_phantom_expert_file_has_the_google_layout_and_the_planted_truth():
    params, plans, test_ids = phantom(label_noise=0.3)
    text = expert_labels_csv(plans, params.image_size, test_ids)
    lines = text.split("\r\n")
    assert lines[0] == REAL_HEADER and not text.endswith("\n")  # as the real file
    assert all(len(line.split(",")) == 16 for line in lines)
    out = parse_expert_labels(text)
    assert sorted(out["image_id"]) == sorted(p.image_id for p in plans)
    assert set(out.loc[out["set"] == "test", "image_id"]) == test_ids
    assert 0 < len(test_ids) < len(plans)
    assert out["set"].tolist() == sorted(out["set"].tolist(), key=lambda s: s != "test")
    assert (out["fracture"] == 0).all()
    by_id = out.set_index("image_id")
    for plan in plans:
        got = by_id.loc[plan.image_id]
        assert got["patient_id"] == plan.patient_id
        planted = set(plan.findings)
        assert got["pneumothorax"] == int("Pneumothorax" in planted)
        assert got["nodule_or_mass"] == int(bool(planted & {"Nodule", "Mass"}))
        opacity = planted & {"Consolidation", "Infiltration", "Pneumonia", "Edema"}
        assert got["airspace_opacity"] == int(bool(opacity))
    assert out[["pneumothorax", "nodule_or_mass", "airspace_opacity"]].sum().min() > 0
    # the Data_Entry columns are Data_Entry's own (the recorded, noisy labels)
    entry_rows = {
        line.split(",")[0]: line for line in data_entry_csv(plans, params.image_size).split("\n")
    }
    for line in lines[1:4]:
        assert line.rsplit(",", 5)[0] == entry_rows[line.split(",")[0]]


def test_phantom_with_label_noise_expert_file_keeps_the_truth_data_entry_does_not():
    for noise in (0.3, 0.0):
        params, plans, test_ids = phantom(label_noise=noise)
        entry = data_entry_csv(plans, params.image_size)
        nih, _ = parse_labels(
            entry, {"source": "Data_Entry_2017_v2020.csv", "max_age": 120, "report_examples": 0}
        )
        nih_mapped = map_nih_labels(nih).set_index(nih["image_id"].astype(str))
        expert = parse_expert_labels(expert_labels_csv(plans, params.image_size, test_ids))
        expert = expert.set_index("image_id").loc[nih_mapped.index, nih_mapped.columns]
        disagree = int((nih_mapped != expert).to_numpy().sum())
        if noise > 0:
            assert disagree > 0
        else:
            assert disagree == 0
