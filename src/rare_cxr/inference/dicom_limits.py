"""How many bytes a DICOM file may read, inflate and decode to, checked before it happens.

Why its own module: `Rows x Columns` within the pixel limit does not bound what pydicom
allocates. A file can carry far more than its declared image:

* **Deflated Explicit VR Little Endian** (1.2.840.10008.1.2.1.99): pydicom inflates the whole
  dataset with one `zlib.decompress` before reading any element, so a 600 KB file of deflated
  zeros becomes gigabytes before a header check can run. `BoundedInflater` inflates on demand,
  with `zlib.decompressobj(...).decompress(data, max_length)`, and stops with `too-large` once
  the inflated size passes what the header justifies (`byte_budget`).
* **Encapsulated pixel data** (JPEG, JPEG-LS, JPEG 2000, RLE): the codec decodes the size its
  own codestream declares (a JPEG's SOF marker, a JPEG 2000 SIZ marker, the RLE runs), whatever
  Rows/Columns say. `check_codestream` reads that size from the bytes (no decoder runs) and
  refuses a codestream larger than the pixel limit (`too-large`) or different from
  Rows/Columns (`corrupt`) before pydicom's decoders see it. A syntax whose codestream size
  cannot be read here is refused (`unsupported`): never decoded unchecked.
* **Any file**: its size on disk is compared with the same budget before the full read, so a
  header that declares 16 x 16 pixels cannot bring gigabytes of other elements into memory.

The budget is `Rows x Columns x SamplesPerPixel x ceil(BitsAllocated / 8) x frames` (the
native pixel bytes), times `ENCAPSULATED_FACTOR` for compressed pixel data (a codestream of
noise can exceed the raw size a little), plus `HEADER_ALLOWANCE_BYTES` for every other element.
Hand-written parsers (a few dozen lines of marker walking) because no installed library reads
a codestream's size without decoding it: Pillow's `Image.open` would, but only for JPEG and
JPEG 2000 and through the very plugin an unchecked stream must not reach.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, BinaryIO

from rare_cxr.imaging import CorruptImageError, ImageReadError, ImageTooLargeError

# Room for every element that is not pixel data (patient/study modules, private tags, icons).
# Real radiographs carry tens of kilobytes; 16 MiB also admits large private blocks.
HEADER_ALLOWANCE_BYTES = 16 * 2**20
# A compressed frame may exceed the raw pixel bytes (a lossless codestream of noise).
ENCAPSULATED_FACTOR = 2
# Bytes of compressed input fed to zlib per step, and the most it may inflate to per step.
_CHUNK = 64 * 2**10
_OUT_CHUNK = 2**20
# Bits allocated per sample that DICOM allows for images pydicom decodes.
ALLOWED_BITS_ALLOCATED = (1, 8, 16, 32, 64)

# JPEG start-of-frame markers (ITU T.81 B.1.1.3: SOF0..SOF15 except DHT C4, JPG C8, DAC CC)
# and JPEG-LS's SOF55 (ITU T.87): each is followed by length, precision, height, width, Nf.
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE})
_JPEG_SOF = _JPEG_SOF | {0xCF, 0xF7}
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0..7
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


def expected_pixel_bytes(ds: Any) -> int:
    """The native size of the image the header declares (0 when it declares none)."""
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    frames = int(ds.get("NumberOfFrames") or 1)
    return rows * columns * samples * -(-bits // 8) * max(frames, 1)


def byte_budget(ds: Any, encapsulated: bool) -> int:
    """The most bytes a file (or its inflated dataset) with this header may hold."""
    factor = ENCAPSULATED_FACTOR if encapsulated else 1
    return HEADER_ALLOWANCE_BYTES + factor * expected_pixel_bytes(ds)


def budget_reason(ds: Any, encapsulated: bool) -> str:
    """How `byte_budget` was reached, for the too-large reason."""
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if rows is None or columns is None:
        return f"a header allowance of {HEADER_ALLOWANCE_BYTES:,} bytes (no image declared)"
    factor = f"{ENCAPSULATED_FACTOR} x " if encapsulated else ""
    return (
        f"{factor}{expected_pixel_bytes(ds):,} bytes of pixels (Rows {rows} x Columns {columns}"
        f" x SamplesPerPixel x BitsAllocated/8 x frames) + a header allowance of "
        f"{HEADER_ALLOWANCE_BYTES:,} bytes"
    )


class BoundedInflater(io.RawIOBase):
    """A seekable, read-only view of a raw deflate stream, inflated only as far as it is read.

    `limit` (settable: raised once the header is known) caps the inflated bytes; passing it
    raises `ImageTooLargeError` naming `name` and `why`, before the excess is held in memory
    (at most one step of `_OUT_CHUNK` bytes beyond the limit is ever produced).
    """

    def __init__(self, raw: BinaryIO, name: str, limit: int, why: str) -> None:
        super().__init__()
        self._raw, self.name, self.limit, self.why = raw, name, limit, why
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._data = bytearray()
        self._pos = 0
        self._done = False

    @property
    def inflated(self) -> int:
        """Bytes inflated so far."""
        return len(self._data)

    def _refuse(self) -> None:
        raise ImageTooLargeError(
            self.name,
            f"deflated dataset inflates beyond {self.limit:,} bytes, more than {self.why}; "
            "refused while inflating",
        )

    def _fill(self, upto: int) -> None:
        """Inflate until `upto` bytes are available, the stream ends, or the limit is passed."""
        while len(self._data) < upto and not self._done:
            room = self.limit - len(self._data)
            if room < 0:
                self._refuse()
            tail = self._inflate.unconsumed_tail
            source = tail if tail else self._raw.read(_CHUNK)
            if not source:  # no compressed input left: what zlib still holds, bounded too
                self._data += self._inflate.flush(room + 1)
                self._done = True
            else:
                self._data += self._inflate.decompress(source, min(room + 1, _OUT_CHUNK))
                self._done = self._inflate.eof
            if len(self._data) > self.limit:
                self._refuse()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            self._fill(self.limit + 1)  # the end is only known once everything is inflated
            offset += len(self._data)
        self._pos = max(0, offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self.limit + 1 if size is None or size < 0 else self._pos + size
        self._fill(end)
        out = bytes(self._data[self._pos : end])
        self._pos += len(out)
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class UnsupportedImageError(ImageReadError):
    """A valid file this reader deliberately does not turn into a radiograph (multi-frame,
    colour, no pixel handler for its compression, a codestream whose size cannot be checked)."""

    status = "unsupported"


# ------------------------------------------------------------------ codestream sizes


def jpeg_frame_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG / JPEG-LS codestream's first SOF marker."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("the JPEG codestream does not start with SOI (FFD8)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i} before the frame header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if length < 8 or i + 10 > len(data):
                raise ValueError("truncated JPEG frame header")
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height, data[i + 9]
        i += 2 + length
    raise ValueError("no JPEG frame header (SOF marker) before the first scan")


def j2k_frame_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG 2000 codestream's SIZ marker (bare codestream
    or inside a JP2 file's `jp2c` box)."""
    if data.startswith(_JP2_SIGNATURE):
        i = 0
        while i + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[i : i + 8])
            header = 8
            if length == 1 and i + 16 <= len(data):  # 64-bit box length
                (length,) = struct.unpack(">Q", data[i + 8 : i + 16])
                header = 16
            if kind == b"jp2c":
                return j2k_frame_size(data[i + header :])
            if length < header:  # 0 = to the end of the file; anything else malformed
                break
            i += length
        raise ValueError("no codestream box (jp2c) in the JP2 file")
    if not data.startswith(_J2K_SOC_SIZ):
        raise ValueError("the JPEG 2000 codestream does not start with SOC + SIZ (FF4F FF51)")
    if len(data) < 42:
        raise ValueError("truncated JPEG 2000 SIZ marker")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
    (components,) = struct.unpack(">H", data[40:42])
    return xsiz - xosiz, ysiz - yosiz, components


def rle_segment_length(segment: bytes, stop_after: int) -> int:
    """Bytes the PackBits segment decodes to (PS3.5 G.3.1), counted without decoding; the
    count stops as soon as it passes `stop_after` (a bomb is not walked to its end)."""
    pos, count, end = 0, 0, len(segment)
    while pos < end and count <= stop_after:
        header = segment[pos]
        pos += 1
        if header < 128:  # literal run of header + 1 bytes
            count += min(header + 1, end - pos)
            pos += header + 1
        elif header > 128:  # the next byte, 257 - header times
            count += (257 - header) if pos < end else 0
            pos += 1
    return count


def rle_frame_check(data: bytes, rows: int, columns: int) -> None:
    """Refuse an RLE frame whose segments decode to more than one image plane each."""
    if len(data) < 64:
        raise ValueError("RLE frame shorter than its 64-byte header")
    fields = struct.unpack("<16I", data[:64])
    count, offsets = fields[0], list(fields[1 : 1 + min(fields[0], 15)])
    if not 1 <= count <= 15:
        raise ValueError(f"RLE header declares {count} segments (1..15 allowed)")
    ends = [*offsets[1:], len(data)]
    plane = rows * columns
    allowed = plane + rows  # one padding byte per row at most (some encoders pad rows)
    for k, (start, stop) in enumerate(zip(offsets, ends, strict=True)):
        n = rle_segment_length(data[start:stop], allowed)
        if n > allowed:
            raise _Oversized(
                f"RLE segment {k + 1} decodes to more than {n:,} bytes, but Rows x Columns "
                f"= {plane:,} bytes per segment"
            )


class _Oversized(ValueError):
    """A codestream that decodes to more than the header declares."""


def check_codestream(ds: Any, name: str, max_pixels: int, limit_name: str) -> None:
    """Refuse encapsulated pixel data whose own size is unknown, above the pixel limit or
    different from Rows/Columns (see the module doc); no decoder is called."""
    from pydicom import uid
    from pydicom.encaps import generate_frames

    syntax = ds.file_meta.TransferSyntaxUID
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
        if syntax == uid.RLELossless:
            rle_frame_check(frame, rows, columns)
            return
        if syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
            width, height, components = jpeg_frame_size(frame)
        elif syntax in uid.JPEG2000TransferSyntaxes:
            width, height, components = j2k_frame_size(frame)
        else:
            raise UnsupportedImageError(
                name,
                f"compressed transfer syntax {syntax.name} ({syntax}): the size of its "
                "codestream cannot be checked before decoding, so it is not decoded",
            )
    except _Oversized as exc:
        raise ImageTooLargeError(name, f"{exc}; refused before decoding") from exc
    except (ValueError, struct.error, StopIteration) as exc:
        raise CorruptImageError(name, f"{syntax.name} pixel data: {exc}") from exc
    if width * height > max_pixels:
        raise ImageTooLargeError(
            name,
            f"the {syntax.name} codestream declares {width}x{height} = {width * height:,} "
            f"pixels (Rows/Columns say {columns}x{rows}), more than {limit_name} = "
            f"{max_pixels:,}; refused before decoding",
            (width, height),
        )
    if (width, height, components) != (columns, rows, samples):
        raise CorruptImageError(
            name,
            f"the {syntax.name} codestream is {width}x{height} with {components} component(s), "
            f"but Columns x Rows = {columns}x{rows} with SamplesPerPixel {samples}; not decoded",
        )
