"""DICOM -> model pixels (`rare_cxr.inference.dicom`), on files built here with pydicom.

Expected grey values are computed in the tests from the DICOM standard's formulas (PS3.3
C.11.2.1.2.1, linear window), independently of pydicom's implementation.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from rare_cxr.imaging import CorruptImageError, ImageTooLargeError
from rare_cxr.inference.dicom import (
    NoPixelDataError,
    UnsupportedImageError,
    read_dicom,
)

LIMIT = 10_000_000


def make_dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    **elements: object,
) -> Path:
    """A DICOM Part 10 file with `pixels` (2-D, or 3-D for several frames) and `elements`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) as a fraction of the output range, in [0, 1]."""
    c, w = center - 0.5, width - 1.0
    frac = (values.astype(np.float64) - c) / w + 0.5
    return np.clip(frac, 0.0, 1.0)


def grey(frac: np.ndarray) -> np.ndarray:
    return np.rint(frac * 255.0).astype(np.uint8)


def ramp(shape=(24, 20), top=65535, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, top + 1, size=shape).astype(np.uint16)


def test_monochrome2_16_bit_with_a_voi_window(tmp_path):
    stored = ramp()
    path = make_dicom(
        tmp_path / "m2.dcm", stored, WindowCenter=30000, WindowWidth=20000, ViewPosition="PA"
    )
    image = read_dicom(path, LIMIT)
    assert image.voi == "window" and image.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(image.pixels, grey(linear_window(stored, 30000, 20000)))
    assert image.pixels.min() == 0 and image.pixels.max() == 255  # the window clips
    assert not image.lateral


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    stored = ramp(seed=1)
    path = make_dicom(
        tmp_path / "m1.dcm", stored, "MONOCHROME1", WindowCenter=32768, WindowWidth=65536
    )
    image = read_dicom(path, LIMIT)
    np.testing.assert_array_equal(image.pixels, grey(1.0 - linear_window(stored, 32768, 65536)))
    # bright in MONOCHROME1 = low stored values: the darkest stored pixel is the brightest grey
    assert image.pixels.flat[np.argmin(stored)] == image.pixels.max()


def test_12_bits_stored_in_16_use_the_12_bit_range_and_ignore_the_high_bits(tmp_path):
    stored = ramp(top=4095, seed=2)
    stored.flat[:2] = [0, 4095]
    path = make_dicom(tmp_path / "b12.dcm", stored, bits_stored=12)
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    # garbage in the 4 unused high bits (overlays, old scanners) must not change the image
    ds.PixelData = (stored | 0xF000).astype("<u2").tobytes()
    ds.save_as(path)
    image = read_dicom(path, LIMIT)
    assert image.voi == "full_range" and image.bits_stored == 12
    np.testing.assert_array_equal(image.pixels, grey(stored / 4095.0))
    stretched = read_dicom(path, LIMIT, without_voi="min_max")
    lo, hi = stored.min(), stored.max()
    np.testing.assert_array_equal(stretched.pixels, grey((stored - lo) / (hi - lo)))


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    stored = ramp(top=4095, seed=3)
    # CT-like: value = 2 * stored - 1000; the window is given in those units
    path = make_dicom(
        tmp_path / "rescale.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=500,
        WindowWidth=3000,
    )
    image = read_dicom(path, LIMIT)
    expected = grey(linear_window(2.0 * stored - 1000.0, 500, 3000))
    np.testing.assert_array_equal(image.pixels, expected)
    # without the window, the rescaled 12-bit range [-1000, 7190] maps to 0..255
    no_window = make_dicom(
        tmp_path / "rescale_only.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
    )
    plain = read_dicom(no_window, LIMIT)
    np.testing.assert_array_equal(plain.pixels, grey(stored / 4095.0))


def test_lateral_views_are_flagged(tmp_path):
    for view, lateral in (("LL", True), ("LAT", True), ("RL", True), ("AP", False)):
        path = make_dicom(tmp_path / f"{view}.dcm", ramp(), ViewPosition=view)
        assert read_dicom(path, LIMIT).lateral is lateral, view


def test_a_jpeg_compressed_dicom_goes_through_pydicoms_pixel_handler(tmp_path):
    """JPEG Baseline is decoded by pydicom's Pillow plugin (no extra needed)."""
    source = (np.add.outer(np.arange(32), np.arange(32)) * 4).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="JPEG", quality=95)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = source.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    image = read_dicom(tmp_path / "jpeg.dcm", LIMIT)
    assert image.details["transfer_syntax"] == JPEGBaseline8Bit
    assert np.abs(image.pixels.astype(int) - source).max() <= 8  # lossy, but the same image


def test_a_compression_without_an_installed_handler_is_unsupported_with_the_fix(tmp_path):
    path = make_dicom(tmp_path / "ls.dcm", ramp())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedImageError, match=r"JPEG-LS.*rare-cxr\[dicom-compressed\]"):
        read_dicom(path, LIMIT)


def test_refusals_before_decoding(tmp_path):
    frames = np.stack([ramp(), ramp(seed=5)])
    with pytest.raises(UnsupportedImageError, match="multi-frame DICOM \\(2 frames\\)"):
        read_dicom(make_dicom(tmp_path / "cine.dcm", frames), LIMIT)
    with pytest.raises(ImageTooLargeError, match="20x24 = 480 pixels exceeds inference.max"):
        read_dicom(make_dicom(tmp_path / "big.dcm", ramp()), 479)
    rgb = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(UnsupportedImageError, match="PhotometricInterpretation RGB"):
        read_dicom(make_dicom(tmp_path / "rgb.dcm", rgb, "RGB", 8), LIMIT)
    report = make_dicom(tmp_path / "sr.dcm", None, Modality="SR")
    with pytest.raises(NoPixelDataError, match="without pixel data \\(Modality SR"):
        read_dicom(report, LIMIT)


def test_damaged_files_are_corrupt_not_crashes(tmp_path):
    path = make_dicom(tmp_path / "cut.dcm", ramp(shape=(64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])  # pixel data cut short
    with pytest.raises(CorruptImageError):
        read_dicom(path, LIMIT)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(CorruptImageError):
        read_dicom(fake, LIMIT)


# --------------------------------------------------------------------- decompression bombs
#
# Each hostile file declares a 16 x 16 image (256 pixels, far within any limit) but holds far
# more: the reader must refuse it before inflating or decoding the excess. The proof is the
# same everywhere: pydicom's pixel decoding (`Dataset.convert_pixel_data`), Pillow's decoders
# (`ImageFile.load`) and pydicom's RLE decoder are replaced by functions that fail the test if
# called, and where the excess would be allocated by Python (zlib, RLE), tracemalloc's peak
# stays a small fraction of it.

BOMB_SIDE = 8000  # what the crafted codestreams declare: 64 M pixels


@pytest.fixture
def no_decoding(monkeypatch):
    from PIL import ImageFile
    from pydicom.dataset import Dataset as _Dataset
    from pydicom.pixels.decoders import rle

    def refuse(*args, **kwargs):
        raise AssertionError("pixel data of a refused file was decoded")

    monkeypatch.setattr(_Dataset, "convert_pixel_data", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(rle, "_rle_decode_segment", refuse)


def peak_bytes(read):
    """(result or exception, tracemalloc peak) of `read()`."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            outcome = read()
        except Exception as exc:  # the refusal under test
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _element(group: int, element: int, vr: bytes, length: int) -> bytes:
    """Explicit VR Little Endian header of an OB/OW/UN element (4-byte length)."""
    import struct

    return struct.pack("<HH2sHI", group, element, vr, 0, length)


def deflated_dicom(path: Path, extra: int = 0, where: str = "after") -> Path:
    """A Deflated Explicit VR Little Endian file of a 16 x 16 image; with `extra` zero bytes in
    a private element before the pixels (`where="before"`) or in trailing padding after them
    (`"after"`), deflated in 1 MiB steps so that the test never holds them."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    plain = make_dicom(path, pixels, bits_stored=8, WindowCenter=128, WindowWidth=256)
    ds = pydicom.dcmread(plain)
    block = ds.private_block(0x0009, "RARE-CXR TEST", create=True)
    block.add_new(0x10, "OB", b"MARK")  # placeholder: (0009,1010) OB, 4 bytes
    placeholder = _element(0x0009, 0x1010, b"OB", 4) + b"MARK"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    raw = out.getvalue()
    body = raw[132 + 12 + int.from_bytes(raw[140:144], "little") :]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    prefix = out.getvalue()[: 132 + 12 + int.from_bytes(out.getvalue()[140:144], "little")]
    head, tail = body.split(placeholder)
    if where == "before":
        head += _element(0x0009, 0x1010, b"OB", extra)
    else:
        head, tail = head + placeholder + tail + _element(0xFFFC, 0xFFFC, b"OB", extra), b""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [prefix, deflate.compress(head)]
    step = bytes(2**20)
    for start in range(0, extra, len(step)):
        chunks.append(deflate.compress(step[: min(len(step), extra - start)]))
    chunks += [deflate.compress(tail), deflate.flush()]
    path.write_bytes(b"".join(chunks))
    return path


def encapsulated_dicom(
    path: Path, fragment: bytes, syntax, rows: int = 16, columns: int = 16, *, bits: int = 8
) -> Path:
    """A DICOM whose PixelData is `fragment` under the compressed transfer syntax `syntax`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_declaring(width: int, height: int) -> bytes:
    """An 8 x 8 JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    import struct

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def j2k_declaring(width: int, height: int, jp2: bool = False) -> bytes:
    """An 8 x 8 JPEG 2000 (codestream, or JP2 file) whose SIZ marker declares width x height."""
    import struct

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(buffer, format="JPEG2000", no_jp2=not jp2)
    data = bytearray(buffer.getvalue())
    siz = data.index(b"\xff\x4f\xff\x51")
    data[siz + 8 : siz + 16] = struct.pack(">II", width, height)
    if jp2:  # the JP2 header box too (what Pillow reports; OpenJPEG decodes the SIZ size)
        ihdr = data.index(b"ihdr")
        data[ihdr + 4 : ihdr + 12] = struct.pack(">II", height, width)
    return bytes(data)


def test_a_deflated_bomb_is_refused_while_inflating_both_before_and_after_the_pixels(
    tmp_path, monkeypatch, no_decoding
):
    from rare_cxr.inference import dicom_limits

    monkeypatch.setattr(dicom_limits, "HEADER_ALLOWANCE_BYTES", 2**20)
    bomb = 32 * 2**20  # inflates to 32 MiB; the file is a few kB
    for where in ("before", "after"):
        path = deflated_dicom(tmp_path / f"{where}.dcm", bomb, where)
        assert path.stat().st_size < 100_000
        outcome, peak = peak_bytes(lambda path=path: read_dicom(path, LIMIT))
        assert isinstance(outcome, ImageTooLargeError), (where, outcome)
        assert "deflated dataset inflates beyond" in outcome.reason
        assert peak < 8 * 2**20, (where, peak)  # a quarter of what it would inflate to
    assert "header allowance of 1,048,576 bytes before the pixels" in str(
        read_dicom_error(tmp_path / "before.dcm")
    )
    assert "256 bytes of pixels (Rows 16 x Columns 16" in str(
        read_dicom_error(tmp_path / "after.dcm")
    )


def read_dicom_error(path: Path) -> Exception:
    with pytest.raises(ImageTooLargeError) as caught:
        read_dicom(path, LIMIT)
    return caught.value


def test_a_small_deflated_dicom_still_reads(tmp_path):
    path = deflated_dicom(tmp_path / "fine.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_deflated
    image = read_dicom(path, LIMIT)
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(image.pixels, grey(linear_window(expected, 128, 256)))


@pytest.mark.parametrize(
    ("syntax", "fragment"),
    [
        (JPEGBaseline8Bit, jpeg_declaring(BOMB_SIDE, BOMB_SIDE)),
        (JPEGExtended12Bit, jpeg_declaring(BOMB_SIDE, BOMB_SIDE)),
        (JPEG2000Lossless, j2k_declaring(BOMB_SIDE, BOMB_SIDE)),
        (JPEG2000, j2k_declaring(BOMB_SIDE, BOMB_SIDE, jp2=True)),
    ],
    ids=["jpeg-baseline", "jpeg-extended", "j2k-codestream", "j2k-jp2-file"],
)
def test_an_encapsulated_codestream_larger_than_declared_is_never_decoded(
    tmp_path, syntax, fragment, no_decoding
):
    # what Pillow (pydicom's decoder here) would allocate for it: 64 M pixels
    with Image.open(io.BytesIO(fragment)) as unrestricted:
        assert unrestricted.size == (BOMB_SIDE, BOMB_SIDE)
    path = encapsulated_dicom(tmp_path / "bomb.dcm", fragment, syntax)
    assert path.stat().st_size < 2_000
    with pytest.raises(ImageTooLargeError, match=r"codestream declares 8000x8000 = 64,000,000"):
        read_dicom(path, LIMIT)
    # within the limit but not the declared 16 x 16: corrupt, still not decoded
    small = encapsulated_dicom(tmp_path / "other.dcm", fragment, syntax, rows=16, columns=16)
    with pytest.raises(CorruptImageError, match=r"codestream is 8000x8000.*Columns x Rows = 16x16"):
        read_dicom(small, 100_000_000)


def test_an_rle_bomb_is_refused_without_decoding_a_segment(tmp_path, no_decoding):
    import struct

    from pydicom.uid import RLELossless

    runs = 200_000  # each (0x81, byte) run decodes to 128 bytes: 25.6 MB from 400 kB
    segment = b"\x81\x07" * runs
    fragment = struct.pack("<16I", 1, 64, *([0] * 14)) + segment
    path = encapsulated_dicom(tmp_path / "rle.dcm", fragment, RLELossless)
    outcome, peak = peak_bytes(lambda: read_dicom(path, LIMIT))
    assert isinstance(outcome, ImageTooLargeError), outcome
    assert "RLE segment 1 decodes to more than" in outcome.reason
    assert "Rows x Columns = 256 bytes per segment" in outcome.reason
    assert peak < 4 * 2**20  # the file's bytes (a few copies), not the 25.6 MB it decodes to


def test_a_file_larger_than_its_image_justifies_is_not_read(tmp_path, monkeypatch, no_decoding):
    from rare_cxr.inference import dicom_limits

    monkeypatch.setattr(dicom_limits, "HEADER_ALLOWANCE_BYTES", 64 * 2**10)
    path = make_dicom(tmp_path / "padded.dcm", ramp(shape=(16, 16)))
    with path.open("ab") as handle:  # trailing padding of 1 MiB after a 512-byte image
        handle.write(_element(0xFFFC, 0xFFFC, b"OB", 2**20) + bytes(2**20))
    with pytest.raises(ImageTooLargeError, match=r"the file is 1,04\d,\d+ bytes, more than 512"):
        read_dicom(path, LIMIT)


def test_compressed_dicoms_within_their_declared_size_decode(tmp_path):
    """The checks refuse nothing valid: RLE (pydicom's encoder) and JPEG 2000 (Pillow's)."""
    from pydicom.uid import RLELossless

    stored = ramp(shape=(24, 20), top=4095, seed=9)
    path = make_dicom(tmp_path / "rle.dcm", stored, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path)
    image = read_dicom(path, LIMIT)
    assert image.details["transfer_syntax"] == RLELossless
    np.testing.assert_array_equal(image.pixels, grey(stored / 4095.0))

    source = (np.add.outer(np.arange(24), np.arange(20)) * 5).astype(np.uint8)
    for jp2 in (False, True):
        buffer = io.BytesIO()
        Image.fromarray(source).save(buffer, format="JPEG2000", no_jp2=not jp2)
        j2k = encapsulated_dicom(
            tmp_path / f"j2k{jp2}.dcm", buffer.getvalue(), JPEG2000Lossless, 24, 20
        )
        np.testing.assert_array_equal(read_dicom(j2k, LIMIT).pixels, source)
