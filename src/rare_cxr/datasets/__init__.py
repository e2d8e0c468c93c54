"""Kedro datasets that kedro-datasets does not provide (each module says why)."""

from rare_cxr.datasets.checkpoint import TorchCheckpointDataset
from rare_cxr.datasets.image_cache import ImageCacheDataset
from rare_cxr.datasets.image_folder import ImageFolderDataset

__all__ = ["ImageCacheDataset", "ImageFolderDataset", "TorchCheckpointDataset"]
