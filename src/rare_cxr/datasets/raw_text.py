"""The raw NIH text files (label table, official lists, bounding boxes) as a Kedro dataset.

Why not plain `text.TextDataset`: these entries point into the user's data folder
(`data_root`), which in `--env nih` is a 42 GB download rare-cxr must never change. They are
written only by the phantom generator, so a save

* refuses unless the folder is rare-cxr's own phantom folder (`rare_cxr.ownership`) — checked
  before the first byte, so a mistyped `--params data_root=/path/to/nih` loses nothing;
* is atomic (`rare_cxr.atomic`), and skipped when the file already holds exactly this text
  (regenerating an unchanged phantom rewrites nothing).

`optional: true` makes a missing file load as an empty string (logged), for inputs the
documentation calls optional, such as `BBox_List_2017.csv`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import get_filepath_str
from kedro_datasets._typing import TablePreview

from rare_cxr.datasets.atomic import TextDataset
from rare_cxr.ownership import claim_phantom_folder

logger = logging.getLogger(__name__)


class RawTextDataset(TextDataset):
    """A text file in the raw data folder: guarded, atomic, idempotent saves; optional loads."""

    def __init__(self, *, filepath: str, optional: bool = False, **kwargs: Any) -> None:
        super().__init__(filepath=filepath, **kwargs)
        self._optional = bool(optional)

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "optional": self._optional}

    def load(self) -> str:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        if self._optional and not self._fs.exists(path):
            logger.warning(
                "optional input %s is absent; what needs it is skipped and reported", path
            )
            return ""
        return super().load()

    def preview(self, nrows: int = 5) -> TablePreview:  # type: ignore[override]
        """First rows of a label table (CSV), or first lines of an id list, as a table."""
        text = self.load()
        path = str(self._filepath)
        if ".csv" in path:
            table = pd.read_csv(io.StringIO(text), nrows=nrows, dtype=str)
        else:
            table = pd.DataFrame({"line": text.splitlines()[:nrows]})
        return TablePreview(table.to_dict(orient="split"))

    def save(self, data: str) -> None:
        path = Path(get_filepath_str(self._get_save_path(), self._protocol))
        claim_phantom_folder(path.parent)
        if path.is_file():
            try:
                # bytes, not text: the expert file's \r\n would be normalised away by read_text
                unchanged = path.read_bytes() == data.encode("utf-8")
            except OSError:
                unchanged = False
            if unchanged:
                logger.debug("%s already holds this content; not rewritten", path)
                return
        super().save(data)
