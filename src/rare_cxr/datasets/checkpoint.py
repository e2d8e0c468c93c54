"""Model checkpoints as a versioned Kedro dataset: tensors plus plain metadata, never pickled code.

Why not `kedro_datasets_experimental.pytorch.PyTorchDataset`: it stores only the weights, and a
checkpoint here must carry its own model spec, finding order, input normalisation and scales so
that prediction and reporting can rebuild the model without the training parameters.

Saved object: `{"state_dict": {name: tensor}, "metadata": {plain python}}` (plus
`"seed_state_dicts": {seed: state_dict}` for the extra seeds of a multi-seed model), written with
`torch.save` to a temporary file, fsynced and renamed (`rare_cxr.atomic`); loaded with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
Loading adds `metadata["checkpoint_version"]`: the catalog version (run id) the file was read
from, which `predict` stamps on every prediction so reporting can check what belongs together.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from kedro.io import DatasetError
from kedro_datasets._typing import JSONPreview

from rare_cxr.atomic import AtomicWriter
from rare_cxr.datasets.previews import json_text
from rare_cxr.datasets.versioned import LocalVersionedDataset


class TorchCheckpointDataset(LocalVersionedDataset):
    """`{"state_dict", "metadata"}` ⇄ a `.pt` file; supports `versioned: true`."""

    def load(self) -> dict[str, Any]:
        path = Path(self._get_load_path())
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "state_dict" not in obj or "metadata" not in obj:
            raise DatasetError(
                f"{path} is not a rare-cxr checkpoint (needs state_dict and metadata)"
            )
        obj["metadata"]["checkpoint_version"] = (
            self.resolve_load_version() if self._version else None
        ) or "unversioned"
        return obj

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict) or set(data) < {"state_dict", "metadata"}:
            raise DatasetError("a checkpoint must be a dict with 'state_dict' and 'metadata'")
        state = {k: v.detach().cpu() for k, v in data["state_dict"].items()}
        metadata = {k: v for k, v in data["metadata"].items() if k != "checkpoint_version"}
        payload: dict[str, Any] = {"state_dict": state, "metadata": metadata}
        if data.get("seed_state_dicts"):  # the other seeds of a multi-seed model
            payload["seed_state_dicts"] = {
                str(seed): {k: v.detach().cpu() for k, v in weights.items()}
                for seed, weights in data["seed_state_dicts"].items()
            }
        # serialised in memory first: torch's zip writer turns an OSError raised by the file
        # (a full disk) into "unexpected pos ...", hiding the cause from the user
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with AtomicWriter(Path(self._get_save_path()), "wb") as handle:
            handle.write(buffer.getbuffer())

    def preview(self) -> JSONPreview:
        """The checkpoint's metadata (model spec, training id, best epoch, lineage); no weights."""
        checkpoint = self.load()
        return JSONPreview(
            json_text({**checkpoint["metadata"], "tensors": len(checkpoint["state_dict"])})
        )
