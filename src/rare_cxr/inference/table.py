"""predictions.csv: its columns, their types, and how a text cell is written so that any
program can read it back as the same text, and no spreadsheet runs it.

Why its own module: the predictions table is written by `run_inference`, saved and loaded by
`rare_cxr.datasets.inference.PredictionsCSVDataset` and read by the inference report; all
three must agree on which columns are text and how a hostile file name is shown.

* **Names as text.** A file name is arbitrary bytes on Linux. `printable` turns one into text
  that every writer accepts: bytes that are not UTF-8 (the surrogate escapes of
  `os.fsdecode`) become `\\xNN`, control and invisible format characters (tab, newline, ESC,
  the bidirectional overrides) `\\xNN` / `\\uNNNN`. A valid, visible name is left as it is.
* **Text stays text.** Text columns are read with `dtype=str, keep_default_na=False`: `NA`,
  `0001`, `1e5` are file names, not a missing value, 1 and 100000.0.
* **CSV injection** (OWASP, "CSV Injection"): a text cell starting with `=`, `+`, `-`, `@`,
  tab or carriage return is a formula to a spreadsheet. On save such a cell gets a leading
  `'` (the OWASP rule); so that the rule can be undone exactly, a cell that already starts with
  `'` gets one too. On load one leading `'` is removed. Numeric columns are never touched
  (a negative number stays a number).
"""

from __future__ import annotations

import contextlib
import os
import unicodedata

import pandas as pd

from rare_cxr.findings import FINDINGS

DECISION_SUFFIX = "_positive"
# issue 20: the temperature-scaled probability (the bundle's validation temperatures) and,
# with `inference.rescale_to_threshold`, the score rescaled so that 0.5 is the threshold
CALIBRATED_SUFFIX = "_calibrated"
RESCALED_SUFFIX = "_rescaled"
ID_COLUMNS = (
    "path",
    "image_id",
    "format",
    "status",
    "reason",
    "flags",
    "view_position",
    "width",
    "height",
)
TRAILING_COLUMNS = ("positive_findings", "overlays", "model", "bundle_version")
TEXT_COLUMNS = (
    *(c for c in ID_COLUMNS if c not in ("width", "height")),
    *TRAILING_COLUMNS,
)
# OWASP's formula triggers, plus the quote itself (so that removing one quote is exact).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def prediction_columns(rescaled: bool = False) -> list[str]:
    """predictions.csv: ids and status, 14 probabilities (FINDINGS names), 14 decisions
    (`<finding>_positive`, 1/0, empty where the finding has no threshold), then
    `positive_findings` (`|`-joined), `overlays` (the Grad-CAM files of the row, `|`-joined),
    `model` and `bundle_version`; then (issue 20, after the earlier columns so that no column
    moves) 14 calibrated probabilities `<finding>_calibrated` (empty for a bundle without
    temperatures) and, when `rescaled` (`inference.rescale_to_threshold`), 14
    `<finding>_rescaled` (0.5 = the threshold; empty where there is none)."""
    return [
        *ID_COLUMNS,
        *FINDINGS,
        *(f + DECISION_SUFFIX for f in FINDINGS),
        *TRAILING_COLUMNS,
        *(f + CALIBRATED_SUFFIX for f in FINDINGS),
        *((f + RESCALED_SUFFIX for f in FINDINGS) if rescaled else ()),
    ]


def column_types() -> dict[str, str]:
    """The dtype of every column that can occur (text: pandas' string dtype)."""
    types = dict.fromkeys(TEXT_COLUMNS, "string")
    types.update(dict.fromkeys(FINDINGS, "float64"))
    types.update({f + CALIBRATED_SUFFIX: "float64" for f in FINDINGS})
    types.update({f + RESCALED_SUFFIX: "float64" for f in FINDINGS})
    types.update({f + DECISION_SUFFIX: "Int8" for f in FINDINGS})
    types.update(width="Int64", height="Int64")
    return types


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` (a path from `os.fsdecode`, a message quoting one) as visible, encodable text
    (see the module doc)."""
    if text.isprintable():  # the common case: nothing to escape
        return text
    # the bytes behind os.fsdecode's surrogate escapes, shown as \xNN; a lone surrogate not
    # from os.fsdecode cannot be encoded, and is escaped below (category Cs)
    with contextlib.suppress(UnicodeEncodeError):
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(_escape(c) if unicodedata.category(c) in _INVISIBLE else c for c in text)


# Unicode categories shown as escapes: control, format (bidi overrides, zero-width),
# surrogate, private use, unassigned.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def neutralise(cell: str) -> str:
    """A text cell as written to the CSV (OWASP: a formula trigger gets a leading quote)."""
    return QUOTE + cell if cell.startswith((*FORMULA_START, QUOTE)) else cell


def restore(cell: str) -> str:
    """The inverse of `neutralise`."""
    return cell[1:] if cell.startswith(QUOTE) else cell


def to_csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of the predictions with every text cell neutralised (missing text -> "")."""
    out = table.copy()
    for column in (c for c in TEXT_COLUMNS if c in out.columns):
        out[column] = out[column].fillna("").astype(str).map(neutralise)
    return out


def from_csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The predictions as loaded from the CSV (every cell read as text, see `csv_load_args`)
    with their types restored; raises ValueError naming a column that is not numeric."""
    out = table.copy()
    types = column_types()
    for column in out.columns:
        text = out[column].astype("string").fillna("")
        if column in TEXT_COLUMNS:
            out[column] = text.map(restore).astype("string")
        elif column in types:
            try:
                numbers = pd.to_numeric(text.where(text != "", None))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"column {column!r}: {exc}") from exc
            out[column] = numbers.astype(types[column])
    return out


def csv_load_args() -> dict:
    """`pandas.read_csv` arguments that keep every cell as its text (typed by `from_csv_frame`)."""
    return {"dtype": str, "keep_default_na": False, "na_values": []}
