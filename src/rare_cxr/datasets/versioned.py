"""The common part of the project's own versioned datasets on the local disk.

Kedro's `AbstractVersionedDataset` needs a filepath, a version and a function that says whether
a version exists; each of our file datasets (checkpoint, model bundle, ONNX bytes) and folder
datasets (Grad-CAM overlays) differs only in *what* a version is -- a file or a folder -- and in
how it is read and written. This base holds the rest once.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from kedro.io import AbstractVersionedDataset, DatasetError, Version


class LocalVersionedDataset(AbstractVersionedDataset):
    """A versioned dataset whose every version is one local file (or, with `IS_FOLDER`, one
    folder); subclasses implement `load` and `save`."""

    IS_FOLDER: ClassVar[bool] = False

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            filepath=PurePosixPath(filepath), version=version, exists_function=self._is_version
        )
        self.metadata = metadata

    @classmethod
    def _is_version(cls, path: str) -> bool:
        return Path(path).is_dir() if cls.IS_FOLDER else Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        return self._is_version(str(path))
