"""Read NIH `Data_Entry_2017*.csv` text into the `labels` table, vectorised.

Why vectorised pandas and not a loop per row: the full table has 112,120 rows and is parsed on
every run; whole-column string operations (`str.fullmatch`, `str.get_dummies`) take a couple of
seconds where a Python loop with per-row checks takes much longer. Every check still reports the
*first* offending CSV line, so errors stay as precise as a row-by-row parser's.

Row numbers in messages are 1-based lines of the CSV file: the header is row 1, the first data
row is row 2 (NIH files have no quoted multi-line fields, so a record is a line).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pandas as pd

from rare_cxr.findings import FINDING_ALIASES, FINDINGS, NO_FINDING

# NIH column name -> labels column. The two bracketed NIH names (`OriginalImage[Width,Height]`,
# `OriginalImagePixelSpacing[x,y]`) contain commas, so a CSV reader splits each into two
# fields; they are not needed for labels, so their split halves are simply ignored.
REQUIRED_COLUMNS: dict[str, str] = {
    "Image Index": "image_id",
    "Finding Labels": "findings",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}
LABEL_COLUMNS: tuple[str, ...] = (
    "image_id",
    "patient_id",
    "follow_up",
    "age",
    "sex",
    "view",
    *FINDINGS,
)

_UNSAFE_NAME = re.compile(r"[/\\]|\.\.|^\.")
_PANDAS_LINE = re.compile(r"line (\d+)")
_FILE_NAME = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


class InputDataError(ValueError):
    """Bad input data; the message names the file, the row and the problem."""


def _fail(source: str, row: int | str, problem: str) -> InputDataError:
    return InputDataError(f"{source}, row {row}: {problem}")


def _first(mask: np.ndarray | pd.Series) -> int | None:
    """Position of the first True in a boolean mask, or None."""
    values = np.asarray(mask, dtype=bool)
    return int(values.argmax()) if values.any() else None


def _read_csv(text: str, source: str) -> pd.DataFrame:
    """Parse the CSV text as strings, keeping blank lines so positions map to file lines."""
    if not isinstance(text, str):
        raise InputDataError(f"{source}: expected CSV text, got {type(text).__name__}")
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise _fail(source, 1, "the file is empty; expected the NIH Data_Entry CSV")
    nul = text.find("\x00")
    if nul >= 0:
        raise _fail(
            source,
            text.count("\n", 0, nul) + 1,
            "this is not CSV text (binary data: a NUL byte); a compressed file needs a "
            "name ending in .gz",
        )
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            skipinitialspace=True,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        message = str(exc).strip()
        match = _PANDAS_LINE.search(message)
        row = match.group(1) if match else "?"
        raise _fail(source, row, f"this is not a valid CSV ({message})") from None
    frame.columns = [str(name).strip() for name in frame.columns]
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        found = [name for name in frame.columns if not name.startswith("Unnamed:")][:12]
        raise _fail(
            source,
            "1 (header)",
            f"missing required column(s) {missing}; found {found}. Is this the NIH "
            "Data_Entry_2017 CSV?",
        )
    frame = frame[list(REQUIRED_COLUMNS)].fillna("")
    for column in REQUIRED_COLUMNS:
        frame[column] = frame[column].astype(str).str.strip()
    frame["row"] = np.arange(len(frame), dtype=np.int64) + 2
    blank = (frame[list(REQUIRED_COLUMNS)] == "").all(axis=1)
    return frame.loc[~blank].reset_index(drop=True)


def _oddity(
    rows: pd.DataFrame, mask: pd.Series, description: str, value: str | None, limit: int
) -> dict[str, Any]:
    hits = rows.loc[mask.to_numpy()]
    examples = []
    for record in hits.head(limit).itertuples(index=False):
        example = {"row": int(record.row), "image_id": str(record.image_id)}
        if value is not None:
            example["value"] = str(getattr(record, value))
        examples.append(example)
    return {"count": int(mask.sum()), "description": description, "examples": examples}


def _parse_int_column(frame: pd.DataFrame, column: str, source: str, what: str) -> np.ndarray:
    values = frame[column]
    bad = _first(~values.str.fullmatch(r"\d+").to_numpy(dtype=bool, na_value=False))
    if bad is not None:
        raise _fail(
            source,
            int(frame["row"].iat[bad]),
            f"malformed {what} {values.iat[bad]!r} in column {column!r} "
            f"(image {frame['Image Index'].iat[bad]!r}); expected a non-negative integer",
        )
    return values.astype("int64").to_numpy()


def _parse_findings(frame: pd.DataFrame, source: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """`A|B` strings -> one int8 0/1 column per finding in FINDINGS order."""
    text = frame["Finding Labels"].str.replace(r"\s*\|\s*", "|", regex=True)
    empty = _first((text == "").to_numpy(dtype=bool))
    if empty is not None:
        raise _fail(
            source,
            int(frame["row"].iat[empty]),
            f"empty 'Finding Labels' for image {frame['Image Index'].iat[empty]!r} "
            f"(an image without findings says {NO_FINDING!r})",
        )
    dummies = text.str.get_dummies(sep="|")
    known = set(FINDINGS) | set(FINDING_ALIASES) | {NO_FINDING}
    for name in dummies.columns:
        if name not in known:
            bad = _first(dummies[name].to_numpy() > 0)
            assert bad is not None
            raise _fail(
                source,
                int(frame["row"].iat[bad]),
                f"unknown finding name {name!r} in 'Finding Labels' "
                f"{frame['Finding Labels'].iat[bad]!r} (image {frame['Image Index'].iat[bad]!r}); "
                f"expected one of {', '.join(FINDINGS)} or {NO_FINDING!r}",
            )
    out = pd.DataFrame(index=frame.index)
    counts = {"aliases": 0, "no_finding_with_findings": 0}
    for finding in FINDINGS:
        column = np.zeros(len(frame), dtype=np.int8)
        for name in (finding, *(a for a, c in FINDING_ALIASES.items() if c == finding)):
            if name in dummies.columns:
                column |= dummies[name].to_numpy().astype(np.int8)
                if name != finding:
                    counts["aliases"] += int(dummies[name].sum())
        out[finding] = column
    return out, counts


def parse_data_entry(
    text: str, source: str, max_age: int, examples: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Parse Data_Entry CSV text; return (labels, label quality record).

    Fatal (InputDataError naming file, row, problem): not CSV text, missing required column,
    empty/unsafe/duplicate image name, malformed patient id, follow-up or age, sex other than
    M/F, view other than PA/AP, unknown finding name.
    Recorded, not fatal: ages above `max_age` (the original 2017 file has ages such as 414;
    they are set to NA), missing ages, `No Finding` next to a finding, alias spellings, and
    a `Follow-up #` that differs from the file-name suffix (the 2020 revision renumbered
    follow-ups; the CSV value is the one used).
    """
    frame = _read_csv(text, source)
    if frame.empty:
        raise _fail(source, 2, "the file has a header but no data rows")
    names = frame["Image Index"]
    _check_image_names(frame, names, source)
    patient_id = _parse_int_column(frame, "Patient ID", source, "patient id")
    follow_up = _parse_int_column(frame, "Follow-up #", source, "follow-up number")
    age = _parse_age(frame, names, source)
    too_old = (age > max_age).fillna(False).astype(bool)
    sex = _parse_choice(frame, names, "Patient Gender", ("M", "F"), source)
    view = _parse_choice(frame, names, "View Position", ("PA", "AP"), source)

    findings, finding_counts = _parse_findings(frame, source)
    has_no_finding = frame["Finding Labels"].str.contains(NO_FINDING, regex=False)
    no_finding_mixed = has_no_finding & (findings.to_numpy().sum(axis=1) > 0)

    labels = pd.DataFrame(
        {
            "image_id": names.astype(str).to_numpy(),
            "patient_id": patient_id,
            "follow_up": follow_up,
            "age": age.where(~too_old, pd.NA).to_numpy(),
            "sex": sex.to_numpy(),
            "view": view.to_numpy(),
        }
    )
    labels["age"] = labels["age"].astype("Int64")
    for finding in FINDINGS:
        labels[finding] = findings[finding].to_numpy(dtype=np.int8)
    flags = {
        "age_above_max": too_old,
        "age_missing": age.isna() & ~too_old,
        "no_finding_with_findings": no_finding_mixed,
        **_file_name_differences(names, patient_id, follow_up),
    }
    quality = {
        "source": source,
        "rows": len(labels),
        "patients": int(labels["patient_id"].nunique()),
        "finding_alias_spellings": finding_counts["aliases"],
        "oddities": _oddities(frame, names, flags, max_age, examples),
    }
    return labels[list(LABEL_COLUMNS)], quality


def _check_image_names(frame: pd.DataFrame, names: pd.Series, source: str) -> None:
    """Every image name is present, a plain file name, and unique."""
    empty = _first((names == "").to_numpy(dtype=bool))
    if empty is not None:
        raise _fail(source, int(frame["row"].iat[empty]), "empty 'Image Index'")
    unsafe = _first(names.str.contains(_UNSAFE_NAME).to_numpy(dtype=bool))
    if unsafe is not None:
        raise _fail(
            source,
            int(frame["row"].iat[unsafe]),
            f"image name {names.iat[unsafe]!r} contains a path separator or '..'; "
            "image names must be plain file names",
        )
    duplicate = _first(names.duplicated(keep="first").to_numpy())
    if duplicate is not None:
        name = names.iat[duplicate]
        first_row = int(frame["row"].iat[_first((names == name).to_numpy(dtype=bool))])
        raise _fail(
            source,
            int(frame["row"].iat[duplicate]),
            f"duplicate image id {name!r} (first seen at row {first_row})",
        )


def _parse_age(frame: pd.DataFrame, names: pd.Series, source: str) -> pd.Series:
    """'Patient Age' in whole years (`58`, `058Y`; empty = NA) as Int64."""
    age_text = frame["Patient Age"]
    age_match = age_text.str.extract(r"^(\d{1,4})\s*[Yy]?$", expand=False)
    bad_age = _first(((age_text != "") & age_match.isna()).to_numpy(dtype=bool))
    if bad_age is not None:
        raise _fail(
            source,
            int(frame["row"].iat[bad_age]),
            f"malformed age {age_text.iat[bad_age]!r} in column 'Patient Age' "
            f"(image {names.iat[bad_age]!r}); expected whole years such as 58 or 058Y",
        )
    return pd.to_numeric(age_match, errors="coerce").astype("Int64")


def _parse_choice(
    frame: pd.DataFrame, names: pd.Series, column: str, allowed: tuple[str, str], source: str
) -> pd.Series:
    """`column` upper-cased, every value one of `allowed`."""
    values = frame[column].str.upper()
    bad = _first((~values.isin(list(allowed))).to_numpy(dtype=bool))
    if bad is not None:
        raise _fail(
            source,
            int(frame["row"].iat[bad]),
            f"malformed {column!r} {frame[column].iat[bad]!r} "
            f"(image {names.iat[bad]!r}); expected {allowed[0]} or {allowed[1]}",
        )
    return values


def _file_name_differences(
    names: pd.Series, patient_id: Any, follow_up: Any
) -> dict[str, pd.Series]:
    """Informational: the file name says PPPPPPPP_FFF.png; the CSV is authoritative."""
    parts = names.str.extract(_FILE_NAME)
    name_follow_up = pd.to_numeric(parts[1], errors="coerce")
    name_patient = pd.to_numeric(parts[0], errors="coerce")
    return {
        "follow_up_differs_from_file_name": (
            name_follow_up.notna() & (name_follow_up != follow_up)
        ).astype(bool),
        "patient_id_differs_from_file_name": (
            name_patient.notna() & (name_patient != patient_id)
        ).astype(bool),
        "nonstandard_image_name": parts[0].isna(),
    }


def _oddities(
    frame: pd.DataFrame,
    names: pd.Series,
    flags: dict[str, pd.Series],
    max_age: int,
    examples: int,
) -> dict[str, Any]:
    """The recorded, not fatal, oddities: each flag's count and first examples."""
    rows = frame[["row"]].assign(
        image_id=names.to_numpy(),
        age=frame["Patient Age"].to_numpy(),
        findings=frame["Finding Labels"].to_numpy(),
        follow_up=frame["Follow-up #"].to_numpy(),
        patient=frame["Patient ID"].to_numpy(),
    )
    what = {
        "age_above_max": (
            f"age above {max_age} years (known NIH data-entry errors); set to NA",
            "age",
        ),
        "age_missing": ("no age given; left NA", None),
        "no_finding_with_findings": (
            f"{NO_FINDING!r} listed together with findings; the findings are kept",
            "findings",
        ),
        "follow_up_differs_from_file_name": (
            "'Follow-up #' differs from the file-name suffix (the 2020 revision renumbered "
            "follow-ups); the CSV value is used",
            "follow_up",
        ),
        "patient_id_differs_from_file_name": (
            "'Patient ID' differs from the file-name prefix; the CSV value is used",
            "patient",
        ),
        "nonstandard_image_name": ("image name is not PPPPPPPP_FFF.png (accepted as is)", None),
    }
    return {
        key: _oddity(rows, flags[key], text, column, examples)
        for key, (text, column) in what.items()
    }
