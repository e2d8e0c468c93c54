"""The image cache folder as a Kedro dataset.

Why a custom dataset: the cache is a folder of memory-mapped `.npy` files plus tables, tens of
gigabytes for NIH at 448 px. Pickling it (`pickle.PickleDataset`) would copy it through memory
and make loading execute code; a `PartitionedDataset` of images would throw away the one thing
that makes it fast (one contiguous array per split). `save` receives the lightweight
`ImageCachePlan` that the `build_image_cache` node returns and builds it *in place*: into
`<path>.tmp-<pid>` beside the final folder, then renamed, reusing an up-to-date cache.
`load` returns an `ImageCache` whose splits are read-only memory maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import ImagePreview

from rare_cxr.datasets.previews import contact_sheet_png_base64
from rare_cxr.image_cache import ImageCache, ImageCachePlan


class ImageCacheDataset(AbstractDataset[ImageCachePlan, ImageCache]):
    """Load → `ImageCache`; save ← `ImageCachePlan` (built atomically at `path`)."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def load(self) -> ImageCache:
        try:
            return ImageCache(self._path)
        except FileNotFoundError as exc:
            raise DatasetError(str(exc)) from exc

    def save(self, data: ImageCachePlan) -> None:
        if not isinstance(data, ImageCachePlan):
            raise DatasetError(
                f"ImageCacheDataset({self._path}) saves an ImageCachePlan (what the "
                f"build_image_cache node returns), got {type(data).__name__}"
            )
        data.build(self._path)

    def _exists(self) -> bool:
        return (self._path / "meta.json").is_file()

    def preview(self, split: str = "train", count: int = 8) -> ImagePreview:
        """The first `count` cached images of `split`: the pixels the models are fed."""
        images = self.load().split(split).images
        return ImagePreview(contact_sheet_png_base64(list(images[: max(1, count)])))
