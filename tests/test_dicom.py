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
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
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
