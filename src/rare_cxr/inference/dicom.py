"""DICOM radiographs -> the uint8 grey pixels a rare-cxr model reads, through pydicom.

Why its own module: hospital images are DICOM, and turning stored values into a picture is a
chain of standard steps (PS3.3 C.11: Modality LUT, then VOI LUT or window, then the
Presentation of MONOCHROME1) that must happen in that order, every time, for every reader.
Each step is pydicom's documented function (`pydicom.pixels.apply_modality_lut`,
`apply_voi_lut`); only the final mapping of the VOI output range to 0..255 is ours, because
pydicom returns values in the DICOM output range and the model wants 8-bit grey.

The steps, in order:

1. Header checks before any pixel is decoded: pixel data present (else `NoPixelDataError`),
   one frame (multi-frame files are `UnsupportedImageError`), one sample per pixel and
   MONOCHROME1/MONOCHROME2, Rows x Columns within the pixel limit (`ImageTooLargeError`), and a
   pixel handler installed for a compressed transfer syntax (pydicom's own JPEG/JPEG 2000/RLE
   handlers through Pillow and numpy; JPEG-LS and others need the optional extra
   `rare-cxr[dicom-compressed]` (pylibjpeg), else the reason names the missing packages).
   Then what the bytes may become (`rare_cxr.inference.dicom_limits`): a deflated dataset is
   inflated only within the budget its header justifies, a file larger than that budget is not
   read, and a compressed frame's own codestream size must be within the limit and equal
   Rows/Columns before a decoder runs.
2. `pixel_array` (BitsStored 12 in BitsAllocated 16 and plain 16-bit are masked/decoded by
   pydicom), then `apply_modality_lut` (RescaleSlope/RescaleIntercept or a Modality LUT).
3. `apply_voi_lut`: the VOI LUT Sequence when present, else WindowCenter/WindowWidth (the first
   window when several are listed). The output range is mapped linearly to [0, 1]: for a
   window it is the range pydicom's `apply_windowing` maps into (the stored-value range after
   the modality transform); for a VOI LUT it is 0..2**(LUT bits) - 1.
   Without any VOI: `without_voi="full_range"` (default) maps the stored-value range after the
   modality transform (0..4095 for 12 bits stored), the DICOM analogue of how a 16-bit PNG is
   read (`rare_cxr.imaging.to_grayscale`, a fixed scale); `"min_max"` stretches each image's
   own minimum..maximum instead.
4. MONOCHROME1 (bright = low values) is inverted, so every image arrives as MONOCHROME2, the
   polarity of the training PNGs; then rounded to uint8.

The view is read from ViewPosition: LL/RL/LAT/LATERAL are flagged as lateral (the models were
trained on frontal PA/AP films); the image is still predicted.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from rare_cxr.imaging import (
    CorruptImageError,
    ImageReadError,
    ImageTooLargeError,
    classify_read_error,
    open_regular_file,
)
from rare_cxr.inference import dicom_limits
from rare_cxr.inference.dicom_limits import (
    ALLOWED_BITS_ALLOCATED,
    BoundedInflater,
    UnsupportedImageError,
    budget_reason,
    byte_budget,
    check_codestream,
)

__all__ = ["DicomImage", "NoPixelDataError", "UnsupportedImageError", "read_dicom"]

# What a DICOM Part 10 file carries after its 128-byte preamble.
DICM_MAGIC = b"DICM"
DICM_OFFSET = 128
# ViewPosition values (upper-cased) of a lateral film.
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
WITHOUT_VOI_MODES = ("full_range", "min_max")
SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
# The optional extra that brings pylibjpeg's decoders (pyproject.toml).
COMPRESSED_EXTRA = "rare-cxr[dicom-compressed]"


class NoPixelDataError(ImageReadError):
    """A DICOM object without an image (a structured report, a dose record...)."""

    status = "no-pixel-data"


@dataclass
class DicomImage:
    """The grey pixels of one DICOM file and what the report needs to know about it."""

    pixels: np.ndarray  # uint8 [rows, columns], MONOCHROME2 polarity
    view_position: str
    sop_instance_uid: str
    photometric: str
    bits_stored: int
    voi: str  # "lut", "window" or the without_voi mode used
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def lateral(self) -> bool:
        return self.view_position in LATERAL_VIEWS


def looks_like_dicom(head: bytes) -> bool:
    """True when `head` (the first 132+ bytes of a file) is a DICOM Part 10 preamble."""
    return head[DICM_OFFSET : DICM_OFFSET + 4] == DICM_MAGIC


def modality_output_range(ds: Any) -> tuple[float, float]:
    """(low, high) of the values after the Modality LUT: what `apply_windowing` maps into.

    The same rule as pydicom's `apply_windowing` (PS3.3 C.11.1.1.1 / C.11.2.1.2): the LUT's
    bit depth for a Modality LUT Sequence, else the range of BitsStored (signed or not) passed
    through RescaleSlope/RescaleIntercept.
    """
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return min(low, high), max(low, high)


def _has_window(ds: Any) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _has_voi_lut(ds: Any) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and None not in (seq[0].get("LUTDescriptor"), seq[0].get("LUTData"))


def to_display_grey(arr: np.ndarray, ds: Any, without_voi: str = "full_range") -> tuple:
    """Stored values -> (uint8 grey in MONOCHROME2 polarity, name of the VOI step used)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if without_voi not in WITHOUT_VOI_MODES:
        raise ValueError(f"without_voi: expected one of {WITHOUT_VOI_MODES}, got {without_voi!r}")
    values = apply_modality_lut(arr, ds)
    if _has_voi_lut(ds):
        if np.issubdtype(values.dtype, np.floating) and np.array_equal(values, np.rint(values)):
            values = values.astype(np.int64)  # a LUT indexes integers (pydicom warns on floats)
        out = apply_voi_lut(values, ds).astype(np.float64)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        voi = "lut"
    elif _has_window(ds):
        out = apply_voi_lut(values, ds).astype(np.float64)
        low, high = modality_output_range(ds)
        voi = "window"
    else:
        out = np.asarray(values, dtype=np.float64)
        if without_voi == "full_range":
            low, high = modality_output_range(ds)
        else:
            low, high = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
        voi = without_voi
    span = high - low
    grey = np.clip((out - low) / span, 0.0, 1.0) if span > 0 else np.zeros_like(out)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        grey = 1.0 - grey
    return np.rint(grey * 255.0).astype(np.uint8), voi


def _check_header(ds: Any, name: str, max_pixels: int, limit_name: str) -> None:
    """Everything that can be refused before a pixel is decoded (see the module doc)."""
    from pydicom.pixels import get_decoder

    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise UnsupportedImageError(
            name, f"multi-frame DICOM ({frames} frames): only single radiographs are read"
        )
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if rows is not None and columns is not None and int(rows) * int(columns) > max_pixels:
        raise ImageTooLargeError(
            name,
            f"{columns}x{rows} = {int(rows) * int(columns):,} pixels exceeds "
            f"{limit_name} = {max_pixels:,}",
            (int(columns), int(rows)),
        )
    if rows is None and columns is None:
        return  # no image module: an object without pixels (told apart after the full read)
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    bits = int(ds.get("BitsAllocated") or 8)
    if bits not in ALLOWED_BITS_ALLOCATED:
        raise UnsupportedImageError(
            name, f"BitsAllocated {bits}: expected one of {ALLOWED_BITS_ALLOCATED}"
        )
    if samples != 1 or photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedImageError(
            name,
            f"PhotometricInterpretation {photometric or '(missing)'} with {samples} sample(s) "
            f"per pixel: only grey {'/'.join(SUPPORTED_PHOTOMETRIC)} radiographs are read",
        )
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise UnsupportedImageError(
                name, f"compressed transfer syntax {syntax.name} ({syntax}): {exc}"
            ) from exc
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "no plugin"
            raise UnsupportedImageError(
                name,
                f"compressed transfer syntax {syntax.name} ({syntax}) and no pixel handler "
                f"installed ({missing}); install the optional extra "
                f"`pip install {COMPRESSED_EXTRA}`",
            )


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Elements larger than this are skipped, not read, while the header is checked.
_HEADER_DEFER = "1 MB"


def _file_meta(handle: BinaryIO) -> Any:
    """The preamble and File Meta group (0002,xxxx), read without touching the dataset (which
    pydicom would inflate in full for a deflated transfer syntax)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble

    read_preamble(handle, False)
    return FileMetaDataset(
        read_dataset(
            handle,
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=lambda tag, vr, length: tag >> 16 != 2,
        )
    )


def _read_deflated(
    handle: BinaryIO, meta: Any, name: str, max_pixels: int, limit_name: str
) -> tuple[Any, Any]:
    """(header, dataset) of a Deflated Explicit VR Little Endian file, inflated through
    `BoundedInflater`: the header within `HEADER_ALLOWANCE_BYTES`, then the rest within the
    budget the header justifies (see `rare_cxr.inference.dicom_limits`)."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset

    allowance = dicom_limits.HEADER_ALLOWANCE_BYTES
    stream = BoundedInflater(
        handle, name, allowance, f"the header allowance of {allowance:,} bytes before the pixels"
    )
    header = read_dataset(stream, False, True, stop_when=_at_pixel_data)
    header.file_meta = meta
    _check_header(header, name, max_pixels, limit_name)
    stream.limit, stream.why = byte_budget(header, False), budget_reason(header, False)
    stream.seek(0)
    dataset = read_dataset(stream, False, True)
    ds = FileDataset(name, dataset, None, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return header, ds


def _read_bounded(handle: BinaryIO, name: str, max_pixels: int, limit_name: str) -> tuple[Any, Any]:
    """(header, dataset) of a DICOM file, after every check that needs no pixel: the header
    (`_check_header`), the bytes the file may hold, a compressed frame's own size."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = _file_meta(handle)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        header, ds = _read_deflated(handle, meta, name, max_pixels, limit_name)
    else:
        handle.seek(0)
        header = pydicom.dcmread(handle, stop_before_pixels=True, defer_size=_HEADER_DEFER)
        _check_header(header, name, max_pixels, limit_name)
        syntax = getattr(header.file_meta, "TransferSyntaxUID", None)
        encapsulated = bool(syntax is not None and syntax.is_compressed)
        size = os.fstat(handle.fileno()).st_size
        if size > byte_budget(header, encapsulated):
            raise ImageTooLargeError(
                name,
                f"the file is {size:,} bytes, more than {budget_reason(header, encapsulated)} "
                "justify; refused before reading it",
            )
        handle.seek(0)
        # from memory: an element's declared length can then never make a read allocate more
        # than the file (checked above) holds
        ds = pydicom.dcmread(io.BytesIO(handle.read(size)))
    syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed and "PixelData" in ds and "Rows" in ds:
        check_codestream(ds, name, max_pixels, limit_name)
    return header, ds


def read_dicom(
    path: str | os.PathLike,
    max_pixels: int,
    without_voi: str = "full_range",
    limit_name: str = "inference.max_image_pixels",
) -> DicomImage:
    """Read one DICOM file (see the module doc for every step and refusal).

    Raises an `ImageReadError` subclass with a reason for a file that is not usable
    (`status`: corrupt, too-large, unsupported, no-pixel-data, not-a-file, missing), or
    `TransientImageError` for a system error (an I/O error, not a property of the file).
    """
    from pydicom.errors import InvalidDicomError

    name = os.fspath(path)
    try:
        with open_regular_file(name) as handle:
            try:
                _, ds = _read_bounded(handle, name, max_pixels, limit_name)
            except InvalidDicomError as exc:
                raise CorruptImageError(name, f"not a readable DICOM file: {exc}") from exc
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                modality = ds.get("Modality", "?")
                sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "?"))
                raise NoPixelDataError(
                    name, f"DICOM object without pixel data (Modality {modality}, SOP class {sop})"
                )
            try:
                arr = ds.pixel_array
            except (RuntimeError, NotImplementedError) as exc:
                raise UnsupportedImageError(
                    name, f"pixel data could not be decoded by pydicom's handlers: {exc}"
                ) from exc
            if arr.ndim != 2:
                raise UnsupportedImageError(
                    name, f"pixel array of shape {arr.shape}: expected one grey frame"
                )
            try:
                pixels, voi = to_display_grey(arr, ds, without_voi)
            except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
                raise CorruptImageError(
                    name, f"invalid LUT/window values ({type(exc).__name__}: {exc})"
                ) from exc
    except ImageReadError:
        raise
    except Exception as exc:
        typed = classify_read_error(exc, name, ("DICOM",))
        if typed is exc:  # already a TransientImageError
            raise
        if typed is None:
            # pydicom raises many exception types for damaged files (struct, value, key...)
            raise CorruptImageError(name, f"{type(exc).__name__}: {exc}") from exc
        raise typed from exc
    return DicomImage(
        pixels=pixels,
        view_position=str(ds.get("ViewPosition", "") or "").strip().upper(),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        photometric=str(ds.PhotometricInterpretation).strip(),
        bits_stored=int(ds.get("BitsStored") or 0),
        voi=voi,
        details={
            "rescale": [float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))],
            "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
        },
    )
