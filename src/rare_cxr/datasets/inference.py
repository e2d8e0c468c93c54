"""Kedro datasets of the inference side: the model bundle, the predictions CSV, a folder of
PNG overlays, raw bytes.

Why not kedro-datasets' own: `PyTorchDataset` stores weights without metadata;
`PartitionedDataset` cannot be versioned (`versioned: true` is refused), and a run's overlays
must be one versioned folder, written whole or not at all; there is no versioned bytes dataset
with atomic writes (the ONNX file); `pandas.CSVDataset` reads a file named `NA` as a missing
value and `0001` as 1, and writes `=HYPERLINK(...)` for a spreadsheet to run.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from kedro.io import DatasetError

from rare_cxr.atomic import AtomicWriter, staging_folder
from rare_cxr.datasets.atomic import CSVDataset
from rare_cxr.datasets.checkpoint import TorchCheckpointDataset
from rare_cxr.datasets.versioned import LocalVersionedDataset


class ModelBundleDataset(TorchCheckpointDataset):
    """A model bundle (`rare_cxr.inference.bundle`) as a `.pt` file, versioned or a plain path.

    Loading checks the bundle key by key and its weights against the architecture its spec
    builds (`rare_cxr.inference.bundle.validate_bundle`: every error names the file and the
    key) and adds `metadata["bundle_version"]`: the catalog version (the run id that wrote it), or
    `"unversioned"` for a plain file such as one handed over by a colleague.
    Loaded with `torch.load(weights_only=True)`: tensors and plain containers only.
    """

    def load(self) -> dict[str, Any]:
        from rare_cxr.inference.bundle import BundleError, validate_bundle

        try:
            path = Path(self._get_load_path())
        except DatasetError as exc:  # a versioned entry without any version yet
            raise DatasetError(
                f"no model bundle at {self._filepath} ({exc}): bundles are written by "
                "`kedro run --pipelines reporting` (one per trained model), or name a bundle "
                "file with `--params bundle=/path/to/model_bundle.pt`"
            ) from exc
        if not path.is_file():
            raise DatasetError(
                f"model bundle {path} does not exist: bundles are written by "
                "`kedro run --pipelines reporting` (one per model), or name a bundle file "
                "with `--params bundle=/path/to/model_bundle.pt`"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling refusal or a damaged zip
            raise DatasetError(f"{path} could not be read as a model bundle: {exc}") from exc
        try:
            bundle = validate_bundle(obj, str(path))
        except BundleError as exc:
            raise DatasetError(str(exc)) from exc
        bundle["metadata"]["bundle_version"] = (
            self.resolve_load_version() if self._version else None
        ) or "unversioned"
        return bundle

    def save(self, data: dict[str, Any]) -> None:
        from rare_cxr.inference.bundle import validate_bundle

        bundle = validate_bundle(data, "the bundle to save")
        metadata = {k: v for k, v in bundle["metadata"].items() if k != "bundle_version"}
        buffer = io.BytesIO()
        torch.save({"state_dict": dict(bundle["state_dict"]), "metadata": metadata}, buffer)
        with AtomicWriter(Path(self._get_save_path()), "wb") as handle:
            handle.write(buffer.getbuffer())


class PredictionsCSVDataset(CSVDataset):
    """predictions.csv of the inference pipeline (`rare_cxr.inference.table`): the atomic
    `CSVDataset` whose text columns are written neutralised against CSV injection and read
    back as the same text (`NA`, `0001`, `=cmd` included), numbers as numbers.

    `load_args`/`save_args` given in the catalog are applied on top of these defaults.
    """

    def __init__(
        self,
        *,
        filepath: str,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from rare_cxr.inference.table import csv_load_args

        super().__init__(
            filepath=filepath,
            load_args={**csv_load_args(), **(load_args or {})},
            save_args={"index": False, **(save_args or {})},
            **kwargs,
        )

    def load(self) -> Any:
        from rare_cxr.inference.table import from_csv_frame

        # kedro-datasets' own load, without Kedro's wrappers (this method gets its own)
        table = inspect.unwrap(CSVDataset.load)(self)
        try:
            return from_csv_frame(table)
        except ValueError as exc:
            raise DatasetError(f"{self._get_load_path()}: {exc}") from exc

    def save(self, data: Any) -> None:
        from rare_cxr.inference.table import to_csv_frame

        inspect.unwrap(CSVDataset.save)(self, to_csv_frame(data))


class PngFolderDataset(LocalVersionedDataset):
    """`{relative/name.png: PNG bytes}` <-> a folder of files; supports `versioned: true`.

    Save writes every file into a staging folder beside the destination and renames it into
    place (`rare_cxr.atomic.staging_folder`): a reader sees all of a run's overlays or none.
    Names must be relative and stay inside the folder. Load returns `{name: callable}` that
    read the bytes on demand (a run can hold thousands of overlays).
    """

    IS_FOLDER = True

    def load(self) -> dict[str, Callable[[], bytes]]:
        root = Path(self._get_load_path())
        return {
            p.relative_to(root).as_posix(): p.read_bytes
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    def save(self, data: Mapping[str, bytes | Callable[[], bytes]]) -> None:
        """Values are PNG bytes, or callables returning them (rendered one at a time here, so
        a large folder of overlays is never in memory at once)."""
        final = Path(self._get_save_path())
        with staging_folder(final) as staging:
            for name, payload in data.items():
                rel = PurePosixPath(name)
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise DatasetError(f"overlay name {name!r} must be a relative path inside")
                target = staging.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(payload() if callable(payload) else payload)


class BytesDataset(LocalVersionedDataset):
    """Raw bytes <-> one file (e.g. an ONNX model), written atomically; `versioned: true`."""

    def load(self) -> bytes:
        return Path(self._get_load_path()).read_bytes()

    def save(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DatasetError(f"expected bytes, got {type(data).__name__}")
        with AtomicWriter(Path(self._get_save_path()), "wb") as handle:
            handle.write(data)
