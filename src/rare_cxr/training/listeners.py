"""Epoch listeners: how code outside a Kedro node (a hook) sees training progress live.

`train_model` is a Kedro node: its inputs are catalog entries, so a hook cannot hand it a
`TrainingCallbacks`. A hook instead registers a listener here for the duration of the node
(`add_listener` / `remove_listener`), and `train_model` chains the registered listeners after
its own callbacks (`with_listeners`). Experiment tracking (`rare_cxr.tracking`) uses it to log
every epoch's history row to MLflow while the model trains.

Why a process-wide list: the node and the hook meet only in this process (the SequentialRunner
runs nodes in the hook's process, as does each torchrun rank). Spawned DDP workers
(`training.devices: N`) call no listener; the hook back-fills what it did not see from the
history the node returns. With no listener registered
`with_listeners` returns the callbacks it was given, unchanged, so training is untouched.
A listener gets a copy of the row: it cannot change what the trainer records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# (model name, seed, epoch, history row)
EpochListener = Callable[[str, int, int, Mapping[str, Any]], None]

_LISTENERS: list[EpochListener] = []


def add_listener(listener: EpochListener) -> None:
    """Register `listener` until `remove_listener`."""
    _LISTENERS.append(listener)


def remove_listener(listener: EpochListener) -> None:
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


def with_listeners(callbacks: Any, model: str, seed: int) -> Any:
    """`callbacks` (a `TrainingCallbacks` or None) with the registered listeners called after its
    own `on_epoch_end`; `callbacks` itself when no listener is registered."""
    if not _LISTENERS:
        return callbacks
    from rare_cxr.training.engine import TrainingCallbacks

    listeners = list(_LISTENERS)
    own_epoch_end = callbacks.on_epoch_end if callbacks is not None else None

    def on_epoch_end(epoch: int, row: dict[str, Any]) -> None:
        if own_epoch_end is not None:
            own_epoch_end(epoch, row)
        for listener in listeners:
            listener(model, seed, epoch, dict(row))

    return TrainingCallbacks(
        on_step=callbacks.on_step if callbacks is not None else None, on_epoch_end=on_epoch_end
    )
