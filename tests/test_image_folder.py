"""ImageFolderDataset: the NIH folder layouts, path tricks, and stale-file-free saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kedro.io import DatasetError
from PIL import Image

from rare_cxr.datasets import ImageFolderDataset
from rare_cxr.datasets.image_folder import validate_image_id


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


def test_load_finds_flat_and_kaggle_nested_layouts(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "00000001_000.png")
    _png(tmp_path / "images_002" / "images" / "00000002_000.png")
    _png(tmp_path / "images_003" / "images" / "00000003_001.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    found = ImageFolderDataset(str(tmp_path)).load()
    assert list(found) == ["00000001_000.png", "00000002_000.png", "00000003_001.png"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in found.values())


def test_load_of_absent_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nowhere")).load()


@pytest.mark.parametrize("bad", ["../00000001_000.png", "a/b.png", "a\\b.png", ".hidden.png", ""])
def test_path_tricks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="image id"):
        validate_image_id(bad)


def test_save_replaces_the_folder_without_stale_images(tmp_path: Path) -> None:
    dataset = ImageFolderDataset(str(tmp_path))
    dataset.save({f"0000000{i}_000.png": np.full((8, 8), i, np.uint8) for i in range(3)})
    dataset.save({"00000009_000.png": lambda: Image.new("L", (8, 8), 200)})
    assert list(dataset.load()) == ["00000009_000.png"]
    assert np.asarray(Image.open(tmp_path / "images" / "00000009_000.png")).max() == 200
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".images-")]


def test_failed_save_keeps_the_previous_images(tmp_path: Path) -> None:
    dataset = ImageFolderDataset(str(tmp_path))
    dataset.save({"00000001_000.png": np.zeros((8, 8), np.uint8)})
    with pytest.raises(DatasetError, match="00000002_000.png"):
        dataset.save({"00000002_000.png": "not an image"})
    assert list(dataset.load()) == ["00000001_000.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".images-")]


def test_parallel_save_of_a_phantom_is_byte_identical_to_the_serial_one(tmp_path: Path) -> None:
    """The phantom's films rendered and encoded by 3 worker processes (more than this machine's
    cores, with small chunks, so the work interleaves) give the same files, byte for byte, as
    one process; and both give what `render_image` draws."""
    import hashlib

    from rare_cxr.datasets import image_folder
    from rare_cxr.phantom import render_image
    from rare_cxr.pipelines.phantom.nodes import generate_phantom

    params = {"n_patients": 40, "images_per_patient": [1, 4], "image_size": 32, "seed": 3}
    images = generate_phantom(params)[5]
    assert len(images) >= image_folder.MIN_PARALLEL_IMAGES  # else the pool is skipped
    assert image_folder.resolve_workers(3, len(images)) == 3
    assert image_folder.chunk_size(len(images), 3) < len(images) // 3  # several tasks each

    def digests(root: Path) -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "images").iterdir())
        }

    ImageFolderDataset(str(tmp_path / "serial"), workers=1).save(images)
    ImageFolderDataset(str(tmp_path / "parallel"), workers=3).save(images)
    serial, parallel = digests(tmp_path / "serial"), digests(tmp_path / "parallel")
    assert list(serial) == sorted(images) and serial == parallel
    first = sorted(images)[0]
    decoded = np.asarray(Image.open(tmp_path / "parallel" / "images" / first))
    assert np.array_equal(decoded, render_image(images[first].args[0], 32))


def test_failed_parallel_save_keeps_the_previous_images(tmp_path: Path) -> None:
    """A worker's error (one bad image among many) reaches the caller naming the image, and the
    previous folder stays as it was: the staging folder is dropped whole."""
    dataset = ImageFolderDataset(str(tmp_path), workers=2)
    good = {f"{i:08d}_000.png": np.full((8, 8), i % 255, np.uint8) for i in range(1, 101)}
    dataset.save(good)
    bad = {**good, "00000050_000.png": "not an image"}
    with pytest.raises(DatasetError, match="00000050_000.png"):
        dataset.save(bad)
    assert list(dataset.load()) == sorted(good)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".images-")]
