"""A folder of NIH-layout PNGs as a Kedro dataset.

Why not `partitions.PartitionedDataset` + `pillow.ImageDataset`: the NIH release comes either as
`images/*.png` or, from Kaggle, as `images_001/images/*.png` ... `images_012/images/*.png`, and a
partial download is normal. Downstream nodes need the *path* of every image (to index it, to
decode it once into the cache, and to report which ones are missing or corrupt), not a
decoded image object per file; PartitionedDataset offers neither the nested layout as one flat
id space nor paths.

Saving is used by the phantom generator only, and is guarded: it writes only into a folder
rare-cxr owns (`rare_cxr.ownership.claim_phantom_folder`: new, empty, or marked as a phantom),
so the user's NIH download can never be replaced. The new images are written into a staging
folder that is swapped in whole (`rare_cxr.atomic.staging_folder`). A mapping that carries a
`fingerprint` (what `PhantomImages` does) is not rewritten when the folder already holds
exactly those images from the same fingerprint: an unchanged phantom keeps its files and their
modification times, so the image cache built from them stays valid.

The images are rendered and encoded by a pool of worker processes (`workers`, 0 = every core):
108k phantom films at NIH's size are ~20 minutes of one core. Each file's bytes depend only on
its own source (the phantom seeds every film on its own; PNG encoding is deterministic), so the
folder is byte for byte the same whatever the number of workers (tests/test_image_folder.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import ImagePreview
from PIL import Image

from rare_cxr.atomic import staging_folder, sweep_leftovers
from rare_cxr.datasets.previews import contact_sheet_png_base64
from rare_cxr.imaging import load_grayscale
from rare_cxr.ownership import claim_phantom_folder, update_phantom_marker
from rare_cxr.processes import exit_with_parent
from rare_cxr.progress import progress

logger = logging.getLogger(__name__)

# NIH image names: 8-digit patient id, underscore, 3-digit follow-up number.
IMAGE_ID_PATTERN = re.compile(r"^\d{8}_\d{3}\.png$")
# Below this many images a save is written in this process: a pool's start-up costs more.
MIN_PARALLEL_IMAGES = 64
# Images per task handed to a worker (small enough that no worker idles long at the end).
_CHUNK = 256


def validate_image_id(image_id: str) -> str:
    """Refuse image names that could escape the image folder (separators, `..`)."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image id must be a non-empty string, got {image_id!r}")
    if "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith("."):
        raise ValueError(f"image id {image_id!r} contains a path separator or '..'")
    return image_id


class ImageFolderDataset(AbstractDataset[Mapping[str, Any], dict[str, str]]):
    """Load: `{image_id: absolute path}` for every PNG under `images/` or `images_*/images/`.

    Save: a mapping `{image_id: image}` where an image is a uint8 numpy array (H×W),
    a PIL image, or a zero-argument callable returning either (so a generator need not hold
    every image in memory). Files are written to `<path>/images/<image_id>` atomically, by
    `workers` processes (0 = every core, 1 = in this process; the module docstring says why
    the result does not depend on it).
    """

    def __init__(self, path: str, workers: int = 0, metadata: dict[str, Any] | None = None) -> None:
        if int(workers) < 0:
            raise ValueError(f"ImageFolderDataset workers: expected >= 0, got {workers!r}")
        self._root = Path(path)
        self._workers = int(workers)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._root)}

    def _image_dirs(self) -> list[Path]:
        dirs = [self._root / "images"]
        dirs += sorted(p / "images" for p in self._root.glob("images_*") if p.is_dir())
        return [d for d in dirs if d.is_dir()]

    def load(self) -> dict[str, str]:
        if not self._root.is_dir():
            raise DatasetError(
                f"image folder {self._root} does not exist; expected the NIH layout "
                f"({self._root}/images/*.png or {self._root}/images_0XX/images/*.png)"
            )
        found: dict[str, str] = {}
        for folder in self._image_dirs():
            for entry in os.scandir(folder):
                if entry.name.lower().endswith(".png") and not entry.name.startswith("."):
                    # the first occurrence wins; a duplicate across archives is the same image
                    found.setdefault(entry.name, os.path.abspath(entry.path))
        return dict(sorted(found.items()))

    def save(self, data: Mapping[str, Any]) -> None:
        """Replace `<path>/images` with exactly the given images (in a folder rare-cxr owns).

        The images are written into a fresh staging folder which is then swapped in, so a
        re-run with fewer images leaves no stale PNG behind for `index_images` to find, and an
        interrupted save leaves the previous folder untouched.
        """
        marker = claim_phantom_folder(self._root)  # raises before any write if not ours
        sweep_leftovers(self._root)
        final = self._root / "images"
        fingerprint = getattr(data, "fingerprint", None)
        if fingerprint is not None and marker.get("images_fingerprint") == fingerprint:
            on_disk = {e.name for e in os.scandir(final)} if final.is_dir() else set()
            if on_disk == set(data):
                logger.info(
                    "%s already holds these %d images (fingerprint %s): not rewritten",
                    final,
                    len(on_disk),
                    fingerprint[:12],
                )
                return
        items = list(data.items())
        for image_id, _ in items:  # every name checked before the first byte is written
            validate_image_id(image_id)
        update_phantom_marker(self._root, images_fingerprint=None)  # invalid while rewriting
        with staging_folder(final) as staging:
            # plain writes: the staging folder is invisible until it is fsynced and swapped in
            write_images(items, staging, self._workers)
            staging.chmod(0o755)
        update_phantom_marker(self._root, images_fingerprint=fingerprint)

    def preview(self, count: int = 8) -> ImagePreview:
        """The first `count` films (by image id), decoded as the image index decodes them."""
        paths = list(self.load().values())[: max(1, count)]
        return ImagePreview(contact_sheet_png_base64([load_grayscale(p) for p in paths]))

    def _exists(self) -> bool:
        return bool(self._image_dirs())


def resolve_workers(workers: int, n_images: int) -> int:
    """0 means every usable core; 1 for a small save (MIN_PARALLEL_IMAGES) or where processes
    cannot be forked."""
    if n_images < MIN_PARALLEL_IMAGES or "fork" not in mp.get_all_start_methods():
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, workers or cores)


def chunk_size(n_images: int, workers: int) -> int:
    """Up to _CHUNK images per task, but ~8 tasks per worker so that none idles at the end."""
    return max(1, min(_CHUNK, n_images // (8 * workers) or 1))


# The save being written, inherited by the forked workers (module doc of `write_images`).
_pending: Sequence[tuple[str, Any]] = ()


def _write_range(staging: str, start: int, stop: int) -> int:
    """Write images `start:stop` of `_pending` into `staging`; returns how many."""
    for image_id, source in _pending[start:stop]:
        _as_pil(image_id, source).save(os.path.join(staging, image_id), format="PNG")
    return stop - start


def write_images(items: Sequence[tuple[str, Any]], staging: Path, workers: int) -> None:
    """Encode `(image_id, source)` items as PNGs into `staging`, on `workers` processes.

    The workers are forked, so they inherit the items as they are (callables included: a
    lambda cannot be pickled) and receive only index ranges; nothing but counts travels back.
    They end by themselves if this process dies (`exit_with_parent`). Without fork (macOS,
    Windows) the images are written in this process.
    """
    global _pending  # noqa: PLW0603 - read by the forked workers
    n_workers = resolve_workers(workers, len(items))
    step = chunk_size(len(items), n_workers)
    ranges = [(s, min(s + step, len(items))) for s in range(0, len(items), step)]
    with progress(total=len(items), desc="write images", unit="img", smoothing=0.1) as bar:
        _pending = items
        try:
            if n_workers == 1:
                for start, stop in ranges:
                    bar.update(_write_range(str(staging), start, stop))
                return
            context = mp.get_context("fork")
            with ProcessPoolExecutor(
                n_workers, mp_context=context, initializer=exit_with_parent
            ) as pool:
                futures = [pool.submit(_write_range, str(staging), s, e) for s, e in ranges]
                try:
                    for future in futures:
                        bar.update(future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # no more writes, then raise
                    raise
        finally:
            _pending = ()


def _as_pil(image_id: str, source: Any) -> Image.Image:
    image = source() if callable(source) else source
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise DatasetError(f"cannot save {image_id!r}: expected a uint8 array or a PIL image")
    return image


ImageSource = np.ndarray | Image.Image | Callable[[], Any]
