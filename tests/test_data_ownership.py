"""The user's data is sacred: the phantom writes only where it owns the folder, each
configuration environment keeps its derived data apart, and an unchanged phantom is not
rewritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from kedro.io import DatasetError
from PIL import Image

from rare_cxr.datasets import ImageFolderDataset, RawTextDataset
from rare_cxr.ownership import (
    ENV_MARKER,
    PHANTOM_MARKER,
    EnvironmentMismatchError,
    FolderNotOwnedError,
    claim_data_dir,
    claim_phantom_folder,
)

NIH_ROW = "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"


def nih_like_folder(root: Path) -> Path:
    """A folder that looks like a user's NIH download: label table, lists, one real PNG."""
    (root / "images").mkdir(parents=True)
    (root / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n" + NIH_ROW
    )
    (root / "train_val_list.txt").write_text("00000001_000.png")
    (root / "test_list.txt").write_text("")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(
        root / "images" / "00000001_000.png"
    )
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every byte (and every name) under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "d"
        for p in sorted(root.rglob("*"))
    }


def test_claim_rules(tmp_path: Path) -> None:
    new = tmp_path / "new" / "phantom"
    assert claim_phantom_folder(new)["owner"] == "rare-cxr phantom"
    assert (new / PHANTOM_MARKER).is_file()
    claim_phantom_folder(new)  # marked: fine again
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_phantom_folder(empty)
    nih = nih_like_folder(tmp_path / "nih")
    with pytest.raises(FolderNotOwnedError) as err:
        claim_phantom_folder(nih)
    message = str(err.value)
    assert str(nih) in message and "--env nih" in message and "Data_Entry_2017_v2020.csv" in message
    assert not (nih / PHANTOM_MARKER).exists()


def test_raw_datasets_refuse_a_foreign_folder_before_writing_a_byte(tmp_path: Path) -> None:
    nih = nih_like_folder(tmp_path / "nih")
    before = snapshot(nih)
    with pytest.raises(DatasetError, match="refusing to write the synthetic phantom"):
        RawTextDataset(filepath=str(nih / "Data_Entry_2017_v2020.csv")).save("phantom csv")
    with pytest.raises(DatasetError, match="refusing to write the synthetic phantom"):
        ImageFolderDataset(str(nih)).save({"00000002_000.png": np.zeros((8, 8), np.uint8)})
    assert snapshot(nih) == before


def test_optional_raw_file_loads_empty_and_required_one_fails(tmp_path: Path) -> None:
    assert RawTextDataset(filepath=str(tmp_path / "BBox_List_2017.csv"), optional=True).load() == ""
    with pytest.raises(DatasetError):
        RawTextDataset(filepath=str(tmp_path / "test_list.txt")).load()


def test_environment_data_folders_are_owned(tmp_path: Path) -> None:
    base = tmp_path / "data" / "base"
    claim_data_dir(base, None)  # default run env is "local": owner "base"
    claim_data_dir(base, "local")
    assert json.loads((base / ENV_MARKER).read_text())["env"] == "base"
    with pytest.raises(EnvironmentMismatchError, match=r"set `data_dir` in conf/nih/globals.yml"):
        claim_data_dir(base, "nih")
    stranger = tmp_path / "somebody"
    stranger.mkdir()
    (stranger / "thesis.docx").write_text("precious")
    with pytest.raises(EnvironmentMismatchError, match="thesis.docx"):
        claim_data_dir(stranger, "nih")


@pytest.mark.slow
def test_phantom_pipeline_aimed_at_an_nih_folder_refuses_through_the_cli(
    kedro_project, tmp_path
) -> None:
    """The issue's reproduction: the user forgot `--env nih`."""
    nih = nih_like_folder(tmp_path / "my_nih_download")
    before = snapshot(nih)
    done = kedro_project.cli(
        "run", "--pipelines", "phantom", "--params", f"data_root={nih}", check=False
    )
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "refusing to write the synthetic phantom" in log and "--env nih" in log
    assert snapshot(nih) == before  # every byte intact, nothing added


@pytest.mark.slow
def test_unchanged_phantom_is_not_rewritten_and_a_changed_one_is(kedro_project) -> None:
    params = {"phantom": {"n_patients": 8, "image_size": 32, "images_per_patient": 1}}
    kedro_project.run(pipeline="phantom", params=params)
    root = kedro_project.data("01_raw", "phantom")
    stats = {p.name: p.stat().st_mtime_ns for p in root.rglob("*.*") if p.is_file()}
    image = next((root / "images").iterdir())
    kedro_project.run(pipeline="phantom", params=params)
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*.*") if p.is_file()} == stats

    kedro_project.run(pipeline="phantom", params={"phantom": {**params["phantom"], "seed": 7}})
    assert image.stat().st_mtime_ns != stats[image.name] or not image.exists()
    assert json.loads((root / PHANTOM_MARKER).read_text())["images_fingerprint"]


def test_a_fresh_data_folder_holding_only_the_run_locks_is_claimed(tmp_path):
    """The first run of an environment can be a model-only run (inference, one model's
    training): its per-model locks exist before the folder is claimed, and are the project's."""
    from rare_cxr.ownership import ENV_MARKER, claim_data_dir
    from rare_cxr.runs import LockPlan, RunLocks

    data_dir = tmp_path / "data" / "base"
    with RunLocks(data_dir, LockPlan(False, (("multiscale_resnet", False),), combined=True)):
        claim_data_dir(data_dir, None)
    assert (data_dir / ENV_MARKER).is_file()
