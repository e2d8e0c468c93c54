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
