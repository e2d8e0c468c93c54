"""Kedro datasets of the project (each module says why kedro-datasets' own do not fit).

`ParquetDataset`, `CSVDataset`, `JSONDataset`, `TextDataset`, `MatplotlibDataset` are
kedro-datasets' classes with atomic saves; `RawTextDataset` guards the user's raw data folder.
"""

from rare_cxr.datasets.atomic import (
    CSVDataset,
    JSONDataset,
    MatplotlibDataset,
    ParquetDataset,
    TextDataset,
)
from rare_cxr.datasets.checkpoint import TorchCheckpointDataset
from rare_cxr.datasets.image_cache import ImageCacheDataset
from rare_cxr.datasets.image_folder import ImageFolderDataset
from rare_cxr.datasets.raw_text import RawTextDataset
from rare_cxr.datasets.training_state import TrainingStateDataset

__all__ = [
    "CSVDataset",
    "ImageCacheDataset",
    "ImageFolderDataset",
    "JSONDataset",
    "MatplotlibDataset",
    "ParquetDataset",
    "RawTextDataset",
    "TextDataset",
    "TorchCheckpointDataset",
    "TrainingStateDataset",
]
