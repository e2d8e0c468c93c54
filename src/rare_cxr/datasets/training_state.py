"""A model's training-state folder as a catalog entry (`<model>.training_state`).

Why a dataset and not a parameter: the resume state must live in the environment's own data
folder and resolve against the project root whatever the working directory (Kedro makes a
catalog `path` absolute; it leaves parameters alone), and it should appear in kedro-viz's
lineage as an input of `train_model`. Loading returns a `TrainingStateStore` handle; the trainer
reads and writes the state files itself, atomically, after every epoch (see
`rare_cxr.training.checkpointing`). It is run state, so it is not versioned and not saved
through the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from rare_cxr.training.checkpointing import TrainingStateStore


class TrainingStateDataset(AbstractDataset[None, TrainingStateStore]):
    """Load → `TrainingStateStore(path)`; never saved through the catalog."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def load(self) -> TrainingStateStore:
        return TrainingStateStore(self._path)

    def save(self, data: None) -> None:
        raise DatasetError(
            f"{self._path}: the training state is written by the trainer itself, after every "
            "epoch; it is not a node output"
        )

    def _exists(self) -> bool:
        return True
