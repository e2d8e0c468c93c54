"""A folder of new images -> one row per file, and the pixels the model was trained on.

Why this module: the model never sees a file, only the image cache's pixels (grey uint8,
square, `input_size` px). Inference must produce exactly those pixels from a PNG, a JPEG or a
DICOM, and must say, for every other file in the folder, why it was not predicted.

* `scan_folder` lists every file under the input folder, recursively, sorted by its name as
  predictions.csv shows it (`rare_cxr.inference.table.printable`: a name that is not UTF-8 or
  holds control characters is shown with `\\xNN` escapes; the file itself is opened by its
  real name). Nothing outside the folder is read: symbolic links whose target lies outside it
  are recorded (`outside-input`) and not followed, and linked folders are recorded
  (`not-followed`) and not entered (a link loop cannot trap the walk).
* `read_for_model` recognises the format by content (PNG and JPEG signatures, the DICOM
  preamble), never by extension, and decodes with the project's readers:
  `rare_cxr.imaging.load_grayscale` (PNG and JPEG; the same grey rules as the image cache) or
  `rare_cxr.inference.dicom.read_dicom`, then `rare_cxr.image_cache.resize_square`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rare_cxr.image_cache import resize_square
from rare_cxr.imaging import (
    RETRY_DELAYS_S,
    ImageReadError,
    TransientImageError,
    classify_read_error,
    load_grayscale,
    open_regular_file,
)
from rare_cxr.inference.dicom import looks_like_dicom, read_dicom
from rare_cxr.inference.table import printable

logger = logging.getLogger(__name__)

# Every value of predictions.csv's `status` column; only "ok" rows carry probabilities.
STATUSES = {
    "ok": "read and predicted (see `flags`, e.g. lateral-view)",
    "not-an-image": "not a PNG, JPEG or DICOM file (recognised by content, not by name)",
    "corrupt": "a damaged or unreadable PNG/JPEG/DICOM (or a codestream whose size disagrees "
    "with its DICOM header)",
    "too-large": "width x height above inference.max_image_pixels, or more bytes than the "
    "declared image justifies (refused before decoding or inflating)",
    "unsupported": "a multi-frame or colour DICOM, or a compression without a pixel handler or "
    "whose decoded size cannot be checked first",
    "no-pixel-data": "a DICOM object without an image",
    "not-a-file": "a FIFO, device or socket (never read)",
    "missing": "vanished while the folder was read, or a broken symbolic link",
    "unreadable": "the system refused to read it (permissions, I/O error) after retries",
    "outside-input": "a symbolic link to a file outside the input folder (not followed)",
    "not-followed": "a symbolic link to a folder (not entered)",
}
FORMATS = ("png", "jpeg", "dicom")
LATERAL_FLAG = "lateral-view"
MAX_PIXELS_PARAMETER = "inference.max_image_pixels"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class InputFile:
    """One entry of the input folder: where it is, and a status if it is not to be read."""

    relpath: str  # POSIX path relative to the input folder, printable (what predictions.csv shows)
    path: str  # what is opened (the file system's name, undecodable bytes included)
    status: str = ""  # set for entries refused without reading (links)
    reason: str = ""


@dataclass
class ReadResult:
    """What reading one file gave: the model's pixels or a status with its reason."""

    status: str
    reason: str = ""
    format: str = ""
    pixels: np.ndarray | None = None  # uint8 [size, size]
    width: int | None = None
    height: int | None = None
    image_id: str = ""
    view_position: str = ""
    flags: list[str] = field(default_factory=list)


def is_inside(path: str, root: str) -> bool:
    """True when the resolved `path` is `root` or lies under it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_folder(input_dir: str | os.PathLike) -> list[InputFile]:
    """Every file under `input_dir`, sorted by relative path (see the module doc).

    Raises FileNotFoundError / NotADirectoryError naming the folder when it is not one.
    """
    root = Path(input_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"inference.input_dir: the input folder {str(root)!r} does not exist "
            f"(resolved from {os.getcwd()!r}); pass an existing folder with "
            "`kedro run --pipelines inference --params input_dir=/path/to/images`"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"inference.input_dir: {str(root)!r} is a file, not a folder of images"
        )
    real_root = os.path.realpath(root)
    entries: list[InputFile] = []

    def relative(full: str) -> str:
        return printable(Path(os.path.relpath(full, root)).as_posix())

    def unreadable_folder(exc: OSError) -> None:
        rel = relative(exc.filename or str(root))
        entries.append(InputFile(rel, str(exc.filename), "unreadable", printable(f"folder: {exc}")))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable_folder):
        dirnames.sort()
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                rel = relative(full)
                target = os.path.realpath(full)
                where = "inside" if is_inside(target, real_root) else "outside"
                entries.append(
                    InputFile(
                        rel,
                        full,
                        "not-followed",
                        f"symbolic link to the folder {printable(target)} ({where} the input "
                        "folder): "
                        "linked folders are not entered",
                    )
                )
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = relative(full)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not is_inside(target, real_root):
                    entries.append(
                        InputFile(
                            rel,
                            full,
                            "outside-input",
                            f"symbolic link to {printable(target)}, outside the input folder: "
                            "not followed",
                        )
                    )
                    continue
                full = target
            entries.append(InputFile(rel, full))
    return sorted(entries, key=lambda e: e.relpath)


def _with_retries(read, path: str):
    """`read()`, retrying system errors as `rare_cxr.imaging.read_image` does."""
    for attempt in range(len(RETRY_DELAYS_S) + 1):
        try:
            return read()
        except TransientImageError as exc:
            if attempt == len(RETRY_DELAYS_S):
                raise TransientImageError(path, exc.cause, exc.errno, attempt + 1) from exc
            time.sleep(RETRY_DELAYS_S[attempt])
    raise AssertionError("unreachable")  # pragma: no cover


def sniff_format(path: str) -> str:
    """'png', 'jpeg', 'dicom' or '' from the first bytes of the file."""

    def head() -> bytes:
        try:
            with open_regular_file(path) as handle:
                return handle.read(132)
        except ImageReadError:
            raise
        except Exception as exc:
            typed = classify_read_error(exc, path)
            if typed is None or typed is exc:
                raise
            raise typed from exc

    start = _with_retries(head, path)
    if start.startswith(_PNG_MAGIC):
        return "png"
    if start.startswith(_JPEG_MAGIC):
        return "jpeg"
    if looks_like_dicom(start):
        return "dicom"
    return ""


def read_for_model(
    entry: InputFile,
    size: int,
    max_pixels: int,
    without_voi: str = "full_range",
) -> ReadResult:
    """Decode one file into the model's pixels, or say why not (never raises for a bad file)."""
    if entry.status:
        return ReadResult(entry.status, entry.reason, image_id=Path(entry.relpath).name)
    image_id, kind = Path(entry.relpath).name, ""
    try:
        kind = sniff_format(entry.path)
        if not kind:
            return ReadResult(
                "not-an-image",
                "not a PNG, JPEG or DICOM file (recognised by content, not by its name)",
                image_id=image_id,
            )
        if kind == "dicom":
            image = _with_retries(
                lambda: read_dicom(entry.path, max_pixels, without_voi, MAX_PIXELS_PARAMETER),
                entry.path,
            )
            grey = image.pixels
            flags = [LATERAL_FLAG] if image.lateral else []
            view = image.view_position
            image_id = image.sop_instance_uid or image_id
        else:
            grey = load_grayscale(
                entry.path,
                formats=("PNG", "JPEG"),
                max_pixels=max_pixels,
                limit_name=MAX_PIXELS_PARAMETER,
            )
            flags, view = [], ""
    except ImageReadError as exc:
        return ReadResult(exc.status, exc.reason, kind, image_id=image_id)
    except TransientImageError as exc:
        return ReadResult("unreadable", exc.message, kind, image_id=image_id)
    except Exception as exc:
        # A decoder failing in a way no reader classifies: one hostile file must not end the
        # run (and leave no predictions.csv); the traceback is logged for a bug report.
        logger.warning("inference: unexpected error reading %s", entry.relpath, exc_info=True)
        return ReadResult(
            "corrupt",
            f"unexpected {type(exc).__name__} while decoding: {exc}",
            kind,
            image_id=image_id,
        )
    height, width = grey.shape
    return ReadResult(
        "ok",
        "",
        kind,
        resize_square(grey, size),
        int(width),
        int(height),
        image_id,
        view,
        flags,
    )
