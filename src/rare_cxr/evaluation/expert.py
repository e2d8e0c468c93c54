"""The Google 2019 expert relabels of ChestX-ray14 as a second test reference.

NIH's labels were mined from reports by NLP and are noisy; Google Health had 4 findings of
4,376 images re-read by radiologists (Majkowska et al., Radiology 2019: 2,414 `val` images
from NIH's train_val list, 1,962 `test` images from its test list). Scoring the *same* test
images against both references shows how much of a model's measured AUROC is the label noise
of the reference -- the question every NIH-trained result invites.

The expert file's findings are not NIH's, so each is mapped to the project's 14 findings (a
model's score: the maximum of the mapped findings' probabilities -- the probability of "any of
them" is at least the largest one; an NIH label: their OR):

* Pneumothorax -> Pneumothorax (the same finding).
* Nodule or mass -> Nodule, Mass. The experts did not separate the two (NIH's own split is a
  size threshold of 3 cm that report text rarely states).
* Airspace opacity -> Consolidation, Infiltration, Pneumonia, Edema: the four NIH findings
  whose radiographic sign is alveolar space filled with fluid, pus or cells, i.e. what
  "airspace opacity" means. Atelectasis is left out: its opacity is collapsed lung (volume
  loss), not filled airspace, and NIH's mined Atelectasis labels are mostly linear or
  subsegmental. On the real test rows adding it does not raise the agreement with the
  experts (Cohen's kappa 0.278 either way) but lowers the share of NIH-positive images the
  experts confirm (0.81 -> 0.77; NIH images with Atelectasis and none of the four are
  confirmed only 66 of 119 times), while its prevalence (the third most common NIH label)
  would make the column largely an atelectasis comparison. It is a choice: `NIH_SOURCES`
  states it in one place.
* Fracture -> nothing: NIH has no fracture label, so no NIH-trained model scores it and it is
  not evaluated (`EVALUATED_FINDINGS` excludes it); the column is still parsed and kept.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd

from rare_cxr.evaluation.bootstrap import patient_weights, percentile_interval, weighted_auroc

EXPERT_FINDINGS: tuple[str, ...] = (
    "Pneumothorax",
    "Nodule or mass",
    "Airspace opacity",
    "Fracture",
)

# NIH findings (FINDINGS spelling) behind each expert finding; empty = no NIH counterpart.
NIH_SOURCES: dict[str, tuple[str, ...]] = {
    "Pneumothorax": ("Pneumothorax",),
    "Nodule or mass": ("Nodule", "Mass"),
    "Airspace opacity": ("Consolidation", "Infiltration", "Pneumonia", "Edema"),
    "Fracture": (),
}
EVALUATED_FINDINGS: tuple[str, ...] = tuple(f for f in EXPERT_FINDINGS if NIH_SOURCES[f])

# Column names in this project's frames (snake case, as the rest of the code base).
EXPERT_COLUMNS: dict[str, str] = {
    "Fracture": "fracture",
    "Pneumothorax": "pneumothorax",
    "Airspace opacity": "airspace_opacity",
    "Nodule or mass": "nodule_or_mass",
}

# The file's header: Data_Entry's 9 names (11 fields: two names hold a comma), the 4 expert
# findings in the file's order, then the set.
DATA_ENTRY_FIELDS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
FILE_FINDINGS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
EXPERT_FIELDS: tuple[str, ...] = (*DATA_ENTRY_FIELDS, *FILE_FINDINGS, "Set Id")
EXPERT_HEADER = ",".join(EXPERT_FIELDS)
SETS = ("val", "test")
YES_NO = {"YES": 1, "NO": 0}

LABEL_COLUMNS = ("image_id", "patient_id", "set", *(EXPERT_COLUMNS[f] for f in FILE_FINDINGS))
COMPARISON_COLUMNS = (
    "expert_finding",
    "n_images",
    "n_patients",
    "positives_nih",
    "positives_expert",
    "auroc_nih",
    "auroc_nih_ci_low",
    "auroc_nih_ci_high",
    "auroc_expert",
    "auroc_expert_ci_low",
    "auroc_expert_ci_high",
)


def parse_expert_labels(text: str) -> pd.DataFrame:
    """The expert CSV's text -> `image_id, patient_id, set` and the 4 findings as int8 0/1.

    Strict, because the file is a reference standard: the header must be the Google layout,
    every row must have its 16 fields, findings must read YES or NO and `Set Id` val or test,
    and an image may appear once. Errors name the file line (the header is line 1) and the
    column. Windows line ends (the real file's `\\r\\n`), a missing final newline and a
    byte-order mark are accepted; the `.csv.gz` is decompressed by the caller.
    """
    lines = text.lstrip("\ufeff").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError("expert labels: the file is empty (expected the Google 2019 header)")
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header = tuple(field.strip() for field in rows[0])
    if header != EXPERT_FIELDS:
        raise ValueError(
            f"expert labels: line 1 is not the Google 2019 header; expected {EXPERT_HEADER!r}, "
            f"got {','.join(rows[0])!r}"
        )
    column = {name: i for i, name in enumerate(EXPERT_FIELDS)}
    out: dict[str, list] = {c: [] for c in LABEL_COLUMNS}
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(EXPERT_FIELDS):
            raise ValueError(
                f"expert labels: line {line} has {len(row)} fields, expected "
                f"{len(EXPERT_FIELDS)}: {','.join(row)!r}"
            )

        def field(name: str, row: list[str] = row) -> str:
            return row[column[name]].strip()

        image = field("Image Index")
        if not image:
            raise ValueError(f"expert labels: line {line}, column 'Image Index' is empty")
        if image in seen:
            raise ValueError(
                f"expert labels: line {line}, column 'Image Index': {image!r} already on line "
                f"{seen[image]}"
            )
        seen[image] = line
        try:
            patient = int(field("Patient ID"))
        except ValueError:
            raise ValueError(
                f"expert labels: line {line}, column 'Patient ID': expected an integer, got "
                f"{field('Patient ID')!r}"
            ) from None
        split = field("Set Id")
        if split not in SETS:
            raise ValueError(
                f"expert labels: line {line}, column 'Set Id': expected one of {SETS}, got "
                f"{split!r}"
            )
        out["image_id"].append(image)
        out["patient_id"].append(patient)
        out["set"].append(split)
        for name in FILE_FINDINGS:
            value = field(name)
            if value not in YES_NO:
                raise ValueError(
                    f"expert labels: line {line}, column {name!r}: expected YES or NO, got "
                    f"{value!r}"
                )
            out[EXPERT_COLUMNS[name]].append(YES_NO[value])
    frame = pd.DataFrame(out, columns=list(LABEL_COLUMNS))
    frame["image_id"] = frame["image_id"].astype(str)
    frame["patient_id"] = frame["patient_id"].astype(np.int64)
    frame["set"] = frame["set"].astype(str)
    for name in FILE_FINDINGS:
        frame[EXPERT_COLUMNS[name]] = frame[EXPERT_COLUMNS[name]].astype(np.int8)
    return frame


def _require_findings(frame: pd.DataFrame, what: str) -> None:
    needed = sorted({nih for name in EVALUATED_FINDINGS for nih in NIH_SOURCES[name]})
    missing = [f for f in needed if f not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing finding column(s) {missing}")


def map_scores(predictions: pd.DataFrame) -> pd.DataFrame:
    """Model probabilities (FINDINGS columns) -> one score per evaluated expert finding.

    The maximum over the mapped findings (see the module docstring); NaN propagates, so a
    missing score is never hidden behind its neighbour's. Same index as `predictions`.
    """
    _require_findings(predictions, "predictions")
    out = pd.DataFrame(index=predictions.index)
    for name in EVALUATED_FINDINGS:
        scores = predictions[list(NIH_SOURCES[name])].astype(float)
        out[EXPERT_COLUMNS[name]] = scores.max(axis=1, skipna=False)
    return out


def map_nih_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """NIH 0/1 labels (FINDINGS columns) -> one int8 label per evaluated expert finding (OR)."""
    _require_findings(labels, "labels")
    out = pd.DataFrame(index=labels.index)
    for name in EVALUATED_FINDINGS:
        values = labels[list(NIH_SOURCES[name])]
        bad = ~values.isin([0, 1]).all(axis=1)
        if bad.any():
            first = values.index[np.flatnonzero(bad.to_numpy())[0]]
            raise ValueError(
                f"labels: finding columns {list(NIH_SOURCES[name])} must be 0/1; row {first!r} "
                f"has {values.loc[first].tolist()}"
            )
        out[EXPERT_COLUMNS[name]] = values.astype(np.int8).max(axis=1).astype(np.int8)
    return out


def comparison_images(
    predictions: pd.DataFrame, nih_labels: pd.DataFrame, expert: pd.DataFrame
) -> pd.DataFrame:
    """The test images every source covers, with both references and the mapped scores.

    Test = the expert file's `test` set, restricted to the predictions' `test` rows (when the
    predictions carry a `split` column) and to images with an NIH label row. Patients come from
    the expert file (its Patient ID column is NIH's). Sorted by image id, so the bootstrap's
    patient order -- and the intervals for a seed -- do not depend on input row order.
    """
    for what, frame in (("predictions", predictions), ("labels", nih_labels), ("expert", expert)):
        if "image_id" not in frame.columns:
            raise ValueError(f"{what}: missing column 'image_id'")
    preds = predictions
    if "split" in preds.columns:
        preds = preds[preds["split"].astype(str) == "test"]
    preds = preds.set_index(preds["image_id"].astype(str))
    truth = nih_labels.set_index(nih_labels["image_id"].astype(str))
    for what, frame in (("predictions", preds), ("labels", truth)):
        dup = frame.index[frame.index.duplicated()]
        if len(dup):
            raise ValueError(f"{what}: image(s) listed twice, e.g. {dup[:3].tolist()}")
    test = expert[expert["set"].astype(str) == "test"]
    test = test.set_index(test["image_id"].astype(str))
    ids = sorted(set(test.index) & set(preds.index) & set(truth.index))
    scores = map_scores(preds.loc[ids])
    nih = map_nih_labels(truth.loc[ids])
    out = pd.DataFrame({"image_id": ids, "patient_id": test.loc[ids, "patient_id"].to_numpy()})
    for name in EVALUATED_FINDINGS:
        col = EXPERT_COLUMNS[name]
        out[f"score_{col}"] = scores[col].to_numpy()
        out[f"nih_{col}"] = nih[col].to_numpy()
        out[f"expert_{col}"] = test.loc[ids, col].to_numpy().astype(np.int8)
    return out


def expert_comparison(
    predictions: pd.DataFrame,
    nih_labels: pd.DataFrame,
    expert: pd.DataFrame,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """AUROC of the mapped scores against NIH's labels and against the experts, same images.

    One row per evaluated expert finding. Both AUROCs use the same images (`comparison_images`)
    and, in every bootstrap resample, the same drawn patients (paired: the two intervals differ
    by the reference, not by the draw). Point estimates equal scikit-learn's `roc_auc_score`;
    a reference with one class only gives NaN. Intervals: patient bootstrap percentile
    intervals of `bootstrap.weighted_auroc`, as the classification metrics.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence!r}")
    data = comparison_images(predictions, nih_labels, expert)
    if data.empty:
        raise ValueError(
            "expert comparison: no test image is in the predictions, the NIH labels and the "
            "expert file's test set at once (predictions of another dataset?)"
        )
    for name in EVALUATED_FINDINGS:
        if data[f"score_{EXPERT_COLUMNS[name]}"].isna().any():
            raise ValueError(f"predictions: NaN score for {name!r} on a comparison image")
    ones = np.ones((1, len(data)))
    samples: dict[str, list[np.ndarray]] = {}
    for block in patient_weights(data["patient_id"].to_numpy(), n_resamples, seed):
        for name in EVALUATED_FINDINGS:
            col = EXPERT_COLUMNS[name]
            s = data[f"score_{col}"].to_numpy(float)
            for ref in ("nih", "expert"):
                y = data[f"{ref}_{col}"].to_numpy()
                samples.setdefault(f"{ref}_{col}", []).append(weighted_auroc(y, s, block))
    rows = []
    for name in EVALUATED_FINDINGS:
        col = EXPERT_COLUMNS[name]
        s = data[f"score_{col}"].to_numpy(float)
        row: dict[str, object] = {
            "expert_finding": name,
            "n_images": int(len(data)),
            "n_patients": int(data["patient_id"].nunique()),
            "positives_nih": int(data[f"nih_{col}"].sum()),
            "positives_expert": int(data[f"expert_{col}"].sum()),
        }
        for ref in ("nih", "expert"):
            y = data[f"{ref}_{col}"].to_numpy()
            low, high = percentile_interval(np.concatenate(samples[f"{ref}_{col}"]), confidence)
            row[f"auroc_{ref}"] = float(weighted_auroc(y, s, ones)[0])
            row[f"auroc_{ref}_ci_low"] = float(low)
            row[f"auroc_{ref}_ci_high"] = float(high)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
