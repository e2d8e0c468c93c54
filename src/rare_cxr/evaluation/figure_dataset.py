"""A Matplotlib dataset that can also be *loaded* back, as PNG bytes.

kedro-datasets' `MatplotlibDataset` is save-only; the report node needs the very PNGs the run
saved (same version) to embed them, and re-drawing them would duplicate work and could drift.
Saving (atomic, see `rare_cxr.datasets.atomic`), versioning and kedro-viz's image preview are
inherited unchanged.
"""

from __future__ import annotations

from kedro.io.core import get_filepath_str

from rare_cxr.datasets.atomic import MatplotlibDataset


class FigureDataset(MatplotlibDataset):
    """`matplotlib.MatplotlibDataset` (single figure) whose `load()` returns the PNG bytes."""

    def load(self) -> bytes:  # type: ignore[override]
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(load_path, mode="rb") as f:
            return f.read()
