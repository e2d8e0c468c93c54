"""Progress bars: one convention for every long step (training, predict, validation, bootstrap,
Grad-CAM, image cache).

`progress(...)` is `tqdm.auto.tqdm` with the project's rules, so no call site repeats them:

* shown on a terminal (stderr is a TTY) or in a Jupyter kernel; hidden when stderr is a pipe or
  a file (`kedro run > log 2>&1`, CI, the tests' subprocesses), where tqdm's carriage-return
  redraws would fill the log with one bar per refresh;
* `RARE_CXR_PROGRESS=1` forces bars on (a log that should show them), `=0` forces them off;
* only rank 0 of a `torchrun` / DDP job shows bars (N identical bars would interleave);
* a call site may switch its bar off (`enabled=False`, e.g. `training.progress_bar: false`);
* while a bar is on screen, log records are written above it: the bar is cleared, the record
  printed, the bar redrawn. Kedro's console handler (`kedro.logging.RichHandler`) is not a
  `StreamHandler`, so tqdm's own `logging_redirect_tqdm` would not reach it; wrapping each
  console handler's `emit` in `tqdm.external_write_mode` does, for any handler class.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

from tqdm import autonotebook
from tqdm import std as tqdm_std
from tqdm.auto import tqdm

ENV_VAR = "RARE_CXR_PROGRESS"

_FALSE = ("0", "false", "no", "off")


def _rank() -> int:
    """This process's rank: torch.distributed's when a group is up, else torchrun's RANK."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def bars_enabled() -> bool:
    """Whether this process shows progress bars at all (see the module docstring)."""
    if _rank() != 0:
        return False
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        return forced not in _FALSE
    if autonotebook.tqdm is not tqdm_std.tqdm:  # tqdm chose its notebook widget: Jupyter
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


# ---- log records above the bars ------------------------------------------------------------


class _LogsAboveBars:
    """Counts the bars on screen; while there is one, every console handler's `emit` runs
    inside `tqdm.external_write_mode` (clear the bars, write the record, redraw them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._wrapped: list[logging.Handler] = []

    @staticmethod
    def _console_handlers() -> list[logging.Handler]:
        """Every handler of every logger, except those writing to files (a file gets no bar,
        so its records need no clearing)."""
        loggers = [logging.getLogger()] + [
            logger
            for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger)
        ]
        out: list[logging.Handler] = []
        for logger in loggers:
            for handler in logger.handlers:
                if not isinstance(handler, logging.FileHandler) and handler not in out:
                    out.append(handler)
        return out

    def opened(self) -> None:
        with self._lock:
            self._open += 1
            if self._open > 1:
                return
            for handler in self._console_handlers():
                emit = handler.emit

                def emit_above(record: logging.LogRecord, emit: Any = emit) -> None:
                    with tqdm.external_write_mode():
                        emit(record)

                # an instance attribute, shadowing the class's emit until `closed` deletes it
                handler.emit = emit_above  # type: ignore[method-assign]
                self._wrapped.append(handler)

    def closed(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open > 0:
                return
            for handler in self._wrapped:
                if "emit" in vars(handler):
                    del handler.emit
            self._wrapped.clear()


_logs_above_bars = _LogsAboveBars()


class _Bar(tqdm):  # type: ignore[misc, valid-type]
    """tqdm that keeps log records above itself while it is displayed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._logs_redirected = False
        super().__init__(*args, **kwargs)
        if not self.disable:
            _logs_above_bars.opened()
            self._logs_redirected = True

    def close(self) -> None:
        try:
            super().close()
        finally:
            if getattr(self, "_logs_redirected", False):
                self._logs_redirected = False
                _logs_above_bars.closed()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A progress bar in the project's convention; use it as tqdm (iterate it, or `update()` it
    inside `with progress(...) as bar:`).

    `desc` names the model and the step ("densenet121 predict test"), `unit` what one tick is
    (batch, img, resample). `enabled=False` hides it whatever the environment; otherwise
    `bars_enabled()` decides. Bars vanish when done (`leave=False`): the step's log line
    reports the result.
    """
    return _Bar(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        disable=not (enabled and bars_enabled()),
        dynamic_ncols=True,
        **kwargs,
    )
