"""Decode every PNG once: the deterministic half of the input transform (MONAI's split).

A full NIH epoch is 112,120 PNGs of 1024x1024; decoding and resizing them costs ~8 ms per image
per core, which is more than a GPU needs to train on them. So each `ok` image of each split is
decoded once (grayscale, resized to the largest scale the models use) into one uint8 `.npy`
per split, and training reads random batches straight out of a memory map.

On-disk layout of a cache folder (all written atomically, see `ImageCachePlan.build`)::

    <path>/meta.json          size, findings, counts, fingerprints, format version
    <path>/<split>.npy        uint8 [N, size, size], rows in the order of <split>.parquet
    <path>/<split>.parquet    image_id, patient_id, then the 14 findings (int8 0/1)
    <path>/checksums.parquet  split, image_id, pixel_blake2b: a checksum of each cached image's
                              decoded pixels, computed while building
    <path>/skipped.csv        image_id, split, reason (missing/corrupt/too-large/not-a-file/
                              not-indexed), detail

Two fingerprints, for two questions. *Is this cache still a faithful copy of the files?*
(`source_fingerprint`: ids, paths relative to the images' common folder, file sizes and
modification times) decides whether the cache is rebuilt. *What pixels does it hold?*
(`fingerprint`, the content fingerprint: the pixel checksums in row order) is what a training's
fingerprint and the predictions' lineage use. So a download that is moved, mounted at another
path or copied without its modification times may cost a cache rebuild, but never a retraining:
the rebuilt cache holds the same pixels, hence the same content fingerprint.

Why a plan object: the Kedro node (`build_image_cache`) stays a pure function of its inputs
(which images, which labels, which size) and returns an `ImageCachePlan`; the catalog's
`ImageCacheDataset.save` executes it into a staging folder next to the final one and
renames it into place, so the big array is never pickled or copied across filesystems, and
an existing cache with the same fingerprint is reused without decoding anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field

from rare_cxr.atomic import staging_folder, sweep_leftovers
from rare_cxr.findings import FINDINGS
from rare_cxr.imaging import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError
from rare_cxr.parameters import Params, check
from rare_cxr.processes import exit_with_parent

logger = logging.getLogger(__name__)

# 2: content fingerprint from per-image pixel checksums (1 hashed absolute paths and mtimes)
FORMAT_VERSION = 2
RESAMPLE = Image.Resampling.BILINEAR  # Pillow's bilinear is antialiased when it downsamples
RESAMPLE_NAME = "PIL.BILINEAR (antialiased)"
SPLIT_ORDER = ("train", "val", "test")
SKIPPED_COLUMNS = ["image_id", "split", "reason", "detail"]
TABLE_ID_COLUMNS = ["image_id", "patient_id"]
_CHUNK = 64  # max images per task sent to a worker: amortises IPC, keeps the bar live
CHECKSUM_BYTES = 16  # blake2b digest size of one image's pixels (collisions: ~2^-64)
CHECKSUMS_FILE = "checksums.parquet"


# --------------------------------------------------------------------------------------------
# Reading a cache
# --------------------------------------------------------------------------------------------


class CacheSplit:
    """One split of a cache: `.images` (uint8 memmap [N, S, S]), `.table`, `.labels`.

    Rows of `.images`, `.table` and `.labels` are aligned. The memmap is read-only, so a
    buggy consumer cannot corrupt the cache, and opening a split costs nothing until pixels
    are touched (the OS page cache does the rest).
    """

    def __init__(self, name: str, images: np.ndarray, table: pd.DataFrame) -> None:
        if len(images) != len(table):
            raise ValueError(
                f"image cache split {name!r}: {len(images)} images but {len(table)} table rows"
            )
        self.name = name
        self.images = images
        self.table = table

    @property
    def labels(self) -> np.ndarray:
        """float32 [N, 14] in FINDINGS order (what a BCE loss wants)."""
        return self.table[list(FINDINGS)].to_numpy(dtype=np.float32)

    @property
    def image_ids(self) -> list[str]:
        return [str(x) for x in self.table["image_id"]]

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"CacheSplit({self.name!r}, n={len(self)}, shape={tuple(self.images.shape)})"


class ImageCache:
    """A built cache folder: `.size`, `.findings`, `.split_names`, `.split(name)`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a built image cache (no meta.json); run "
                f"`kedro run --pipelines augmentation` to build it"
            )
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"image cache {self.path} has format_version "
                f"{self.meta.get('format_version')!r}, expected {FORMAT_VERSION}; rebuild it"
            )
        self._splits: dict[str, CacheSplit] = {}

    @property
    def size(self) -> int:
        """Side of the square images in pixels."""
        return int(self.meta["size"])

    @property
    def findings(self) -> tuple[str, ...]:
        return tuple(self.meta["findings"])

    @property
    def split_names(self) -> list[str]:
        return list(self.meta["counts"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def skipped(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "skipped.csv", dtype=str, keep_default_na=False)

    def checksums(self) -> pd.DataFrame:
        """split, image_id, pixel_blake2b (hex) of every cached image, in row order."""
        return pd.read_parquet(self.path / CHECKSUMS_FILE).astype(str)

    def split(self, name: str) -> CacheSplit:
        """Open one split (memory-mapped, read-only); cached per ImageCache object."""
        if name not in self.meta["counts"]:
            raise KeyError(
                f"image cache {self.path} has no split {name!r}; it has {self.split_names}"
            )
        if name not in self._splits:
            images = np.load(self.path / f"{name}.npy", mmap_mode="r")
            table = pd.read_parquet(self.path / f"{name}.parquet")
            self._splits[name] = CacheSplit(name, images, table)
        return self._splits[name]

    def __repr__(self) -> str:
        return f"ImageCache({str(self.path)!r}, size={self.size}, counts={self.meta['counts']})"


# --------------------------------------------------------------------------------------------
# Decoding (runs in worker processes)
# --------------------------------------------------------------------------------------------


def decode_resized(path: str, size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Grayscale uint8 [size, size]: the exact pixels the cache stores for `path`.

    Raises what `rare_cxr.imaging.load_grayscale` raises: an `ImageReadError` (with its
    status) for a file that is not a usable image, `TransientImageError` for a system error.
    """
    from rare_cxr.imaging import load_grayscale

    return resize_square(load_grayscale(path, max_pixels=max_pixels), size)


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 grey H×W -> [size, size] as the cache stores it (`RESAMPLE`, aspect not kept).

    One function for the cache and for inference on new images (`rare_cxr.inference`), so a
    model never sees pixels resized differently from those it was trained on.
    """
    if gray.shape != (size, size):
        gray = np.asarray(Image.fromarray(gray).resize((size, size), RESAMPLE))
    return gray


_worker_array: np.ndarray | None = None
_worker_size = 0
_worker_max_pixels = DEFAULT_MAX_IMAGE_PIXELS

# (reason, detail) of an image that could not be cached; reason is an image_index status
Failure = tuple[str, str]


def _worker_init(
    npy_path: str,
    size: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    watch_parent: bool = False,
) -> None:
    """Each worker maps the output file once and writes its rows in place (no big pickles)."""
    global _worker_array, _worker_size, _worker_max_pixels  # noqa: PLW0603 - per-process state
    _worker_array = np.load(npy_path, mmap_mode="r+")
    _worker_size = size
    _worker_max_pixels = max_pixels
    if watch_parent:
        exit_with_parent()


# (row, failure or None, blake2b digest of the stored pixels or None)
RowResult = tuple[int, Failure | None, bytes | None]


def pixel_checksum(pixels: np.ndarray) -> bytes:
    """blake2b of one cached image's bytes: the unit of the cache's content fingerprint."""
    return hashlib.blake2b(
        np.ascontiguousarray(pixels).tobytes(), digest_size=CHECKSUM_BYTES
    ).digest()


def _decode_chunk(tasks: Sequence[tuple[int, str]]) -> list[RowResult]:
    """Decode rows into the worker's memmap; return (row, failure, checksum) per task.

    Only a problem *of the file* (`ImageReadError`: corrupt, too-large, not-a-file, missing)
    is recorded. A `TransientImageError` (EIO, EACCES, MemoryError... after retries) or any
    unexpected error propagates and aborts the build: recording it would mark a healthy
    image as bad in `skipped.csv`, and a reused cache would keep that row forever.
    """
    assert _worker_array is not None
    results: list[RowResult] = []
    for row, path in tasks:
        try:
            pixels = decode_resized(path, _worker_size, max_pixels=_worker_max_pixels)
            _worker_array[row] = pixels
            results.append((row, None, pixel_checksum(_worker_array[row])))
        except ImageReadError as exc:  # a bad file is recorded, never fatal
            results.append((row, (exc.status, exc.reason), None))
        except Exception as exc:
            exc.add_note(f"while decoding {path} for the image cache (build aborted)")
            raise
    _worker_array.flush()
    return results


def _chunks(items: Sequence[tuple[int, str]], n: int) -> Iterator[list[tuple[int, str]]]:
    for start in range(0, len(items), n):
        yield list(items[start : start + n])


def resolve_workers(workers: int, n_items: int) -> int:
    """0 means every core; never more processes than images."""
    if workers < 0:
        raise ValueError(f"image_cache.workers must be >= 0, got {workers}")
    wanted = workers or (os.cpu_count() or 1)
    return max(1, min(wanted, n_items or 1))


def chunk_size(n_items: int, workers: int) -> int:
    """Up to _CHUNK images per task, but at least ~8 tasks per worker so none idles at the end."""
    return max(1, min(_CHUNK, n_items // (8 * workers) or 1))


def decode_into(
    npy_path: Path,
    paths: Sequence[str],
    size: int,
    workers: int,
    desc: str = "decode",
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[dict[int, Failure], np.ndarray]:
    """Fill rows 0..len(paths)-1 of the `.npy` at `npy_path`; return ({row: (reason, detail)},
    checksums uint8 [N, CHECKSUM_BYTES] (zeros for failed rows)).

    `workers == 1` decodes in this process (tests, tiny caches); otherwise a process pool
    (fork where available: the workers only need numpy and PIL) writes straight into the
    shared memmap, and only (row, failure, checksum) tuples travel back. The workers hold no
    lock of the run (`rare_cxr.runs` uses process-owned record locks) and end by themselves
    when the run's process dies (`exit_with_parent`). Images above `max_pixels` are refused
    before decoding (reason `too-large`). A transient read error raises `TransientImageError`
    (remaining work is cancelled) instead of becoming a failure.
    """
    from rare_cxr.progress import progress

    tasks = list(enumerate(paths))
    n_workers = resolve_workers(workers, len(tasks))
    failures: dict[int, Failure] = {}
    checksums = np.zeros((len(tasks), CHECKSUM_BYTES), np.uint8)

    def collect(results: list[RowResult]) -> None:
        for row, error, digest in results:
            if error:
                failures[row] = error
            else:
                checksums[row] = np.frombuffer(digest or b"", np.uint8)

    bar = progress(total=len(tasks), desc=desc, unit="img", smoothing=0.1)
    try:
        if n_workers == 1:
            _worker_init(str(npy_path), size, max_pixels)
            for chunk in _chunks(tasks, chunk_size(len(tasks), 1)):
                collect(_decode_chunk(chunk))
                bar.update(len(chunk))
        else:
            methods = mp.get_all_start_methods()
            context = mp.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(
                n_workers,
                mp_context=context,
                initializer=_worker_init,
                initargs=(str(npy_path), size, max_pixels, True),
            ) as pool:
                chunks = _chunks(tasks, chunk_size(len(tasks), n_workers))
                for results in pool.map(_decode_chunk, chunks):
                    collect(results)
                    bar.update(len(results))
    finally:
        bar.close()
        _reset_worker_state()
    return failures, checksums


def _reset_worker_state() -> None:
    global _worker_array  # noqa: PLW0603
    _worker_array = None


# --------------------------------------------------------------------------------------------
# Planning and building
# --------------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """What goes into one split: images to decode (id, path) and their table rows."""

    name: str
    table: pd.DataFrame  # image_id, patient_id, 14 findings; rows in decode order
    paths: list[str]


@dataclass
class ImageCachePlan:
    """Everything needed to build (or reuse) a cache; cheap to create, holds no pixels."""

    size: int
    workers: int
    splits: list[SplitPlan]
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))
    # images above this many pixels are skipped as `too-large` (see rare_cxr.imaging)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    # -- fingerprints ------------------------------------------------------------------------

    def source_root(self) -> str:
        """The deepest folder holding every planned image (the download's root, in practice).

        Paths are fingerprinted relative to it, so the same download moved or mounted elsewhere
        (`/data/nih` -> `/nih` in the Docker image) is still recognised as the same files.
        """
        folders = [os.path.dirname(p) for split in self.splits for p in split.paths]
        if not folders:
            return ""
        try:
            return os.path.commonpath(folders)
        except ValueError:  # mixed absolute/relative paths, or several drives: no common root
            return ""

    def source_fingerprint(self) -> str:
        """Hash of what the cache is a copy of: ids, paths relative to `source_root()`, file
        size and modification time, cache size, resampling, split.

        It decides only whether an existing cache is reused or rebuilt. File stats are read here
        (at build time, not in the node) so that a replaced PNG invalidates the cache even when
        its name did not change; a copy without modification times is rebuilt, which costs a
        decode but no training (a training depends on `content_fingerprint`, the pixels).
        """
        digest = hashlib.sha256()
        digest.update(f"v{FORMAT_VERSION}|size={self.size}|{RESAMPLE_NAME}|".encode())
        if self.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS:
            digest.update(f"max_pixels={self.max_image_pixels}|".encode())
        root = self.source_root()
        for split in self.splits:
            digest.update(f"[{split.name}]".encode())
            for image_id, path in zip(split.table["image_id"], split.paths, strict=True):
                try:
                    stat = os.stat(path)
                    sig = f"{stat.st_size}:{stat.st_mtime_ns}"
                except OSError:
                    sig = "missing"
                relative = os.path.relpath(path, root) if root else path
                digest.update(f"{image_id}|{relative}|{sig}\n".encode())
        return digest.hexdigest()

    def table_fingerprint(self) -> str:
        """Hash of the label tables (a relabel must not reuse stale labels)."""
        digest = hashlib.sha256()
        for split in self.splits:
            digest.update(split.name.encode())
            digest.update(pd.util.hash_pandas_object(split.table, index=False).to_numpy())
        return digest.hexdigest()

    # -- building ----------------------------------------------------------------------------

    def build(self, path: str | os.PathLike) -> ImageCache:
        """Build the cache at `path` atomically, reusing an up-to-date one; return it.

        Staging happens in `.<name>.rare-cxr-tmp-<pid>-<token>` beside it (same filesystem,
        so the final rename is cheap; `rare_cxr.atomic`). A leftover staging folder of a dead
        process is deleted, never trusted.
        If the pixels' fingerprint matches the existing cache but labels changed, the `.npy`
        files are hard-linked into the new folder and only the tables are rewritten.
        """
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(final)
        source_fp = self.source_fingerprint()
        table_fp = self.table_fingerprint()
        existing = _try_open(final)
        same_files = existing is not None and existing.meta.get("source_fingerprint") == source_fp
        if same_files and existing is not None:
            if existing.meta.get("table_fingerprint") == table_fp:
                logger.info(
                    "image cache %s is up to date (content %s): reusing it, no decoding",
                    final,
                    existing.fingerprint[:12],
                )
                return existing
            logger.info("image cache %s: same pixels, new labels; rewriting tables only", final)
        elif existing is not None:
            logger.info(
                "image cache %s: the image files changed (or moved without their modification "
                "times); decoding again. Trainings are keyed on the pixels' content, so finished "
                "models are reused if the pixels come out the same.",
                final,
            )

        reuse = existing if same_files else None
        self._check_free_space(final.parent, reuse)
        with staging_folder(final) as staging:  # fsynced and swapped in only on success
            meta = self._build_into(staging, reuse)
            meta["source_fingerprint"] = source_fp
            meta["table_fingerprint"] = table_fp
            (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return ImageCache(final)

    def _check_free_space(self, folder: Path, reuse: ImageCache | None) -> None:
        """Stop before decoding anything if the folder cannot hold the cache (a clear error,
        not a `SIGBUS` half-way through a 30-minute build)."""
        if reuse is not None:
            return  # pixels are hard-linked from the existing cache
        needed = sum(len(s.paths) for s in self.splits) * self.size * self.size
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise ImageCacheSpaceError(folder, needed, free)

    def _build_into(self, folder: Path, reuse: ImageCache | None) -> dict[str, Any]:
        skipped = [self.skipped]
        counts: dict[str, int] = {}
        checksum_tables: list[pd.DataFrame] = []
        started = time.perf_counter()
        decoded = 0
        for split in self.splits:
            npy = folder / f"{split.name}.npy"
            table = split.table.reset_index(drop=True)
            if reuse is not None:
                table, old_skipped, sums = self._reuse_split(split.name, table, npy, reuse)
            else:
                table, old_skipped, sums = self._decode_split(split, table, npy)
                decoded += len(split.paths)
            skipped.append(old_skipped)
            checksum_tables.append(sums)
            table.to_parquet(folder / f"{split.name}.parquet", index=False)
            counts[split.name] = len(table)
        all_skipped = (
            pd.concat([s for s in skipped if len(s)], ignore_index=True)
            if any(len(s) for s in skipped)
            else pd.DataFrame(columns=SKIPPED_COLUMNS)
        )
        all_skipped[SKIPPED_COLUMNS].to_csv(folder / "skipped.csv", index=False)
        checksums = pd.concat(checksum_tables, ignore_index=True).astype(str)
        checksums.to_parquet(folder / CHECKSUMS_FILE, index=False)
        seconds = time.perf_counter() - started
        if decoded:
            logger.info(
                "image cache: decoded %d images in %.1f s (%.0f img/s)",
                decoded,
                seconds,
                decoded / max(seconds, 1e-9),
            )
        return {
            "format_version": FORMAT_VERSION,
            "size": self.size,
            "findings": list(FINDINGS),
            "counts": counts,
            "skipped": {str(k): int(v) for k, v in all_skipped["reason"].value_counts().items()},
            "resample": RESAMPLE_NAME,
            "build_seconds": round(seconds, 3),
            "decoded_images": decoded,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": content_fingerprint(self.size, checksums),
        }

    def _reuse_split(
        self, name: str, table: pd.DataFrame, npy: Path, reuse: ImageCache
    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Same pixels: share the big file, keep the previous row selection and checksums.
        Returns (table, skipped rows carried over, checksums)."""
        _link_or_copy(reuse.path / f"{name}.npy", npy)
        kept_ids = pd.Index(reuse.split(name).table["image_id"])
        # keep the decode-time failures of the previous build (same files, same result):
        # the images planned for decoding that the previous build did not keep, with
        # whatever reason it found (corrupt, too-large, not-a-file, missing)
        old = reuse.skipped
        known = set(self.skipped["image_id"].astype(str))
        planned = set(table["image_id"].astype(str))
        carried = old[
            (old["split"] == name) & old["image_id"].isin(planned) & ~old["image_id"].isin(known)
        ]
        table = table.set_index("image_id").loc[kept_ids].reset_index()
        old_sums = reuse.checksums()
        return table, carried, old_sums[old_sums["split"] == name]

    def _decode_split(
        self, split: Any, table: pd.DataFrame, npy: Path
    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Decode a split's images into `npy`; images that fail are dropped (compacting the
        file) and recorded. Returns (table of the kept rows, skipped rows, checksums)."""
        n = len(split.paths)
        allocate_npy(npy, n, self.size)
        failures, sums = decode_into(
            npy,
            split.paths,
            self.size,
            self.workers,
            desc=f"image cache {split.name}",
            max_pixels=self.max_image_pixels,
        )
        skipped = pd.DataFrame(columns=SKIPPED_COLUMNS)
        if failures:
            logger.warning(
                "image cache %s: %d image(s) failed to decode and are skipped: %s",
                split.name,
                len(failures),
                dict(Counter(reason for reason, _ in failures.values())),
            )
            keep = np.array([i for i in range(n) if i not in failures], dtype=np.int64)
            _compact(npy, keep, self.size)
            sums = sums[keep]
            bad = table.iloc[sorted(failures)]
            skipped = pd.DataFrame(
                {
                    "image_id": bad["image_id"].astype(str).to_numpy(),
                    "split": split.name,
                    "reason": [failures[i][0] for i in sorted(failures)],
                    "detail": [failures[i][1] for i in sorted(failures)],
                }
            )
            table = table.iloc[keep].reset_index(drop=True)
        checksums = pd.DataFrame(
            {
                "split": split.name,
                "image_id": table["image_id"].astype(str).to_numpy(),
                "pixel_blake2b": [bytes(row).hex() for row in sums],
            }
        )
        return table, skipped, checksums


def content_fingerprint(size: int, checksums: pd.DataFrame) -> str:
    """Hash of the pixels a cache holds: per split, in row order, each image id and the checksum
    of its stored pixels. No path, no file date: where the files came from does not matter."""
    digest = hashlib.sha256()
    digest.update(f"content-v1|size={size}|".encode())
    for split, part in checksums.groupby("split", sort=False):
        digest.update(f"[{split}]".encode())
        for image_id, checksum in zip(part["image_id"], part["pixel_blake2b"], strict=True):
            digest.update(f"{image_id}|{checksum}\n".encode())
    return digest.hexdigest()


class ImageCacheSpaceError(OSError):
    """The cache's folder has no room for it: raised before decoding, naming folder and bytes."""

    def __init__(self, folder: Path, needed: int, free: int | None, detail: str = "") -> None:
        free_text = f", {free / 1e9:,.2f} GB free" if free is not None else ""
        super().__init__(
            errno.ENOSPC,
            f"not enough space for the image cache in {folder}: it needs {needed / 1e9:,.2f} GB "
            f"({needed:,} bytes){free_text}{detail}. Free some space, lower image_cache.size, "
            "or put the 05_model_input folder on a larger disk (a symbolic link works).",
        )
        self.folder, self.needed, self.free = folder, needed, free


def allocate_npy(npy: Path, n: int, size: int) -> None:
    """Create the `.npy` of `n` images of `size`² and reserve its blocks on disk.

    Why: `np.lib.format.open_memmap` makes a sparse file; the disk blocks are only claimed when
    a page of the memory map is first written, and a full disk at that moment kills the process
    with SIGBUS (no exception, no message, a staging folder left behind). `posix_fallocate`
    claims every block now, so a full disk is an `ImageCacheSpaceError` naming the folder and
    the bytes needed, raised before any decoding.
    """
    array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, size, size))
    del array  # workers reopen it; closing here flushes the header
    length = npy.stat().st_size
    with open(npy, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, length)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                npy.unlink(missing_ok=True)
                free = shutil.disk_usage(npy.parent).free
                raise ImageCacheSpaceError(
                    npy.parent, length, free, f" (while reserving {npy.name})"
                ) from err
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            logger.warning(  # e.g. a filesystem without fallocate: writes stay unreserved
                "could not reserve disk space for %s (%s); a full disk during the build would "
                "end the process",
                npy,
                err,
            )


def plan_image_cache(
    splits: pd.DataFrame,
    image_index: pd.DataFrame,
    labels: pd.DataFrame,
    size: int,
    workers: int = 0,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageCachePlan:
    """Decide which images of each split are decoded; record the others with a reason.

    `max_image_pixels` is the decode-time limit (images above it are skipped as `too-large`);
    keep it equal to `data_processing.images.max_image_pixels` so index and cache agree.
    """
    bad = isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
    if bad or max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be an integer >= 1, got {max_image_pixels!r}")
    for name, frame, needed in (
        ("splits", splits, ("image_id", "split")),
        ("image_index", image_index, ("image_id", "path", "status")),
        ("labels", labels, ("image_id", "patient_id", *FINDINGS)),
    ):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} lacks column(s) {missing} needed by build_image_cache")
    index = image_index.assign(image_id=image_index["image_id"].astype(str)).set_index("image_id")
    lab = labels.assign(image_id=labels["image_id"].astype(str))
    lab = lab.drop_duplicates("image_id").set_index("image_id")
    split_col = splits["split"].astype(str)
    names = [s for s in SPLIT_ORDER if (split_col == s).any()]
    names += sorted(set(split_col) - set(names))
    plans: list[SplitPlan] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        ids = splits.loc[split_col == name, "image_id"].astype(str).tolist()
        unlabeled = [i for i in ids if i not in lab.index]
        if unlabeled:
            raise ValueError(
                f"splits: {len(unlabeled)} image(s) of split {name!r} are not in labels, "
                f"e.g. {unlabeled[:3]}"
            )
        keep: list[str] = []
        paths: list[str] = []
        for image_id in ids:
            if image_id not in index.index:
                skipped.append(
                    {"image_id": image_id, "split": name, "reason": "not-indexed", "detail": ""}
                )
                continue
            status = str(index.at[image_id, "status"])
            if status != "ok":
                skipped.append(
                    {"image_id": image_id, "split": name, "reason": status, "detail": "image_index"}
                )
                continue
            keep.append(image_id)
            paths.append(str(index.at[image_id, "path"]))
        table = lab.loc[keep, ["patient_id", *FINDINGS]].reset_index()
        table["patient_id"] = table["patient_id"].astype(np.int64)
        table[list(FINDINGS)] = table[list(FINDINGS)].astype(np.int8)
        table["image_id"] = table["image_id"].astype(str)
        plans.append(
            SplitPlan(name=name, table=table[TABLE_ID_COLUMNS + list(FINDINGS)], paths=paths)
        )
    return ImageCachePlan(
        size=size,
        workers=workers,
        splits=plans,
        skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
        max_image_pixels=max_image_pixels,
    )


class ImageCacheParams(Params):
    """`params:image_cache` (conf/base/parameters_augmentation.yml)."""

    # side of the square cached images, px
    size: int = Field(ge=8)
    # decoding processes; 0 = every CPU core
    workers: int = Field(0, ge=0)


def validate_cache_params(params: Mapping[str, Any] | ImageCacheParams) -> tuple[int, int]:
    """`params:image_cache` → (size, workers); errors name the key."""
    checked = check(ImageCacheParams, params, "image_cache")
    return checked.size, checked.workers


# --------------------------------------------------------------------------------------------
# File-system helpers
# --------------------------------------------------------------------------------------------


def _try_open(path: Path) -> ImageCache | None:
    try:
        return ImageCache(path)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None


def clean_stale_staging(final: Path) -> None:
    """Delete staging/retired folders beside `final` left by a process that is gone (logged
    by `sweep_leftovers`)."""
    sweep_leftovers(final.parent, skip=(final,))


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def _compact(npy: Path, keep: np.ndarray, size: int) -> None:
    """Drop failed rows: rewrite the split without them (rare: the index missed a bad file)."""
    source = np.load(npy, mmap_mode="r")
    tmp = npy.with_suffix(".compact.npy")
    allocate_npy(tmp, len(keep), size)
    out = np.load(tmp, mmap_mode="r+")
    for start in range(0, len(keep), 1024):
        out[start : start + 1024] = source[keep[start : start + 1024]]
    out.flush()
    del out, source
    os.replace(tmp, npy)
