"""The training state: resume an interrupted training exactly, reuse a finished one.

One file per training configuration, `<state folder>/<fingerprint>.pt`, where the fingerprint
hashes everything a training's result depends on: the model spec, the training parameters that
change the numbers, the image cache's pixel and label fingerprints, the augmentation policy and
the number of processes. The state folder is the catalog entry `<model>.training_state`
(`data/<env>/06_models/<model>/training_state/`); Kedro resolves it against the project root.

* **Unfinished** (`finished: False`): written atomically after every epoch — weights,
  optimiser, scaler, schedule, RNG states, early-stopping record, history. A rerun of the same
  configuration continues from the last completed epoch and replays it bit for bit.
* **Finished** (`finished: True`): written when training completes — the best weights, their
  metadata and the history (no optimiser: ~1/3 of the size). It is *kept*: if the catalog save
  of the checkpoint fails (full disk, kill), or the run dies in a later model or stage, the rerun
  returns this result at once instead of training again, and says so in the log. Set
  `training.reuse_finished: false` (or delete the file) to train again.

A state of another configuration is never overwritten (it has another file name); the log says
which settings differ from the newest one, so "why did it start from scratch?" has an answer
(changing the batch size after an out-of-memory crash, for instance, starts afresh: it changes
the sample order and the schedule). Loaded with `weights_only=True`: tensors, numbers, strings
and containers only. An unreadable or malformed file is logged and ignored, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rare_cxr.atomic import AtomicWriter

logger = logging.getLogger(__name__)

STATE_FORMAT = 2
# Keys every unfinished / finished state must hold (checked before use: a foreign or truncated
# file gives a logged fresh start, not an AttributeError three epochs later).
UNFINISHED_KEYS = frozenset(
    {
        "model",
        "optimizer",
        "scaler",
        "schedule",
        "rng",
        "stage_index",
        "epoch_in_stage",
        "global_epoch",
        "best_metric",
        "best_state",
        "best_epoch",
        "bad_epochs",
        "history",
    }
)
FINISHED_KEYS = frozenset({"best_state", "metadata", "history"})


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


def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        out: dict[str, Any] = {}
        for key, value in settings.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: settings}


def describe_differences(old: Any, new: Any, limit: int = 6) -> str:
    """`training.batch_size: 64 -> 32; data.cache: ab12 -> cd34` (the first `limit` keys)."""
    before, after = (
        _flatten(json.loads(json.dumps(old, default=str))),
        _flatten(json.loads(json.dumps(new, default=str))),
    )
    keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    shown = [f"{k}: {before.get(k, '(absent)')!r} -> {after.get(k, '(absent)')!r}" for k in keys]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown[:limit]) + more if shown else "nothing recorded differs"


class TrainingStateStore:
    """The folder of one model's training states (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"TrainingStateStore({str(self.folder)!r})"

    def path(self, fp: str) -> Path:
        return self.folder / f"{fp}.pt"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable: a truncated copy, another program's file
            logger.warning(
                "ignoring unreadable training state %s (%s: %s); starting afresh",
                path,
                type(err).__name__,
                err,
            )
            return None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            logger.warning(
                "ignoring %s: not a rare-cxr training state of format %d; starting afresh",
                path,
                STATE_FORMAT,
            )
            return None
        needed = FINISHED_KEYS if state.get("finished") else UNFINISHED_KEYS
        missing = sorted(needed - set(state))
        if missing:
            logger.warning(
                "ignoring malformed training state %s (missing %s); starting afresh", path, missing
            )
            return None
        return state

    def load(self, fp: str, settings: Any) -> dict[str, Any] | None:
        """The state for this fingerprint, or None (with a log line saying why none is used)."""
        path = self.path(fp)
        if path.is_file():
            state = self._read(path)
            if state is not None and state.get("fingerprint") != fp:
                logger.warning("ignoring %s: its recorded fingerprint does not match", path)
                return None
            return state
        others = sorted(
            (p for p in self.folder.glob("*.pt") if p != path), key=lambda p: p.stat().st_mtime
        )
        if others:
            newest = self._read(others[-1])
            detail = (
                describe_differences(newest.get("settings"), settings)
                if newest is not None
                else "unreadable"
            )
            logger.warning(
                "training state(s) of other configurations exist in %s; the newest (%s) differs "
                "in: %s. This configuration starts afresh; the other states are kept.",
                self.folder,
                others[-1].name,
                detail,
            )
        return None

    def save(self, fp: str, state: dict[str, Any]) -> Path:
        """Write a state atomically (temporary file + fsync + rename).

        Streamed into the file, not serialised in memory first: a state holds the weights,
        Adam's two moments and the best weights, ~2.2 GB for VGG16, and an in-memory buffer
        held all of that once more (issue 19's rehearsal measured a 5.9-6.4 GB peak RSS in
        VGG16's training with it). torch's zip writer reports a failed write (a full disk) as a
        RuntimeError of its own, so the error is re-raised naming the file and the free space.
        """
        path = self.path(fp)
        with AtomicWriter(path, "wb") as handle:
            try:
                torch.save({**state, "format": STATE_FORMAT, "fingerprint": fp}, handle)
            except (RuntimeError, OSError) as err:
                free = shutil.disk_usage(path.parent).free / 2**20
                raise OSError(
                    f"could not write the training state {path}: {err} ({free:,.0f} MB free on"
                    " its disk)"
                ) from err
        return path
