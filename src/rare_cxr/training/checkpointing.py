"""The resume state (`last.pt`): everything needed to continue an interrupted training exactly.

It is *run state*, not a product of the pipeline, so it lives outside the catalog at
`<training.resume_dir>/<model name>/last.pt` (versioning it would make "the latest" ambiguous
between runs). Written atomically after every epoch (temporary file + rename), so a kill at any
moment leaves either the previous or the new epoch's state. Loaded with `weights_only=True`:
tensors, numbers, strings and containers only (RNG states are stored as tensors/tuples).

When a training finishes, the state is **deleted**: a re-run then starts afresh instead of
"resuming" a finished run and returning immediately. The product (best checkpoint, history)
is in the versioned catalog entries; a finished run's optimiser state has no further use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rare_cxr.datasets.image_folder import write_atomic_bytes

logger = logging.getLogger(__name__)


def resume_path(resume_dir: str | Path, model_name: str) -> Path:
    return Path(resume_dir) / model_name / "last.pt"


def fingerprint(*parts: Any) -> str:
    """A hash of the settings a resume must share with the run that wrote the state."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic_bytes(path, buffer.getvalue())


def load_resume_state(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it exists and belongs to the same configuration, else None (logged)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file must not block a fresh start
        logger.warning("ignoring unreadable resume state %s (%s); starting afresh", path, err)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        logger.warning(
            "resume state %s was written with different model/training parameters or data; "
            "starting afresh (delete it to silence this)",
            path,
        )
        return None
    return state


def finish(path: Path) -> None:
    """Training completed: remove the resume state so the next run starts afresh."""
    path.unlink(missing_ok=True)
