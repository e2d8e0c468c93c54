"""Hardened image reading: only PNG, a pixel limit, no special files, transient != corrupt.

The image index (`index_images`), the image cache and `load_grayscale` all read through
`rare_cxr.imaging.open_image`; these tests feed each of them the same hostile files and check
that they agree, finish quickly and never start a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from rare_cxr import image_cache as ic
from rare_cxr import imaging
from rare_cxr.findings import FINDINGS
from rare_cxr.image_cache import ImageCache, plan_image_cache
from rare_cxr.imaging import (
    CorruptImageError,
    ImageReadError,
    ImageTooLargeError,
    MissingImageError,
    NotAFileError,
    TransientImageError,
    load_grayscale,
)
from rare_cxr.pipelines.data_processing.nodes import index_images, parse_labels
from rare_cxr.pipelines.data_processing.parsing import InputDataError
from rare_cxr.pipelines.data_processing.validation import ParameterError

LABEL_PARAMS = {"source": "Data_Entry_test.csv", "max_age": 120, "report_examples": 5}
IMAGE_PARAMS = {
    "on_missing": "drop",
    "on_corrupt": "drop",
    "check": "verify",
    "workers": 2,
    "progress": False,
    "report_examples": 5,
}
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)
CACHE_SIZE = 16


# ---------------------------------------------------------------- helpers


def _name(k: int) -> str:
    return f"{k:08d}_000.png"


def _labels(names: list[str]) -> tuple[pd.DataFrame, dict]:
    rows = [f"{n},No Finding,0,{int(n[:8])},58,M,PA,2500,2048,0.168,0.168" for n in names]
    return parse_labels("\n".join([HEADER, *rows]) + "\n", LABEL_PARAMS)


def _index(paths: dict[str, str], **params: object) -> tuple[pd.DataFrame, dict]:
    labels, quality = _labels(sorted(paths))
    return index_images(labels, quality, paths, {**IMAGE_PARAMS, **params})


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grey PNG whose header claims width x height; IDAT is ~20 bytes."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _small_png(path: Path, side: int = 8) -> Path:
    Image.fromarray(np.full((side, side), 100, np.uint8)).save(path)
    return path


def _truncated_png(path: Path, side: int = 32) -> Path:
    """A noisy PNG cut in half: the header is intact, the pixel data ends early."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@contextmanager
def deadline(seconds: int, fifos: list[Path] = ()) -> Iterator[None]:
    """Fail (not hang) if the block takes longer than `seconds`.

    A reader blocked on a FIFO (possibly in a worker thread) is released by opening the FIFO
    for writing and closing it, then the test fails with TimeoutError.
    """

    def expire(signum: int, frame: object) -> None:
        for fifo in fifos:
            with suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        raise TimeoutError(f"image reading took more than {seconds} s (blocked on a file?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any subprocess (Pillow's EPS plugin runs Ghostscript through one) fails the test."""

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"a subprocess was started: {args!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse, raising=False)


def _cache_inputs(paths: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Splits/index/labels that send every file to the cache's decoder (index says ok)."""
    ids = sorted(paths)
    labels = pd.DataFrame(
        [
            {"image_id": i, "patient_id": k + 1, **dict.fromkeys(FINDINGS, 0)}
            for k, i in enumerate(ids)
        ]
    )
    splits = pd.DataFrame({"image_id": ids, "patient_id": range(1, len(ids) + 1), "split": "train"})
    index = pd.DataFrame({"image_id": ids, "path": [paths[i] for i in ids], "status": "ok"})
    return splits, index, labels


# ---------------------------------------------------------------- formats


def test_eps_disguised_as_png_is_corrupt_and_never_runs_ghostscript(tmp_path, no_subprocess):
    eps = tmp_path / _name(1)
    eps.write_bytes(EPS)
    with Image.open(eps) as unrestricted:  # what the old code did: Pillow takes it for EPS
        assert unrestricted.format == "EPS"
    ok = _small_png(tmp_path / _name(2))

    for check in ("header", "verify", "decode"):
        index, report = _index({eps.name: str(eps), ok.name: str(ok)}, check=check)
        assert index["status"].tolist() == ["corrupt", "ok"], check
        example = report["images"]["corrupt"]["examples"][0]
        assert example["image_id"] == eps.name
        assert "not a PNG file" in example["error"] and "%!PS-Adobe" in example["error"]

    with pytest.raises(CorruptImageError, match="not a PNG file"):
        load_grayscale(eps)


# ---------------------------------------------------------------- pixel limit


def test_small_png_above_the_limit_is_too_large(tmp_path):
    path = _small_png(tmp_path / _name(1), side=8)
    index, report = _index({path.name: str(path)}, max_image_pixels=63)
    assert index.loc[0, ["status", "width", "height"]].tolist() == ["too-large", 8, 8]
    section = report["images"]["too-large"]
    assert section["count"] == 1 and section["action"] == "drop"
    assert "8x8 = 64 pixels" in section["examples"][0]["error"]
    assert "data_processing.images.max_image_pixels = 63" in section["examples"][0]["error"]
    assert report["images"]["policy"]["max_image_pixels"] == 63
    index, _ = _index({path.name: str(path)}, max_image_pixels=64)  # the limit is inclusive
    assert index.loc[0, "status"] == "ok"


@pytest.mark.parametrize(
    ("width", "height"),
    [(40000, 40000), (8000, 6000)],  # Pillow's own bomb error; our default 40 M px limit
)
def test_crafted_bomb_header_is_too_large_without_decoding(tmp_path, monkeypatch, width, height):
    path = tmp_path / _name(1)
    path.write_bytes(crafted_png(width, height))
    assert path.stat().st_size < 200

    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels of an over-limit image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    index, report = _index({path.name: str(path)}, check="decode")  # default limit: 40 M px
    assert index.loc[0, "status"] == "too-large"
    assert report["images"]["too-large"]["count"] == 1
    assert report["images"]["corrupt"]["count"] == 0
    with pytest.raises(ImageTooLargeError):
        load_grayscale(path)


def test_pillow_decompression_bomb_warning_counts_as_too_large(tmp_path):
    path = tmp_path / _name(1)
    path.write_bytes(crafted_png(10000, 10000))  # 100 M px: Pillow warns (> ~89 M px)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="decompression bomb"):
            load_grayscale(path, max_pixels=200_000_000)


# ---------------------------------------------------------------- special files


def _special_files(tmp_path: Path) -> dict[str, Path]:
    zero = tmp_path / _name(1)
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / _name(2)
    os.mkfifo(fifo)
    return {"zero": zero, "fifo": fifo}


@pytest.mark.parametrize("check", ["header", "decode"])
def test_device_symlink_and_fifo_are_not_a_file(tmp_path, check):
    files = _special_files(tmp_path)
    ok = _small_png(tmp_path / _name(3))
    paths = {p.name: str(p) for p in [*files.values(), ok]}
    with deadline(20, [files["fifo"]]):
        index, report = _index(paths, check=check)
        for path in files.values():
            with pytest.raises(NotAFileError, match="not a regular file"):
                load_grayscale(path)
    assert index["status"].tolist() == ["not-a-file", "not-a-file", "ok"]
    section = report["images"]["not-a-file"]
    assert section["count"] == 2
    errors = [e["error"] for e in section["examples"]]
    assert any("character device" in e for e in errors) and any("FIFO" in e for e in errors)
    assert report["images"]["corrupt"]["count"] == 0


def test_on_corrupt_error_covers_every_unreadable_status(tmp_path):
    files = _special_files(tmp_path)
    big = _small_png(tmp_path / _name(3), side=8)
    paths = {p.name: str(p) for p in [*files.values(), big]}
    with (
        deadline(20, [files["fifo"]]),
        pytest.raises(InputDataError, match=r"too-large: 1") as info,
    ):
        _index(paths, on_corrupt="error", max_image_pixels=10)
    assert "not-a-file: 2" in str(info.value) and "on_corrupt" in str(info.value)


def test_max_image_pixels_is_validated():
    labels, quality = _labels([_name(1)])
    for bad in (0, -5, "40000000", 1.5, True):
        with pytest.raises(ParameterError, match=r"data_processing\.images\.max_image_pixels"):
            index_images(labels, quality, {}, {**IMAGE_PARAMS, "max_image_pixels": bad})


# ---------------------------------------------------------------- transient errors


@pytest.fixture
def failing_open(monkeypatch: pytest.MonkeyPatch):
    """`fail(path, errno, times)`: the next `times` os.open calls on `path` raise that errno."""
    real_open = os.open
    state: dict[str, object] = {"path": None, "code": 0, "left": 0, "calls": 0}

    def fake_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202 - os.open's signature
        if os.fspath(path) == state["path"]:
            state["calls"] = int(state["calls"]) + 1
            if int(state["left"]) > 0:
                state["left"] = int(state["left"]) - 1
                raise OSError(state["code"], os.strerror(int(state["code"])), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(imaging.os, "open", fake_open)
    monkeypatch.setattr(imaging, "RETRY_DELAYS_S", (0.01, 0.01))

    def fail(path: Path, code: int, times: int = 10**6) -> dict[str, object]:
        state.update(path=str(path), code=code, left=times, calls=0)
        return state

    return fail


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.EMFILE])
def test_transient_error_stops_the_index_naming_the_file(tmp_path, failing_open, code):
    good = _small_png(tmp_path / _name(1))
    flaky = _small_png(tmp_path / _name(2))
    state = failing_open(flaky, code)
    with pytest.raises(TransientImageError) as info:
        _index({good.name: str(good), flaky.name: str(flaky)})
    message = str(info.value)
    assert str(flaky) in message
    assert errno.errorcode[code] in message and os.strerror(code) in message
    assert "NOT marked corrupt" in message and "Repeat the run" in message
    assert info.value.errno == code and isinstance(info.value, OSError)
    assert state["calls"] == 3  # retried, then gave up


def test_transient_error_then_success_is_ok(tmp_path, failing_open):
    flaky = _small_png(tmp_path / _name(1))
    state = failing_open(flaky, errno.EIO, times=1)
    index, report = _index({flaky.name: str(flaky)}, check="decode")
    assert index.loc[0, "status"] == "ok"
    assert state["calls"] == 2
    assert report["images"]["corrupt"]["count"] == 0


def test_eio_while_decoding_and_memory_error_are_transient(tmp_path, monkeypatch):
    path = _small_png(tmp_path / _name(1))
    monkeypatch.setattr(imaging, "RETRY_DELAYS_S", (0.0, 0.0))
    for error in (OSError(errno.EIO, "Input/output error"), MemoryError()):

        def broken(self: ImageFile.ImageFile, error: BaseException = error) -> None:
            raise error

        monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
        with pytest.raises(TransientImageError, match="NOT marked corrupt"):
            _index({path.name: str(path)}, check="decode")
        with pytest.raises(TransientImageError):
            load_grayscale(path)
    # a truncated file (OSError without errno) stays a content error: corrupt, no retry
    monkeypatch.undo()
    truncated = _truncated_png(tmp_path / _name(2))
    with pytest.raises(CorruptImageError, match="truncated"):
        load_grayscale(truncated)


def test_file_vanished_after_listing_is_missing(tmp_path):
    gone = tmp_path / _name(1)  # listed by the folder, deleted before it was read
    index, report = _index({gone.name: str(gone)})
    assert index.loc[0, "status"] == "missing"
    assert report["images"]["missing"]["examples"] == [gone.name]
    with pytest.raises(MissingImageError, match="vanished"):
        load_grayscale(gone)


def test_transient_error_pickles_across_processes():
    import pickle

    error = TransientImageError("/x/a.png", "EIO: Input/output error", errno.EIO, 3)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is TransientImageError and again.errno == errno.EIO
    assert str(again) == str(error) and again.attempts == 3


# ---------------------------------------------------------------- image cache


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_transient_error_aborts_build_and_keeps_old_cache(tmp_path, failing_open, workers):
    paths = {p.name: str(p) for p in (_small_png(tmp_path / _name(k)) for k in (1, 2, 3))}
    inputs = _cache_inputs(paths)
    target = tmp_path / "cache"
    old = plan_image_cache(*inputs, size=CACHE_SIZE, workers=1).build(target)
    before_meta = (target / "meta.json").read_text()
    before_pixels = np.array(old.split("train").images)

    failing_open(Path(paths[_name(2)]), errno.EIO)  # in forked workers too
    with pytest.raises(TransientImageError, match=_name(2)):
        plan_image_cache(*inputs, size=CACHE_SIZE // 2, workers=workers).build(target)
    assert (target / "meta.json").read_text() == before_meta
    np.testing.assert_array_equal(ImageCache(target).split("train").images, before_pixels)
    assert ImageCache(target).skipped.empty
    assert not list(tmp_path.glob("cache.*"))  # staging folder cleaned up

    fresh = tmp_path / "fresh"
    with pytest.raises(TransientImageError):
        plan_image_cache(*inputs, size=CACHE_SIZE, workers=workers).build(fresh)
    assert not fresh.exists() and not list(tmp_path.glob("fresh.*"))


def test_cache_transient_error_then_success_is_cached_not_skipped(tmp_path, failing_open):
    paths = {p.name: str(p) for p in (_small_png(tmp_path / _name(k)) for k in (1, 2))}
    failing_open(Path(paths[_name(2)]), errno.EIO, times=2)
    cache = plan_image_cache(*_cache_inputs(paths), size=CACHE_SIZE, workers=1).build(
        tmp_path / "cache"
    )
    assert cache.split("train").image_ids == [_name(1), _name(2)]
    assert cache.skipped.empty


# ---------------------------------------------------------------- the three paths agree


def test_index_cache_and_load_grayscale_agree(tmp_path, no_subprocess):
    files = _special_files(tmp_path)  # 1: /dev/zero symlink, 2: FIFO
    (tmp_path / _name(3)).write_bytes(EPS)
    (tmp_path / _name(4)).write_bytes(crafted_png(8000, 6000))
    _truncated_png(tmp_path / _name(5), side=8)
    _small_png(tmp_path / _name(6), side=12)  # 144 px: over the 100 px limit used below
    ok = _small_png(tmp_path / _name(7), side=8)
    # _name(8) is listed but does not exist (vanished after listing)
    paths = {_name(k): str(tmp_path / _name(k)) for k in range(1, 9)}
    expected = {
        _name(1): "not-a-file",
        _name(2): "not-a-file",
        _name(3): "corrupt",
        _name(4): "too-large",
        _name(5): "corrupt",
        _name(6): "too-large",
        _name(7): "ok",
        _name(8): "missing",
    }
    limit = 100
    with deadline(30, [files["fifo"]]):
        index, _ = _index(paths, check="decode", max_image_pixels=limit)
        from_loader = {}
        for name, path in paths.items():
            try:
                load_grayscale(path, max_pixels=limit)
                from_loader[name] = "ok"
            except ImageReadError as exc:
                from_loader[name] = exc.status
        cache = plan_image_cache(
            *_cache_inputs(paths), size=CACHE_SIZE, workers=1, max_image_pixels=limit
        ).build(tmp_path / "cache")
    assert dict(zip(index["image_id"], index["status"], strict=True)) == expected
    assert from_loader == expected
    skipped = dict(zip(cache.skipped["image_id"], cache.skipped["reason"], strict=True))
    assert skipped == {k: v for k, v in expected.items() if v != "ok"}
    assert cache.split("train").image_ids == [ok.name]
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["skipped"] == {"not-a-file": 2, "corrupt": 2, "too-large": 2, "missing": 1}


def test_cache_limit_changes_the_fingerprint_only_when_not_default(tmp_path):
    paths = {p.name: str(p) for p in [_small_png(tmp_path / _name(1))]}
    inputs = _cache_inputs(paths)
    default = plan_image_cache(*inputs, size=CACHE_SIZE).source_fingerprint()
    explicit = plan_image_cache(
        *inputs, size=CACHE_SIZE, max_image_pixels=imaging.DEFAULT_MAX_IMAGE_PIXELS
    ).source_fingerprint()
    other = plan_image_cache(*inputs, size=CACHE_SIZE, max_image_pixels=10).source_fingerprint()
    assert default == explicit != other
    with pytest.raises(ValueError, match="max_image_pixels"):
        plan_image_cache(*inputs, size=CACHE_SIZE, max_image_pixels=0)
    assert ic.decode_resized(paths[_name(1)], CACHE_SIZE).shape == (CACHE_SIZE, CACHE_SIZE)
