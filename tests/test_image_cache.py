"""Image cache: contents, skips, atomicity, fingerprint reuse, the Kedro dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rare_cxr import image_cache as ic
from rare_cxr.datasets import ImageCacheDataset
from rare_cxr.findings import FINDINGS
from rare_cxr.image_cache import ImageCache, ImageCachePlan, plan_image_cache

SIZE = 32


def _labels_row(image_id: str, patient: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    row = {"image_id": image_id, "patient_id": patient}
    row.update(
        {f: int(v) for f, v in zip(FINDINGS, rng.integers(0, 2, len(FINDINGS)), strict=True)}
    )
    return row


def make_nih_like(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A tiny NIH-like folder: 64x64 PNGs (one RGBA, one 16-bit), a corrupt file the index
    missed, a file the index marks corrupt, a missing one and one the index does not list."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"{p:08d}_000.png" for p in range(1, 10)]
    index_rows = []
    for k, image_id in enumerate(ids):
        path = images / image_id
        status = "ok"
        pixels = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        if k == 1:  # RGBA with R=G=B, like two real NIH files
            Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA").save(
                path
            )
        elif k == 2:  # 16-bit grey
            Image.fromarray(pixels.astype(np.uint16) * 257).save(path)
        elif k == 3:  # garbage bytes the index did not catch → fails at decode time
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        elif k == 4:  # the index already knows it is corrupt
            path.write_bytes(b"not a png")
            status = "corrupt"
        elif k == 5:  # missing file
            status = "missing"
        else:
            Image.fromarray(pixels).save(path)
        if k != 6:  # k == 6 exists but is not in the index
            index_rows.append({"image_id": image_id, "path": str(path), "status": status})
        else:
            Image.fromarray(pixels).save(path)
    image_index = pd.DataFrame(index_rows).assign(width=64, height=64, mode="L")
    labels = pd.DataFrame([_labels_row(i, k + 1, k) for k, i in enumerate(ids)])
    split = ["train", "train", "train", "train", "val", "train", "test", "val", "test"]
    splits = pd.DataFrame({"image_id": ids, "patient_id": range(1, 10), "split": split})
    return splits, image_index, labels


def expected_pixels(path: str | Path, size: int = SIZE) -> np.ndarray:
    from rare_cxr.imaging import load_grayscale

    return np.asarray(
        Image.fromarray(load_grayscale(path)).resize((size, size), Image.Resampling.BILINEAR)
    )


@pytest.fixture
def nih_like(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return make_nih_like(tmp_path / "raw")


def _plan(nih_like, size: int = SIZE, workers: int = 1) -> ImageCachePlan:
    return plan_image_cache(*nih_like, size=size, workers=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_contents_skips_and_labels(nih_like, tmp_path: Path, workers: int) -> None:
    splits, image_index, labels = nih_like
    cache = _plan(nih_like, workers=workers).build(tmp_path / "cache")

    assert cache.size == SIZE
    assert cache.findings == FINDINGS
    assert cache.split_names == ["train", "val", "test"]
    paths = dict(zip(image_index["image_id"], image_index["path"], strict=True))
    for name, expected_ids in {
        "train": ["00000001_000.png", "00000002_000.png", "00000003_000.png"],
        "val": ["00000008_000.png"],
        "test": ["00000009_000.png"],
    }.items():
        split = cache.split(name)
        assert isinstance(split.images, np.memmap)
        assert split.images.dtype == np.uint8
        assert split.images.shape == (len(expected_ids), SIZE, SIZE)
        assert not split.images.flags.writeable
        assert split.image_ids == expected_ids
        assert list(split.table.columns) == ["image_id", "patient_id", *FINDINGS]
        for row, image_id in enumerate(expected_ids):
            np.testing.assert_array_equal(split.images[row], expected_pixels(paths[image_id]))
        want = labels.set_index("image_id").loc[expected_ids, list(FINDINGS)].to_numpy(np.float32)
        assert split.labels.dtype == np.float32
        np.testing.assert_array_equal(split.labels, want)

    skipped = cache.skipped.set_index("image_id")
    assert skipped.loc["00000004_000.png", "reason"] == "corrupt"  # failed at decode
    assert skipped.loc["00000004_000.png", "split"] == "train"
    assert skipped.loc["00000005_000.png", "reason"] == "corrupt"  # index said so
    assert skipped.loc["00000006_000.png", "reason"] == "missing"
    assert skipped.loc["00000007_000.png", "reason"] == "not-indexed"
    assert len(skipped) == 4
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["counts"] == {"train": 3, "val": 1, "test": 1}
    assert meta["skipped"] == {"corrupt": 2, "missing": 1, "not-indexed": 1}
    assert not list(tmp_path.glob(".cache.rare-cxr-*"))


def test_interrupted_build_leaves_old_cache_intact(nih_like, tmp_path, monkeypatch) -> None:
    target = tmp_path / "cache"
    calls = {"n": 0}
    real = ic.decode_resized

    def flaky(path: str, size: int, **kwargs: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-build
        return real(path, size, **kwargs)

    monkeypatch.setattr(ic, "decode_resized", flaky)
    with pytest.raises(KeyboardInterrupt):
        _plan(nih_like).build(target)
    assert not target.exists()
    assert not list(tmp_path.glob(".cache.*")) and not list(tmp_path.glob("cache.*"))

    monkeypatch.setattr(ic, "decode_resized", real)
    old = _plan(nih_like).build(target)
    before = np.array(old.split("train").images)

    calls["n"] = 0
    monkeypatch.setattr(ic, "decode_resized", flaky)
    with pytest.raises(KeyboardInterrupt):
        _plan(nih_like, size=16).build(target)  # a different size must rebuild
    intact = ImageCache(target)
    assert intact.size == SIZE
    np.testing.assert_array_equal(intact.split("train").images, before)
    assert not list(tmp_path.glob(".cache.*")) and not list(tmp_path.glob("cache.*"))


def test_leftover_staging_is_never_trusted(nih_like, tmp_path: Path) -> None:
    target = tmp_path / "cache"
    stale = tmp_path / ".cache.rare-cxr-tmp-999999999-0a1b"  # a pid that cannot be alive
    stale.mkdir()
    (stale / "meta.json").write_text("{}")
    cache = _plan(nih_like).build(target)
    assert not stale.exists()
    assert cache.split("train").images.shape[0] == 3


def test_fingerprint_reuse_and_invalidation(nih_like, tmp_path, monkeypatch, caplog) -> None:
    splits, image_index, labels = nih_like
    target = tmp_path / "cache"
    _plan(nih_like).build(target)
    npy = target / "train.npy"
    inode = npy.stat().st_ino
    real = ic.decode_resized

    def boom(path: str, size: int, **kwargs: int) -> np.ndarray:
        raise AssertionError("an up-to-date cache must not be decoded again")

    monkeypatch.setattr(ic, "decode_resized", boom)
    with caplog.at_level("INFO", logger="rare_cxr.image_cache"):
        again = _plan(nih_like).build(target)
    assert "reusing" in caplog.text
    assert npy.stat().st_ino == inode
    hernia = FINDINGS.index("Hernia")
    old_label = again.split("train").labels[0, hernia]

    # new labels, same pixels: tables rewritten, pixels shared (hard link), nothing decoded
    relabelled = labels.copy()
    relabelled.loc[relabelled["image_id"] == "00000001_000.png", "Hernia"] = 1 - int(
        labels.loc[labels["image_id"] == "00000001_000.png", "Hernia"].iloc[0]
    )
    cache = plan_image_cache(splits, image_index, relabelled, size=SIZE, workers=1).build(target)
    assert cache.split("train").labels[0, hernia] != old_label
    assert npy.stat().st_ino == inode  # pixels hard-linked, not decoded again
    assert cache.skipped["reason"].value_counts().to_dict() == {
        "corrupt": 2,
        "missing": 1,
        "not-indexed": 1,
    }

    # a replaced file (new mtime/size) invalidates the cache
    monkeypatch.setattr(ic, "decode_resized", real)
    path = Path(image_index.loc[0, "path"])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    rebuilt = plan_image_cache(splits, image_index, relabelled, size=SIZE, workers=1).build(target)
    assert rebuilt.fingerprint != again.fingerprint
    assert int(np.asarray(rebuilt.split("train").images[0]).max()) == 0


def test_dataset_save_load_exists(nih_like, tmp_path: Path) -> None:
    dataset = ImageCacheDataset(path=str(tmp_path / "cache"))
    assert not dataset.exists()
    dataset.save(_plan(nih_like))
    assert dataset.exists()
    cache = dataset.load()
    assert isinstance(cache, ImageCache)
    assert len(cache.split("val")) == 1
    with pytest.raises(Exception, match="ImageCachePlan"):
        dataset.save(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(KeyError, match="no split 'nope'"):
        cache.split("nope")


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"size": 0}, "image_cache.size"),
        ({"size": "128"}, "image_cache.size"),
        ({"size": 64, "workers": -1}, "image_cache.workers"),
        ({"size": 64, "sise": 1}, "sise"),
    ],
)
def test_cache_params_errors_name_the_key(params: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ic.validate_cache_params(params)


def test_unlabelled_split_image_is_an_error(nih_like) -> None:
    splits, image_index, labels = nih_like
    with pytest.raises(ValueError, match="not in labels"):
        plan_image_cache(splits, image_index, labels.iloc[1:], size=SIZE)


@pytest.mark.real_data
def test_real_nih_images(nih_sample: Path, tmp_path: Path) -> None:
    from rare_cxr.imaging import load_grayscale

    files = sorted((nih_sample / "images").glob("*.png"))
    rgba = [f for f in files if Image.open(f).mode == "RGBA"][:1]
    chosen = (rgba + [f for f in files if f not in rgba])[:2]
    ids = [f.name for f in chosen]
    splits = pd.DataFrame({"image_id": ids, "patient_id": [1, 2], "split": "train"})
    index = pd.DataFrame({"image_id": ids, "path": [str(f) for f in chosen], "status": "ok"})
    labels = pd.DataFrame([_labels_row(i, k + 1, k) for k, i in enumerate(ids)])
    cache = plan_image_cache(splits, index, labels, size=64, workers=1).build(tmp_path / "c")
    images = cache.split("train").images
    assert images.shape == (2, 64, 64)
    for row, f in enumerate(chosen):
        gray = load_grayscale(f)
        assert gray.shape == (1024, 1024)
        np.testing.assert_array_equal(images[row], expected_pixels(f, 64))
