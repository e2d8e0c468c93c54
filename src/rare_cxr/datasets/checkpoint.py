"""Model checkpoints as a versioned Kedro dataset: tensors plus plain metadata, never pickled code.

Why not `kedro_datasets_experimental.pytorch.PyTorchDataset`: it stores only the weights, and a
checkpoint here must carry its own model spec, finding order, input normalisation and scales so
that prediction and reporting can rebuild the model without the training parameters.

Saved object: `{"state_dict": {name: tensor}, "metadata": {plain python}}`, written with
`torch.save` to a temporary file and renamed (atomic); loaded with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from kedro.io import AbstractVersionedDataset, DatasetError, Version


class TorchCheckpointDataset(AbstractVersionedDataset[dict[str, Any], dict[str, Any]]):
    """`{"state_dict", "metadata"}` ⇄ a `.pt` file; supports `versioned: true`."""

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            filepath=PurePosixPath(filepath), version=version, exists_function=self._is_file
        )
        self.metadata = metadata

    @staticmethod
    def _is_file(path: str) -> bool:
        return Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}

    def load(self) -> dict[str, Any]:
        path = Path(self._get_load_path())
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "state_dict" not in obj or "metadata" not in obj:
            raise DatasetError(
                f"{path} is not a rare-cxr checkpoint (needs state_dict and metadata)"
            )
        return obj

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict) or set(data) < {"state_dict", "metadata"}:
            raise DatasetError("a checkpoint must be a dict with 'state_dict' and 'metadata'")
        state = {k: v.detach().cpu() for k, v in data["state_dict"].items()}
        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        os.close(fd)
        try:
            torch.save({"state_dict": state, "metadata": data["metadata"]}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        return Path(path).is_file()
