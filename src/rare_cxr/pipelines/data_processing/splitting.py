"""Patient-level splits: the official NIH lists, or iterative multi-label stratification.

Why patient level: NIH has up to 184 images of one patient; an image-level split puts the same
patient (and nearly the same radiograph) in train and test and inflates every metric. Every
function here works on patients and the result is checked to be patient-disjoint.

Why our own stratifier: scikit-learn has `StratifiedGroupKFold` (single label only) and
`MultilabelStratifiedKFold` lives in a separate package without groups; nothing stratifies
*groups* (patients) on *multi-label* targets with arbitrary fractions. The algorithm below is
Sechidis, Tsoumakas & Vlahavas (2011), "On the stratification of multi-label data", applied to
patients: each patient is one example whose label vector is its number of positive images per
finding, and whose size is its number of images. Rarest finding first, each of its patients
goes to the split that still wants the most positives of that finding. One addition: a split
that has no positive of the finding yet is served first, so every finding reaches every split
whenever it has at least as many patients as there are splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rare_cxr.findings import FINDINGS

from .parsing import _UNSAFE_NAME, InputDataError

TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLIT_NAMES = ("train", "val", "test")


def read_list(text: str, name: str) -> pd.DataFrame:
    """One image name per line -> DataFrame(image_id, line); errors name the file and line."""
    if not isinstance(text, str):
        raise InputDataError(f"{name}: expected text, got {type(text).__name__}")
    if "\x00" in text:
        raise InputDataError(f"{name}, line 1: not a text list of image names (binary data)")
    names = pd.Series(text.splitlines(), dtype="str").str.strip()
    table = pd.DataFrame({"image_id": names, "line": np.arange(1, len(names) + 1)})
    table = table.loc[table["image_id"] != ""].reset_index(drop=True)
    unsafe = table["image_id"].str.contains(_UNSAFE_NAME)
    if unsafe.any():
        bad = table.loc[unsafe].iloc[0]
        raise InputDataError(
            f"{name}, line {bad.line}: image name {bad.image_id!r} contains a path separator "
            "or '..'"
        )
    repeated = table["image_id"].duplicated()
    if repeated.any():
        bad = table.loc[repeated].iloc[0]
        first = table.loc[table["image_id"] == bad.image_id, "line"].iloc[0]
        raise InputDataError(
            f"{name}, line {bad.line}: duplicate image name {bad.image_id!r} "
            f"(first at line {first})"
        )
    return table


def _member(values: pd.Series, allowed: set[str]) -> np.ndarray:
    """Boolean mask `values in allowed`. A Python set lookup: pandas' `isin` on Arrow-backed
    strings walks the value list in Python and took seconds on 112,120 NIH names."""
    return np.fromiter((v in allowed for v in values.tolist()), dtype=bool, count=len(values))


def _examples(values: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def official_assignment(labels: pd.DataFrame, train_val_text: str, test_text: str) -> pd.Series:
    """Map image_id -> 'trainval'/'test' from the official lists, with consistency checks."""
    train_val = read_list(train_val_text, TRAIN_VAL_LIST)
    test = read_list(test_text, TEST_LIST)
    both = train_val.merge(test, on="image_id", suffixes=("_tv", "_test"))
    if not both.empty:
        first = both.iloc[0]
        raise InputDataError(
            f"{TEST_LIST}, line {first.line_test}: image {first.image_id!r} is also in "
            f"{TRAIN_VAL_LIST} (line {first.line_tv}); {len(both)} image(s) are in both lists"
        )
    known = set(labels["image_id"].tolist())
    for table, name in ((train_val, TRAIN_VAL_LIST), (test, TEST_LIST)):
        unknown = table.loc[~_member(table["image_id"], known)]
        if not unknown.empty:
            first = unknown.iloc[0]
            raise InputDataError(
                f"{name}, line {first.line}: image {first.image_id!r} is not in the label table; "
                f"{len(unknown)} entries of {name} are not in Data_Entry "
                f"({_examples(unknown['image_id'].tolist())}). Use the lists that came with "
                "this Data_Entry file"
            )
    listed = pd.concat(
        [train_val.assign(part="trainval"), test.assign(part="test")], ignore_index=True
    ).set_index("image_id")
    unlisted = labels.loc[~_member(labels["image_id"], set(listed.index)), "image_id"]
    if not unlisted.empty:
        raise InputDataError(
            f"{TRAIN_VAL_LIST} / {TEST_LIST}: {len(unlisted)} labelled image(s) are in neither "
            f"list ({_examples(unlisted.tolist())}); the official split must cover every image "
            "(or use data_processing.split.mode: stratified)"
        )
    part = labels["image_id"].map(listed["part"])
    per_patient = pd.DataFrame({"patient_id": labels["patient_id"], "part": part})
    parts = per_patient.groupby("patient_id")["part"].nunique()
    straddling = parts.index[parts > 1]
    if len(straddling):
        patient = int(straddling[0])
        rows = set(labels.loc[labels["patient_id"] == patient, "image_id"].tolist())
        in_tv = train_val.loc[_member(train_val["image_id"], rows)].iloc[0]
        in_test = test.loc[_member(test["image_id"], rows)].iloc[0]
        raise InputDataError(
            f"{TEST_LIST}, line {in_test.line}: patient {patient} has images in both lists "
            f"({in_test.image_id!r} here, {in_tv.image_id!r} at {TRAIN_VAL_LIST} line "
            f"{in_tv.line}); {len(straddling)} patient(s) straddle the lists, so the official "
            "split would leak patients"
        )
    return part


def patient_table(labels: pd.DataFrame) -> pd.DataFrame:
    """Per patient: number of images and positives per finding (sorted by patient id)."""
    grouped = labels.groupby("patient_id", sort=True)
    table = grouped[list(FINDINGS)].sum()
    table.insert(0, "images", grouped.size())
    return table


def assert_patient_disjoint(splits: pd.DataFrame) -> None:
    """Refuse to return a split in which any patient is in more than one part."""
    per_patient = splits.groupby("patient_id")["split"].nunique()
    leaking = per_patient.index[per_patient > 1]
    if len(leaking):
        raise RuntimeError(
            f"internal error: {len(leaking)} patient(s) in more than one split "
            f"({_examples([str(p) for p in leaking])}); refusing to write a leaking split"
        )


def split_report_table(labels: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per split (and `all`) and finding with counts and prevalence."""
    frame = labels[["image_id", "patient_id", *FINDINGS]].merge(
        splits[["image_id", "split"]], on="image_id", how="left", validate="one_to_one"
    )
    rows = []
    for name in (*SPLIT_NAMES, "all"):
        part = frame if name == "all" else frame.loc[frame["split"] == name]
        images = len(part)
        patients = int(part["patient_id"].nunique())
        for finding in FINDINGS:
            positives = int(part[finding].sum())
            rows.append(
                {
                    "split": name,
                    "finding": finding,
                    "patients": patients,
                    "images": images,
                    "positives": positives,
                    "positive_patients": int(part.loc[part[finding] > 0, "patient_id"].nunique()),
                    "prevalence": round(positives / images, 6) if images else 0.0,
                }
            )
    return pd.DataFrame(rows)
