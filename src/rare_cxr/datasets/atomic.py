"""kedro-datasets' file datasets with atomic saves: the catalog types of every project output.

Why: kedro-datasets writes straight into the final file (`fs.open(path, "wb")`). A kill, a full
disk or a crash part-way leaves a truncated parquet/CSV/JSON/PNG/HTML file at the path that
Kedro then loads as the latest version. These classes are the kedro-datasets ones with a single
change: on the local filesystem their `_fs.open(..., "w"/"x")` returns a
`rare_cxr.atomic.AtomicWriter` (temporary file in the same folder, flush + fsync, rename), so a
save either completes or leaves nothing. Loading, versioning, `save_args`, previews for
kedro-viz — everything else is inherited unchanged. Remote filesystems (s3, gcs...) are left
alone: an object-store PUT is already all-or-nothing.

In the catalog: `rare_cxr.datasets.ParquetDataset` instead of `pandas.ParquetDataset`, and so on.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from kedro.io.core import PROTOCOL_DELIMITER
from kedro_datasets._typing import HTMLPreview
from kedro_datasets.json import JSONDataset as _JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset as _MatplotlibDataset
from kedro_datasets.pandas import CSVDataset as _CSVDataset
from kedro_datasets.pandas import ParquetDataset as _ParquetDataset
from kedro_datasets.text import TextDataset as _TextDataset

from rare_cxr.atomic import AtomicWriter
from rare_cxr.datasets.previews import text_as_html


class AtomicLocalFileSystem:
    """Wraps an fsspec `LocalFileSystem`: opening for writing gives an `AtomicWriter`."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" not in mode and "x" not in mode:
            return self._fs.open(path, mode, **kwargs)
        allowed = {"encoding", "errors", "newline"}
        unsupported = sorted(k for k, v in kwargs.items() if k not in allowed and v is not None)
        if unsupported:
            raise ValueError(
                f"atomic save of {path}: open arguments {unsupported} are not supported "
                "(only encoding, errors, newline)"
            )
        return AtomicWriter(
            self._fs._strip_protocol(path),
            mode,
            encoding=kwargs.get("encoding"),
            errors=kwargs.get("errors"),
            newline=kwargs.get("newline"),
        )

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally. `copy.deepcopy` (kedro-datasets' CSV
        # preview copies the dataset) builds the copy without running __init__, so `_fs` may
        # not exist yet: looking it up here would recurse forever.
        if name == "_fs" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self._fs, name)


class AtomicSaveMixin:
    """Swap the dataset's local filesystem for the atomic wrapper after kedro-datasets built it."""

    _fs: Any
    _protocol: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._protocol == "file" and not isinstance(self._fs, AtomicLocalFileSystem):
            self._fs = AtomicLocalFileSystem(self._fs)


class ParquetDataset(AtomicSaveMixin, _ParquetDataset):
    """`pandas.ParquetDataset` with atomic saves."""


# Columns that hold identifiers, names or versions: read back as the text that was written.
# pandas would otherwise turn the training id `7467411011e3` into 7467411011000.0, the file name
# `0001` into 1 and `NA` into a missing value (see docs/architecture.md, "Identifiers").
IDENTIFIER_COLUMNS = (
    "image_id",
    "training_id",
    "checkpoint_version",
    "image_cache_fingerprint",
    "run_id",
    "version",
    "model",
    "reference",
    "file",
    "name",
    "path",
    "relative_path",
    "status",
    "reason",
    "finding",
    "split",
)


# pandas' own list of strings read as missing, applied to every non-identifier column.
try:
    from pandas._libs.parsers import STR_NA_VALUES as _PANDAS_NA
except ImportError:  # private in pandas: the documented list, should it ever move
    _PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND"}
    _PANDAS_NA |= {"1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _default_na_strings() -> list[str]:
    return sorted(_PANDAS_NA)


class CSVDataset(AtomicSaveMixin, _CSVDataset):
    """`pandas.CSVDataset` with atomic saves, and identifier columns loaded as text.

    `text_columns` (default `IDENTIFIER_COLUMNS`) are read as strings with no missing-value
    parsing, whatever they look like (`7467411011e3`, `000000000123`, `NA`, `1e5`); every other
    column is parsed as pandas always does.
    """

    def __init__(self, *args: Any, text_columns: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._text_columns = tuple(IDENTIFIER_COLUMNS if text_columns is None else text_columns)

    def load(self) -> pd.DataFrame:
        load_path = str(self._get_load_path())
        extra: dict[str, Any] = {}
        if self._protocol != "file":  # as kedro-datasets: local paths without a protocol
            load_path = f"{self._protocol}{PROTOCOL_DELIMITER}{load_path}"
            extra["storage_options"] = self._storage_options
        user = {k: v for k, v in self._load_args.items() if k != "nrows"}
        header = list(pd.read_csv(load_path, nrows=0, **extra, **user).columns)
        text = [c for c in header if c in self._text_columns]
        if text:
            user_dtype = self._load_args.get("dtype")
            extra["dtype"] = {
                **dict.fromkeys(text, str),
                **(user_dtype if isinstance(user_dtype, dict) else {}),
            }
            extra["keep_default_na"] = False
            extra["na_values"] = {c: _default_na_strings() for c in header if c not in text}
        args = {k: v for k, v in self._load_args.items() if k not in extra}
        return pd.read_csv(load_path, **extra, **args)


class JSONDataset(AtomicSaveMixin, _JSONDataset):
    """`json.JSONDataset` with atomic saves."""


class TextDataset(AtomicSaveMixin, _TextDataset):
    """`text.TextDataset` with atomic saves, and a kedro-viz preview (the report renders)."""

    def preview(self) -> HTMLPreview:
        return HTMLPreview(text_as_html(self.load(), str(self._filepath).endswith(".html")))


class MatplotlibDataset(AtomicSaveMixin, _MatplotlibDataset):
    """`matplotlib.MatplotlibDataset` with atomic saves."""
