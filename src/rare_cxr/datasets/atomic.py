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


class CSVDataset(AtomicSaveMixin, _CSVDataset):
    """`pandas.CSVDataset` with atomic saves."""


class JSONDataset(AtomicSaveMixin, _JSONDataset):
    """`json.JSONDataset` with atomic saves."""


class TextDataset(AtomicSaveMixin, _TextDataset):
    """`text.TextDataset` with atomic saves, and a kedro-viz preview (the report renders)."""

    def preview(self) -> HTMLPreview:
        return HTMLPreview(text_as_html(self.load(), str(self._filepath).endswith(".html")))


class MatplotlibDataset(AtomicSaveMixin, _MatplotlibDataset):
    """`matplotlib.MatplotlibDataset` with atomic saves."""
