"""The one way this project turns an image file into grey pixels.

Why a shared module: the image index (which checks that files decode), the image cache (which
decodes every image once) and any notebook must agree on what "the grey image" of a file is.
Real NIH files are mostly 8-bit `L`, but a few are `RGBA` with R=G=B and alpha 255, and images
from other sources arrive as 16-bit, palette or grey+alpha PNGs. Converting them in one place
means a model never sees a different picture of the same file depending on who decoded it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

T = TypeVar("T")

# The formats this project reads. The NIH release is PNG only; restricting Pillow to it means a
# file that merely *claims* to be an image (an EPS renamed `.png`) is refused by the PNG parser
# instead of being handed to another plugin (Pillow's EPS plugin runs Ghostscript).
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG",)
# Largest width*height decoded. NIH films are 1024x1024 (~1 M px); 40 M px leaves room for
# other sources' larger films (e.g. 4280x4280 ~ 18 M px) yet refuses a PNG whose header claims
# gigapixels, which Pillow would otherwise try to allocate (a decompression bomb).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The parameter that sets the limit for the image index and cache (named in too-large reasons).
MAX_PIXELS_PARAMETER = "data_processing.images.max_image_pixels"
# Every `image_index.status`; only "ok" rows are used downstream.
IMAGE_STATUSES = ("ok", "missing", "corrupt", "too-large", "not-a-file")
# Pauses (seconds) before the 2nd, 3rd, ... attempt after a transient error: a few attempts
# ride out a flaky network mount or a brief fd shortage without slowing a healthy run at all.
RETRY_DELAYS_S: tuple[float, ...] = (0.05, 0.25)

# Exceptions Pillow raises for bad file *content* (a damaged or non-PNG file): retrying cannot
# help, so they mean "corrupt". OSError without an errno (e.g. "image file is truncated") is
# handled separately, since an OSError *with* an errno is the storage talking, not the file.
_CONTENT_ERRORS = (SyntaxError, ValueError, struct.error, zlib.error, EOFError, IndexError)
# errno values that are a property of the path, not a passing condition of the storage.
_NOT_A_FILE_ERRNOS = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV})


class ImageReadError(Exception):
    """A permanent problem with one image file; `status` is its `image_index.status`.

    Why typed errors: the image index, the image cache and `load_grayscale` must agree on what
    is wrong with a file, and callers record the status instead of parsing messages.
    """

    status = "corrupt"

    def __init__(self, path: str | os.PathLike, reason: str, size: tuple[int, int] | None = None):
        super().__init__(str(path), reason, size)
        self.path = str(path)
        self.reason = reason
        self.size = size  # (width, height) when the header was read

    def __str__(self) -> str:
        return f"{self.path}: {self.status}: {self.reason}"


class MissingImageError(ImageReadError):
    """The file vanished between listing the folder and reading it (ENOENT)."""

    status = "missing"


class CorruptImageError(ImageReadError):
    """The bytes are not a readable image of a supported format."""

    status = "corrupt"


class ImageTooLargeError(ImageReadError):
    """width*height exceeds the pixel limit: refused before any pixel is decompressed."""

    status = "too-large"


class NotAFileError(ImageReadError):
    """The path is a FIFO, device, socket or directory: reading it could block or never end."""

    status = "not-a-file"


class TransientImageError(OSError):
    """Reading failed for a reason of the system (I/O error, permissions, no memory, no fds).

    Not a property of the image, so the image is never recorded as corrupt: the caller stops,
    and the run can simply be repeated once the storage is healthy.
    """

    def __init__(
        self, path: str | os.PathLike, cause: str, code: int | None = None, attempts: int = 1
    ) -> None:
        self.path = str(path)
        self.cause = cause
        self.attempts = attempts
        self.message = (
            f"{self.path}: reading the image failed {attempts} time(s) with a system error "
            f"({cause}). This is a storage or system problem, not a damaged image: the image "
            "was NOT marked corrupt. Repeat the run once the storage is healthy."
        )
        if code is None:
            super().__init__(self.message)
        else:
            super().__init__(code, self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # cross a process pool with its own arguments
        return (type(self), (self.path, self.cause, self.errno, self.attempts))


def _describe_os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    return f"{name}: {exc.strerror or exc}"


def _classify(
    exc: BaseException, path: str, formats: Sequence[str]
) -> ImageReadError | TransientImageError | None:
    """Map a low-level error to a typed one; None for anything else (a bug: re-raise it)."""
    if isinstance(exc, ImageReadError | TransientImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ImageTooLargeError(path, f"{exc} (Pillow's decompression-bomb limit)")
    if isinstance(exc, MemoryError):
        return TransientImageError(path, f"MemoryError: {exc}" if str(exc) else "MemoryError")
    if isinstance(exc, UnidentifiedImageError):
        return CorruptImageError(path, f"not a {'/'.join(formats)} file (unidentified format)")
    if isinstance(exc, OSError):
        if exc.errno is None:
            return CorruptImageError(path, f"{type(exc).__name__}: {exc}")
        if exc.errno == errno.ENOENT:
            return MissingImageError(path, f"the file vanished ({_describe_os_error(exc)})")
        if exc.errno in _NOT_A_FILE_ERRNOS:
            return NotAFileError(path, f"cannot be opened as a file ({_describe_os_error(exc)})")
        return TransientImageError(path, _describe_os_error(exc), exc.errno)
    if isinstance(exc, _CONTENT_ERRORS):
        return CorruptImageError(path, f"{type(exc).__name__}: {exc}")
    return None


@contextmanager
def open_image(
    path: str | os.PathLike,
    formats: Sequence[str] = SUPPORTED_FORMATS,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_PARAMETER,
) -> Iterator[Image.Image]:
    """Open `path` as an image of `formats` whose header is read and within `max_pixels`.

    The one door to image files, shared by the image index, the image cache and
    `load_grayscale`, so all three agree on what is readable:

    * The path is opened once, non-blocking, and `fstat` of that descriptor must be a regular
      file; everything is then read through it. A FIFO or a symlink to `/dev/zero` is refused
      (`NotAFileError`) instead of blocking or reading forever, and a file swapped for one
      after a check cannot slip through (no check-then-open race).
    * Only `formats` are tried, so other Pillow plugins (EPS -> Ghostscript) are never reached.
    * width*height from the header is compared with `max_pixels` before any pixel is
      decompressed (`ImageTooLargeError`).
    * Errors raised here *or in the `with` body* (e.g. `image.load()`) are classified: bad
      content -> `CorruptImageError`, ENOENT -> `MissingImageError`, other OS errors and
      `MemoryError` -> `TransientImageError`; anything else propagates unchanged.

    `limit_name` is the parameter that sets `max_pixels`, named in the too-large reason (the
    image index and the inference pipeline each have their own).
    """
    name = os.fspath(path)
    name = name.decode() if isinstance(name, bytes) else name
    try:
        with open_regular_file(name) as handle:
            head = handle.read(16)  # for the report: b"%!PS-Adobe-3.0 " says what it really is
            try:
                image = Image.open(handle, formats=list(formats))
            except UnidentifiedImageError as exc:
                raise CorruptImageError(
                    name, f"not a {'/'.join(formats)} file (it starts with {head!r})"
                ) from exc
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                # Pillow's own global check fired inside open(), before we saw the size
                raise ImageTooLargeError(
                    name,
                    f"{exc} (refused by Pillow while opening; {limit_name} = {max_pixels:,})",
                ) from exc
            with image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        name,
                        f"{width}x{height} = {width * height:,} pixels exceeds "
                        f"{limit_name} = {max_pixels:,}",
                        (width, height),
                    )
                yield image
    except Exception as exc:
        typed = _classify(exc, name, formats)
        if typed is None or typed is exc:
            raise
        raise typed from exc


@contextmanager
def open_regular_file(name: str) -> Iterator[BinaryIO]:
    """Open `name` for binary reading only if it is a regular file (see `open_image`).

    Opened once, non-blocking, then `fstat` of that descriptor: a FIFO, device or socket is
    refused (`NotAFileError`) without being read, and nothing can be swapped in between a
    check and the open. OS errors of the open itself propagate unclassified (callers classify).
    Shared by `open_image` and the DICOM reader (`rare_cxr.inference.dicom`).
    """
    # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAFileError(name, f"not a regular file ({_file_kind(info.st_mode)})")
        os.set_blocking(fd, True)  # a regular file: plain blocking reads from here on
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def classify_read_error(
    exc: BaseException, path: str, formats: Sequence[str] = SUPPORTED_FORMATS
) -> ImageReadError | TransientImageError | None:
    """Public name of the error classification `open_image` applies (None: not a read error)."""
    return _classify(exc, path, formats)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return f"file type {stat.S_IFMT(mode):o}"


def read_image(
    path: str | os.PathLike,
    use: Callable[[Image.Image], T],
    formats: Sequence[str] = SUPPORTED_FORMATS,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_PARAMETER,
) -> T:
    """`use(image)` on `open_image(path, ...)`, retrying transient errors.

    A transient error (see `TransientImageError`) is retried after each pause in
    `RETRY_DELAYS_S`; if the last attempt still fails it is raised with the attempt count.
    Permanent problems (`ImageReadError`) are raised at once: retrying cannot fix the bytes.
    """
    attempts = len(RETRY_DELAYS_S) + 1
    for attempt in range(1, attempts + 1):
        try:
            with open_image(
                path, formats=formats, max_pixels=max_pixels, limit_name=limit_name
            ) as image:
                return use(image)
        except TransientImageError as exc:
            if attempt == attempts:
                raise TransientImageError(exc.path, exc.cause, exc.errno, attempts) from exc
            time.sleep(RETRY_DELAYS_S[attempt - 1])
    raise AssertionError("unreachable")  # pragma: no cover


# Modes whose pixel values are 16-bit integers (PIL reads 16-bit grey PNGs as "I;16" or "I").
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Return a PIL image as a uint8 H×W array of grey levels.

    * `L`: the pixels as they are.
    * `LA`: the grey channel; alpha is ignored (radiographs carry no transparency).
    * `RGB`/`RGBA`: ITU-R 601 luminance (PIL's `convert("L")`, alpha ignored). PIL's integer
      weights sum to exactly 1, so an image with R=G=B (the RGBA files in NIH) gives back that
      channel bit for bit.
    * `P` (palette) and `1`: through the palette/bit values to luminance.
    * 16-bit (`I;16`, `I`): scaled by a fixed 255/65535 with rounding. A fixed scale, not a
      per-image window, keeps the mapping deterministic and comparable across images.
    * `F` (float): clipped to [0, 255] and rounded.
    """
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "LA":
        return np.asarray(image.getchannel("L"), dtype=np.uint8).copy()
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if mode in {"RGBA", "RGBa", "PA"}:
        image = image.convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def _load_gray(image: Image.Image) -> np.ndarray:
    image.load()
    return to_grayscale(image)


def load_grayscale(
    path: str | os.PathLike,
    formats: Sequence[str] = SUPPORTED_FORMATS,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_PARAMETER,
) -> np.ndarray:
    """Decode an image file to a uint8 H×W grey array (see `to_grayscale` for the rules).

    Reads through `open_image` (regular files of `formats` within `max_pixels` only) with
    `read_image`'s retries, so it refuses exactly what the image index refuses: raises an
    `ImageReadError` subclass for a bad file, `TransientImageError` for a system error.
    """
    return read_image(
        path, _load_gray, formats=formats, max_pixels=max_pixels, limit_name=limit_name
    )
