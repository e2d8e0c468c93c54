"""Nodes of the `data_processing` pipeline: labels, image index, patient split.

Each node checks its parameters first (errors name the dotted key), then its input (errors name
file, row and problem), and records every non-fatal oddity in a report instead of dropping it
silently. Label and split logic never touch pixels, so both run without a single image.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from rare_cxr.findings import FINDINGS
from rare_cxr.imaging import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image
from rare_cxr.progress import progress
from rare_cxr.stratification import iterative_stratification

from .parsing import InputDataError, parse_data_entry
from .splitting import (
    SPLIT_NAMES,
    assert_patient_disjoint,
    official_assignment,
    patient_table,
    split_report_table,
)
from .validation import (
    ImageParams,
    LabelParams,
    SplitParams,
    check_image_params,
    check_label_params,
    check_split_params,
)

logger = logging.getLogger(__name__)

IMAGE_INDEX_COLUMNS = ("image_id", "path", "status", "width", "height", "mode")
SPLIT_COLUMNS = ("image_id", "patient_id", "split")
# Statuses of files that exist but cannot be used; all follow `images.on_corrupt`.
UNREADABLE_STATUSES = ("corrupt", "too-large", "not-a-file")


def parse_labels(raw_data_entry: str, params: LabelParams) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Data_Entry CSV text -> (`labels` table, label-quality record for the report).

    Reads the original `Data_Entry_2017.csv` and the 2020 revision (plain or gzipped: the
    catalog decompresses). `follow_up` comes from the CSV's `Follow-up #`, never from the file
    name, because the 2020 revision renumbered follow-ups.
    """
    checked = check_label_params(params)
    labels, quality = parse_data_entry(
        raw_data_entry, checked["source"], checked["max_age"], checked["report_examples"]
    )
    flagged = {k: v["count"] for k, v in quality["oddities"].items() if v["count"]}
    logger.info(
        "Parsed %d images of %d patients from %s; recorded oddities: %s",
        quality["rows"],
        quality["patients"],
        checked["source"],
        flagged or "none",
    )
    return labels, quality


def _inspect(
    path: str | None, check: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str, int | None, int | None, str | None, str]:
    """(status, width, height, mode, error) of one image file, as cheaply as `check` allows.

    `header` reads only the PNG header; `verify` also walks every chunk and checks its CRC
    (catches truncated and damaged files without decompressing pixels); `decode` decompresses.
    Files are read through `rare_cxr.imaging.read_image`, the same door as the image cache, so
    the status here (ok/missing/corrupt/too-large/not-a-file) is what the cache would find.
    A `TransientImageError` (I/O error after retries) is not a status: it propagates.
    """
    if path is None:
        return "missing", None, None, None, ""
    seen: dict[str, Any] = {}

    def look(image: Image.Image) -> None:
        seen.update(width=image.size[0], height=image.size[1], mode=image.mode)
        if check == "verify":
            image.verify()
        elif check == "decode":
            image.load()

    try:
        read_image(path, look, max_pixels=max_pixels)
    except ImageReadError as exc:
        width, height = exc.size or (seen.get("width"), seen.get("height"))
        return exc.status, width, height, seen.get("mode"), exc.reason
    return "ok", seen["width"], seen["height"], seen["mode"], ""


def _policy_error(kind: str, ids: list[str], total: int, key: str) -> InputDataError:
    shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
    return InputDataError(
        f"image folder: {len(ids)} of {total} labelled images are {kind} ({shown}); "
        f"{key} is 'error'. Set it to 'drop' to continue without them (they are then listed "
        "in data/08_reporting/data_quality_report.json)"
    )


def index_images(
    labels: pd.DataFrame,
    label_quality: dict[str, Any],
    raw_images: dict[str, str],
    params: ImageParams,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Check every labelled image: present, decodable, size and mode.

    Returns `image_index` (one row per labelled image, status ok / missing / corrupt /
    too-large / not-a-file; later stages use only `ok` rows) and the data-quality report (label
    oddities, each non-ok status with examples, modes and sizes, images on disk without
    labels). A partial download is normal: with `on_missing: drop` the missing images are
    recorded, not fatal. `on_corrupt` governs every unreadable status (corrupt, too-large,
    not-a-file). A system error while reading (EIO, EACCES, ... after retries) stops the node
    with `TransientImageError` instead of marking a healthy image corrupt.
    """
    checked = check_image_params(params)
    image_ids = labels["image_id"].astype(str).tolist()
    paths = [raw_images.get(image_id) for image_id in image_ids]
    results = _inspect_all(paths, checked)
    status, width, height, mode, error = zip(*results, strict=True) if results else ([],) * 5
    index = pd.DataFrame(
        {
            "image_id": pd.Series(image_ids, dtype="str"),
            "path": pd.Series(paths, dtype="str"),
            "status": pd.Series(status, dtype="str"),
            "width": pd.array(width, dtype="Int64"),
            "height": pd.array(height, dtype="Int64"),
            "mode": pd.Series(mode, dtype="str"),
        }
    )
    missing = index.loc[index["status"] == "missing", "image_id"].tolist()
    # every status other than ok/missing is a file that is there but unusable
    unreadable_rows = {
        status: index.loc[index["status"] == status] for status in UNREADABLE_STATUSES
    }
    unreadable = index.loc[index["status"].isin(UNREADABLE_STATUSES), "image_id"].tolist()
    _apply_policies(checked, len(index), missing, unreadable, unreadable_rows)
    labelled = set(image_ids)
    unlabelled = sorted(image_id for image_id in raw_images if image_id not in labelled)
    ok = index.loc[index["status"] == "ok"]
    errors = dict(zip(index["image_id"], error, strict=True))
    report = {
        "labels": label_quality,
        "images": _image_report(checked, index, ok, missing, unreadable_rows, unlabelled, errors),
    }
    log = logger.warning if (missing or unreadable) else logger.info
    log(
        "Indexed %d labelled images: %d ok, %d missing (%s), %d corrupt, %d too-large, "
        "%d not-a-file (%s); %d images on disk without labels",
        len(index),
        len(ok),
        len(missing),
        checked["on_missing"],
        len(unreadable_rows["corrupt"]),
        len(unreadable_rows["too-large"]),
        len(unreadable_rows["not-a-file"]),
        checked["on_corrupt"],
        len(unlabelled),
    )
    return index[list(IMAGE_INDEX_COLUMNS)], report


def _inspect_all(paths: list[str | None], checked: dict[str, Any]) -> list[tuple]:
    """(status, width, height, mode, error) of every path, read by a thread pool."""
    with ThreadPoolExecutor(max_workers=checked["workers"]) as pool:
        return list(
            progress(
                # on a TransientImageError, map's iterator cancels the images not yet started
                pool.map(
                    lambda p: _inspect(p, checked["check"], checked["max_image_pixels"]), paths
                ),
                total=len(paths),
                desc="index_images",
                unit="img",
                enabled=checked["progress"],
            )
        )


def _apply_policies(
    checked: dict[str, Any],
    total: int,
    missing: list[str],
    unreadable: list[str],
    unreadable_rows: dict[str, pd.DataFrame],
) -> None:
    """Stop when missing or unreadable images meet an `error` policy (the message says how to
    go on without them)."""
    if missing and checked["on_missing"] == "error":
        raise _policy_error("missing", missing, total, "data_processing.images.on_missing")
    if unreadable and checked["on_corrupt"] == "error":
        counts = {s: len(r) for s, r in unreadable_rows.items() if len(r)}
        kind = (
            "corrupt (cannot be decoded)"
            if list(counts) == ["corrupt"]
            else "unreadable (" + ", ".join(f"{s}: {n}" for s, n in counts.items()) + ")"
        )
        raise _policy_error(kind, unreadable, total, "data_processing.images.on_corrupt")


def _image_report(  # noqa: PLR0917 -- the index and what index_images found in it
    checked: dict[str, Any],
    index: pd.DataFrame,
    ok: pd.DataFrame,
    missing: list[str],
    unreadable_rows: dict[str, pd.DataFrame],
    unlabelled: list[str],
    errors: dict[str, Any],
) -> dict[str, Any]:
    """The `images` block of the data-quality report: policy, counts, examples, modes, sizes."""
    limit = checked["report_examples"]
    return {
        "policy": {
            k: checked[k] for k in ("on_missing", "on_corrupt", "check", "max_image_pixels")
        },
        "labelled": len(index),
        "ok": len(ok),
        "missing": {
            "count": len(missing),
            "action": checked["on_missing"],
            "examples": missing[:limit],
        },
        **{
            status: {
                "count": len(rows),
                "action": checked["on_corrupt"],
                "examples": [
                    {"image_id": row.image_id, "path": row.path, "error": errors[row.image_id]}
                    for row in rows.head(limit).itertuples(index=False)
                ],
            }
            for status, rows in unreadable_rows.items()
        },
        "unlabelled_on_disk": {"count": len(unlabelled), "examples": unlabelled[:limit]},
        "modes": dict(sorted(Counter(ok["mode"].tolist()).items())),
        "sizes": dict(
            sorted(
                Counter(f"{w}x{h}" for w, h in zip(ok["width"], ok["height"], strict=True)).items()
            )
        ),
    }


def split_patients(
    labels: pd.DataFrame,
    raw_train_val_list: str,
    raw_test_list: str,
    params: SplitParams,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Patient-disjoint train/val/test split from labels alone (no pixels needed).

    `official`: test = `test_list.txt` exactly; val is carved out of `train_val_list.txt` by
    patient, stratified on the findings. `stratified`: all patients split by iterative
    multi-label stratification with the configured fractions. Deterministic for a seed.
    Returns (`splits`, `split_report` table, `split_summary` JSON).
    """
    checked = check_split_params(params)
    patients = patient_table(labels)
    patient_split, fractions, official_test = _assign_patients(
        checked, patients, labels, raw_train_val_list, raw_test_list
    )
    by_patient = pd.Series(patient_split, index=patients.index)
    splits = pd.DataFrame(
        {
            "image_id": labels["image_id"].astype("str").to_numpy(),
            "patient_id": labels["patient_id"].to_numpy(),
            "split": pd.Series(
                labels["patient_id"].map(by_patient).to_numpy(), dtype="str"
            ).to_numpy(),
        }
    )
    assert_patient_disjoint(splits)
    if (
        official_test is not None
        and set(splits.loc[splits["split"] == "test", "image_id"]) != official_test
    ):
        raise RuntimeError("internal error: the test split differs from test_list.txt")

    report = split_report_table(labels, splits)
    unrepresented = _unrepresented(report)
    summary = {
        "mode": checked["mode"],
        "seed": checked["seed"],
        "requested": fractions,
        "patient_overlap": 0,
        "splits": _split_counts(report, len(splits)),
        "unrepresented": unrepresented,
    }
    logger.info(
        "Split %d patients (%s mode): %s",
        len(patients),
        checked["mode"],
        ", ".join(
            f"{n} {summary['splits'][n]['patients']} patients / {summary['splits'][n]['images']} "
            "images"
            for n in SPLIT_NAMES
        ),
    )
    return splits[list(SPLIT_COLUMNS)], report, summary


def _assign_patients(
    checked: dict[str, Any],
    patients: pd.DataFrame,
    labels: pd.DataFrame,
    raw_train_val_list: str,
    raw_test_list: str,
) -> tuple[np.ndarray, dict[str, float], set[str] | None]:
    """(split of each patient, the fractions requested, the official test image ids or None)."""
    counts = patients[list(FINDINGS)].to_numpy()
    sizes = patients["images"].to_numpy()
    if checked["mode"] != "official":
        val_fraction, test_fraction = checked["val_fraction"], checked["test_fraction"]
        wanted = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
        assignment = iterative_stratification(counts, sizes, wanted, checked["seed"])
        patient_split = np.array(SPLIT_NAMES, dtype=object)[assignment]
        return patient_split, dict(zip(SPLIT_NAMES, wanted, strict=True)), None
    part = official_assignment(labels, raw_train_val_list, raw_test_list)
    official_test = set(labels.loc[part.to_numpy() == "test", "image_id"].astype(str))
    test_patients = set(labels.loc[part.to_numpy() == "test", "patient_id"])
    is_test = patients.index.isin(list(test_patients))
    val_fraction = checked["val_fraction"]
    inner = iterative_stratification(
        counts[~is_test], sizes[~is_test], (1 - val_fraction, val_fraction), checked["seed"]
    )
    patient_split = np.empty(len(patients), dtype=object)
    patient_split[is_test] = "test"
    patient_split[~is_test] = np.array(["train", "val"], dtype=object)[inner]
    return patient_split, {"val_fraction_of_train_val": val_fraction}, official_test


def _unrepresented(report: pd.DataFrame) -> list[dict[str, Any]]:
    """Findings with no positive image in a split that has images (each logged as a warning)."""
    unrepresented = [
        {"split": row.split, "finding": row.finding, "patients_with_finding": int(total)}
        for row, total in zip(
            report.loc[report["split"] != "all"].itertuples(index=False),
            report.loc[report["split"] != "all", "finding"].map(
                report.loc[report["split"] == "all"].set_index("finding")["positive_patients"]
            ),
            strict=True,
        )
        if row.positives == 0 and row.images > 0
    ]
    for item in unrepresented:
        logger.warning(
            "No %s positive in the %s split (only %d patient(s) have it)",
            item["finding"],
            item["split"],
            item["patients_with_finding"],
        )
    return unrepresented


def _split_counts(report: pd.DataFrame, n_images: int) -> dict[str, Any]:
    """Patients, images, image fraction and positives per finding of each split (and all)."""
    per_split = report.drop_duplicates("split").set_index("split")
    total_images = max(n_images, 1)
    return {
        name: {
            "patients": int(per_split.at[name, "patients"]),
            "images": int(per_split.at[name, "images"]),
            "image_fraction": round(int(per_split.at[name, "images"]) / total_images, 6),
            "positives": {
                row.finding: int(row.positives)
                for row in report.loc[report["split"] == name].itertuples(index=False)
            },
        }
        for name in (*SPLIT_NAMES, "all")
    }
