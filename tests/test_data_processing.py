"""Unit tests of the data_processing nodes: parsing, bad input, image index, splits.

Tiny in-memory inputs, plus the real NIH metadata / sample images when ../shared is present.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rare_cxr.findings import FINDINGS
from rare_cxr.imaging import load_grayscale
from rare_cxr.pipelines.data_processing.nodes import index_images, parse_labels, split_patients
from rare_cxr.pipelines.data_processing.parsing import LABEL_COLUMNS, InputDataError
from rare_cxr.pipelines.data_processing.validation import ParameterError
from rare_cxr.stratification import iterative_stratification

HEADER_2020 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
LABEL_PARAMS = {"source": "Data_Entry_test.csv", "max_age": 120, "report_examples": 5}
IMAGE_PARAMS = {
    "on_missing": "drop",
    "on_corrupt": "drop",
    "check": "verify",
    "workers": 2,
    "progress": False,
    "report_examples": 5,
}
SPLIT_PARAMS = {"mode": "stratified", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 3}


def csv(*rows: str, header: str = HEADER_2020) -> str:
    return "\n".join([header, *rows]) + "\n"


def row(
    name: str,
    findings: str = "No Finding",
    follow: str = "0",
    *,
    patient: str | None = None,
    age: str = "58",
    sex: str = "M",
    view: str = "PA",
) -> str:
    patient = patient if patient is not None else str(int(name[:8]))
    return f"{name},{findings},{follow},{patient},{age},{sex},{view},2500,2048,0.168,0.168"


def parse(text: str):
    return parse_labels(text, LABEL_PARAMS)


# ---------------------------------------------------------------- parsing


def test_parse_contract_columns_and_types():
    labels, quality = parse(
        csv(
            row("00000001_000.png", "Cardiomegaly|Emphysema"),
            row("00000001_001.png", "No Finding", follow="3", age="059Y", sex="f", view="AP"),
            row("00000002_000.png", "Hernia"),
        )
    )
    assert tuple(labels.columns) == LABEL_COLUMNS
    assert labels["image_id"].tolist() == [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
    ]
    assert labels["patient_id"].dtype == np.int64 and labels["follow_up"].dtype == np.int64
    assert str(labels["age"].dtype) == "Int64" and labels["age"].tolist() == [58, 59, 58]
    assert labels["sex"].tolist() == ["M", "F", "M"] and labels["view"].tolist() == [
        "PA",
        "AP",
        "PA",
    ]
    assert all(labels[f].dtype == np.int8 for f in FINDINGS)
    assert labels.loc[0, ["Cardiomegaly", "Emphysema"]].tolist() == [1, 1]
    assert labels.loc[1, list(FINDINGS)].sum() == 0
    # the CSV's Follow-up # is used, not the file-name suffix; the difference is recorded
    assert labels["follow_up"].tolist() == [0, 3, 0]
    assert quality["oddities"]["follow_up_differs_from_file_name"]["count"] == 1


def test_original_2017_file_trailing_comma_and_age_above_120_flagged_not_fatal():
    header = HEADER_2020 + ","  # the original file ends every line with a comma
    text = csv(
        row("00000001_000.png") + ",",
        row("00000003_000.png", "Hernia", age="414") + ",",
        header=header,
    )
    labels, quality = parse(text)
    assert len(labels) == 2
    assert labels["age"].isna().tolist() == [False, True]
    oddity = quality["oddities"]["age_above_max"]
    assert oddity["count"] == 1
    assert oddity["examples"] == [{"row": 3, "image_id": "00000003_000.png", "value": "414"}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            csv(row("00000001_000.png")).replace("Patient Age,", "Age,"),
            r"Data_Entry_test\.csv, row 1 \(header\): missing required column\(s\) "
            r"\['Patient Age'\]",
        ),
        (
            csv(row("00000001_000.png"), row("00000002_000.png", "Mass|Pneumonitis")),
            r"Data_Entry_test\.csv, row 3: unknown finding name 'Pneumonitis'",
        ),
        (
            csv(row("00000001_000.png"), row("00000002_000.png"), row("00000001_000.png")),
            r"Data_Entry_test\.csv, row 4: duplicate image id '00000001_000\.png' "
            r"\(first seen at row 2\)",
        ),
        (
            csv(row("00000001_000.png"), row("00000002_000.png", patient="2x")),
            r"Data_Entry_test\.csv, row 3: malformed patient id '2x'",
        ),
        (
            csv(row("00000001_000.png", age="fifty")),
            r"Data_Entry_test\.csv, row 2: malformed age 'fifty'",
        ),
        (
            csv(row("00000001_000.png"), row("../etc/00000002_000.png", patient="2")),
            r"Data_Entry_test\.csv, row 3: image name '\.\./etc/00000002_000\.png' contains a path "
            r"separator or '\.\.'",
        ),
        (
            csv(row("00000001_000.png"), row("images\\00000002_000.png", patient="2")),
            r"row 3: image name .* contains a path separator",
        ),
        (
            csv(row("00000001_000.png"), row("00000002_000.png", sex="X")),
            r"row 3: malformed 'Patient Gender' 'X'",
        ),
        (
            csv(row("00000001_000.png", view="LL")),
            r"row 2: malformed 'View Position' 'LL'",
        ),
        (
            "\x1f\x8b\x08\x00\x00\x00\x00binary",
            r"Data_Entry_test\.csv, row 1: this is not CSV text \(binary data",
        ),
        (
            "<html><body>404 Not Found</body></html>\n",
            r"Data_Entry_test\.csv, row 1 \(header\): missing required column",
        ),
        (
            csv(row("00000001_000.png"), row("00000002_000.png") + ",extra,fields"),
            r"Data_Entry_test\.csv, row 3: this is not a valid CSV",
        ),
        ("", r"Data_Entry_test\.csv, row 1: the file is empty"),
    ],
    ids=[
        "missing-column",
        "unknown-finding",
        "duplicate-id",
        "bad-patient-id",
        "bad-age",
        "dotdot",
        "backslash",
        "bad-sex",
        "bad-view",
        "binary",
        "html",
        "field-count",
        "empty",
    ],
)
def test_bad_label_file_names_file_row_and_problem(text: str, expected: str):
    with pytest.raises(InputDataError, match=expected):
        parse(text)


def test_row_numbers_survive_blank_lines():
    text = csv(row("00000001_000.png"), "", row("00000002_000.png", patient="zz"))
    with pytest.raises(InputDataError, match=r"row 4: malformed patient id"):
        parse(text)


@pytest.mark.parametrize(
    ("node", "params", "message"),
    [
        (
            "labels",
            {**LABEL_PARAMS, "max_age": -1},
            r"data_processing\.labels\.max_age: expected a value >= 1, got -1",
        ),
        (
            "labels",
            {**LABEL_PARAMS, "maxage": 3},
            r"data_processing\.labels\.maxage: unknown key \(did you mean 'max_age'\?\)",
        ),
        (
            "images",
            {**IMAGE_PARAMS, "on_missing": "skip"},
            r"data_processing\.images\.on_missing: expected one of 'drop' or 'error', got 'skip'",
        ),
        (
            "split",
            {**SPLIT_PARAMS, "val_fraction": 1.5},
            r"data_processing\.split\.val_fraction: expected a value < 1\.0, got 1\.5",
        ),
        (
            "split",
            {**SPLIT_PARAMS, "val_fraction": 0.5, "test_fraction": 0.5},
            r"val_fraction \+ data_processing\.split\.test_fraction must be < 1",
        ),
        (
            "split",
            {k: v for k, v in SPLIT_PARAMS.items() if k != "seed"},
            r"data_processing\.split\.seed: required key is missing",
        ),
    ],
)
def test_parameters_are_checked_first_and_name_the_key(node, params, message):
    # the inputs are garbage on purpose: the parameter check must come first
    with pytest.raises(ParameterError, match=message):
        if node == "labels":
            parse_labels("not a csv", params)
        elif node == "images":
            index_images(pd.DataFrame(), {}, {}, params)
        else:
            split_patients(pd.DataFrame(), "", "", params)


# ---------------------------------------------------------------- images


def test_load_grayscale_modes(tmp_path: Path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    cases = {
        "L": Image.fromarray(grey),
        "RGBA": Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)])),
        "RGB": Image.fromarray(np.dstack([grey, grey, grey])),
        "LA": Image.fromarray(np.dstack([grey, np.full_like(grey, 7)]), mode="LA"),
        "P": Image.fromarray(grey).convert("P"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    for mode, image in cases.items():
        path = tmp_path / f"{mode.replace(';', '_')}.png"
        image.save(path)
        with Image.open(path) as reread:
            assert reread.mode.startswith(mode[0])
        out = load_grayscale(path)
        assert out.dtype == np.uint8 and out.shape == (8, 8), mode
        if mode == "P":
            assert np.abs(out.astype(int) - grey).max() <= 8  # palette quantisation
        else:
            np.testing.assert_array_equal(out, grey, err_msg=mode)


def _labels_for(names: list[str]) -> tuple[pd.DataFrame, dict]:
    return parse(csv(*(row(n) for n in names)))


def test_index_images_missing_and_corrupt_are_recorded(tmp_path: Path):
    names = ["00000001_000.png", "00000002_000.png", "00000003_000.png", "00000004_000.png"]
    labels, quality = _labels_for(names)
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / names[0])
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / names[1])
    payload = (tmp_path / names[0]).read_bytes()
    (tmp_path / names[2]).write_bytes(payload[: len(payload) - 20])  # truncated
    (tmp_path / "00000009_000.png").write_bytes(payload)  # on disk, not labelled
    found = {p.name: str(p) for p in tmp_path.glob("*.png") if p.name != names[3]}

    index, report = index_images(labels, quality, found, IMAGE_PARAMS)
    assert tuple(index.columns) == ("image_id", "path", "status", "width", "height", "mode")
    assert index["status"].tolist() == ["ok", "ok", "corrupt", "missing"]
    assert index.loc[0, ["width", "height", "mode"]].tolist() == [5, 6, "L"]
    assert pd.isna(index.loc[3, "path"])
    images = report["images"]
    assert images["missing"] == {"count": 1, "action": "drop", "examples": [names[3]]}
    assert (
        images["corrupt"]["count"] == 1 and images["corrupt"]["examples"][0]["image_id"] == names[2]
    )
    assert images["unlabelled_on_disk"] == {"count": 1, "examples": ["00000009_000.png"]}
    assert images["modes"] == {"L": 1, "RGBA": 1}
    assert images["sizes"] == {"4x4": 1, "5x6": 1}
    assert report["labels"]["rows"] == 4

    with pytest.raises(InputDataError, match=r"1 of 4 labelled images are missing \(00000004_000"):
        index_images(labels, quality, found, {**IMAGE_PARAMS, "on_missing": "error"})
    with pytest.raises(InputDataError, match=r"1 of 4 labelled images are corrupt.*00000003_000"):
        index_images(labels, quality, found, {**IMAGE_PARAMS, "on_corrupt": "error"})


# ---------------------------------------------------------------- splits


def _toy_labels(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(1, n_patients + 1):
        for follow in range(int(rng.integers(1, 4))):
            findings = [f for f in FINDINGS if rng.random() < 0.15] or ["No Finding"]
            rows.append(row(f"{patient:08d}_{follow:03d}.png", "|".join(findings), str(follow)))
    return parse(csv(*rows))[0]


def _lists(labels: pd.DataFrame, test_patients: set[int]) -> tuple[str, str]:
    is_test = labels["patient_id"].isin(test_patients)
    return (
        "\n".join(labels.loc[~is_test, "image_id"]),
        "\n".join(labels.loc[is_test, "image_id"]),
    )


def _overlap(splits: pd.DataFrame) -> int:
    return int((splits.groupby("patient_id")["split"].nunique() > 1).sum())


def test_stratified_split_is_patient_disjoint_deterministic_and_covers_findings():
    labels = _toy_labels()
    splits, report, summary = split_patients(labels, "", "", SPLIT_PARAMS)
    assert tuple(splits.columns) == ("image_id", "patient_id", "split")
    assert splits["image_id"].tolist() == labels["image_id"].tolist()
    assert set(splits["split"]) == {"train", "val", "test"}
    assert _overlap(splits) == 0 and summary["patient_overlap"] == 0
    per_split = report.loc[report["split"] != "all"]
    assert (per_split["positives"] > 0).all(), per_split.loc[per_split["positives"] == 0]
    assert summary["unrepresented"] == []
    again, _, _ = split_patients(labels, "", "", SPLIT_PARAMS)
    pd.testing.assert_frame_equal(splits, again)
    other, _, _ = split_patients(labels, "", "", {**SPLIT_PARAMS, "seed": 4})
    assert not other["split"].equals(splits["split"])


def test_rare_finding_reaches_every_split_when_possible():
    counts = np.zeros((30, 2))
    counts[:3, 0] = 1  # a finding carried by only three patients
    counts[:, 1] = 1
    assignment = iterative_stratification(counts, np.ones(30), (0.8, 0.1, 0.1), seed=0)
    assert sorted(assignment[:3]) == [0, 1, 2]


def test_official_split_uses_lists_exactly_and_carves_val_by_patient():
    labels = _toy_labels()
    train_val, test = _lists(labels, set(range(1, 61, 4)))
    params = {"mode": "official", "val_fraction": 0.2, "seed": 1}
    splits, _, summary = split_patients(labels, train_val, test, params)
    assert set(splits.loc[splits["split"] == "test", "image_id"]) == set(test.split("\n"))
    assert set(splits.loc[splits["split"] != "test", "image_id"]) == set(train_val.split("\n"))
    assert _overlap(splits) == 0
    assert summary["splits"]["val"]["patients"] > 0


def test_official_split_errors():
    labels = _toy_labels()
    params = {"mode": "official", "val_fraction": 0.2, "seed": 1}
    train_val, test = _lists(labels, {1, 2, 3})
    message = r"test_list\.txt, line 1: image '99999999_000\.png' is not in the label table"
    with pytest.raises(InputDataError, match=message):
        split_patients(labels, train_val, "99999999_000.png\n" + test, params)
    moved = train_val.split("\n")
    straddle = "\n".join(moved[1:])
    message = r"test_list\.txt, line 1: patient \d+ has images in both lists"
    with pytest.raises(InputDataError, match=message):
        split_patients(labels, straddle, moved[0] + "\n" + test, params)
    message = r"train_val_list\.txt, line 2: image name '\.\./x\.png' contains a path separator"
    with pytest.raises(InputDataError, match=message):
        split_patients(labels, moved[0] + "\n../x.png", test, params)
    with pytest.raises(InputDataError, match=r"labelled image\(s\) are in neither list"):
        split_patients(labels, "\n".join(moved[1:]), test, params)


# ---------------------------------------------------------------- real data


def _readme_counts(readme: Path) -> dict[str, int]:
    text = readme.read_text().split("## Finding counts", 1)[1]
    return {
        name: int(count.replace(",", ""))
        for name, count in re.findall(r"([A-Z][A-Za-z_ ]+?) ([\d,]+)[;.]", text)
    }


@pytest.fixture(scope="module")
def full_labels(nih_meta: Path) -> pd.DataFrame:
    with gzip.open(nih_meta / "Data_Entry_2017_v2020.csv.gz", "rt", encoding="utf-8") as handle:
        text = handle.read()
    return parse_labels(text, {**LABEL_PARAMS, "source": "Data_Entry_2017_v2020.csv.gz"})[0]


@pytest.mark.real_data
def test_real_full_metadata_counts(full_labels: pd.DataFrame, nih_meta: Path):
    expected = _readme_counts(nih_meta / "README.md")
    assert len(full_labels) == 112_120
    assert full_labels["patient_id"].nunique() == 30_805
    assert expected.pop("No Finding") == int((full_labels[list(FINDINGS)].sum(axis=1) == 0).sum())
    assert set(expected) == set(FINDINGS)
    assert full_labels[list(FINDINGS)].sum().to_dict() == expected


@pytest.mark.real_data
def test_real_official_split_reproduces_lists(full_labels: pd.DataFrame, nih_meta: Path):
    train_val = (nih_meta / "train_val_list.txt").read_text()
    test = (nih_meta / "test_list.txt").read_text()
    params = {"mode": "official", "val_fraction": 0.1, "seed": 0}
    splits, _, summary = split_patients(full_labels, train_val, test, params)
    assert set(splits.loc[splits["split"] == "test", "image_id"]) == set(test.split())
    assert set(splits.loc[splits["split"] != "test", "image_id"]) == set(train_val.split())
    assert (splits["split"] == "test").sum() == 25_596
    assert _overlap(splits) == 0
    assert summary["unrepresented"] == []


@pytest.mark.real_data
def test_real_stratified_split(full_labels: pd.DataFrame):
    splits, report, summary = split_patients(full_labels, "", "", SPLIT_PARAMS)
    assert _overlap(splits) == 0
    assert (report.loc[report["split"] != "all", "positives"] > 0).all()
    fractions = {k: summary["splits"][k]["image_fraction"] for k in ("train", "val", "test")}
    assert fractions == pytest.approx({"train": 0.6, "val": 0.2, "test": 0.2}, abs=0.01)


@pytest.mark.real_data
def test_real_sample_images_indexed_and_rgba_grey(nih_sample: Path):
    labels, quality = parse_labels(
        (nih_sample / "Data_Entry_2017_v2020.csv").read_text(), LABEL_PARAMS
    )
    assert len(labels) == 215
    # 17 `_000` files have a non-zero Follow-up # in v2020: the CSV value is the one kept
    assert (labels["follow_up"] != 0).sum() == 17
    found = {p.name: str(p) for p in (nih_sample / "images").glob("*.png")}
    index, report = index_images(labels, quality, found, IMAGE_PARAMS)
    assert (index["status"] == "ok").all()
    assert (index["width"] == 1024).all() and (index["height"] == 1024).all()
    assert report["images"]["modes"] == {"L": 213, "RGBA": 2}
    for name in ("00001369_000.png", "00002578_000.png"):
        with Image.open(nih_sample / "images" / name) as image:
            assert image.mode == "RGBA"
            rgba = np.asarray(image)
        grey = load_grayscale(nih_sample / "images" / name)
        assert grey.dtype == np.uint8 and grey.shape == (1024, 1024)
        np.testing.assert_array_equal(grey, rgba[..., 0])
