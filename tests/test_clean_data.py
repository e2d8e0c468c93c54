"""`make clean-data`: one environment's derived data goes; links, other environments, the raw
download and running work are left alone."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rare_cxr.clean_data import CleanDataError, clean
from rare_cxr.runs import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]


def _populate(project: Path, download: Path) -> None:
    base = project / "data" / "base"
    (base / "05_model_input" / ".gitkeep").parent.mkdir(parents=True, exist_ok=True)
    (base / "05_model_input" / ".gitkeep").write_text("")
    (base / "05_model_input" / "image_cache").mkdir()
    (base / "05_model_input" / "image_cache" / "train.npy").write_bytes(b"x" * 1000)
    (base / "runs").mkdir()
    (base / "runs" / "2026.json").write_text("{}")
    download.mkdir()
    (download / "Data_Entry_2017_v2020.csv").write_text("the user's download")
    (base / "01_raw_link").symlink_to(download, target_is_directory=True)
    (project / "data" / "nih" / "06_models").mkdir(parents=True, exist_ok=True)
    (project / "data" / "nih" / "06_models" / "model.pt").write_text("nih checkpoint")


def test_clean_data_removes_derived_data_keeps_layout_links_targets_and_other_envs(
    kedro_project, tmp_path
):
    project, download = kedro_project.path, tmp_path / "nih-download"
    _populate(project, download)
    said: list[str] = []
    deleted = clean(project, "base", assume_yes=True, out=said.append)
    base = project / "data" / "base"
    assert base / "05_model_input" / "image_cache" in deleted
    assert not (base / "05_model_input" / "image_cache").exists()
    assert not (base / "runs").exists()
    assert (base / "05_model_input" / ".gitkeep").exists()  # the committed layout stays
    assert not (base / "01_raw_link").is_symlink()  # the link went ...
    assert (download / "Data_Entry_2017_v2020.csv").read_text() == "the user's download"  # ...
    assert (project / "data" / "nih" / "06_models" / "model.pt").exists()  # other env untouched
    assert any("(the link only)" in line for line in said)
    assert clean(project, "base", assume_yes=True, out=said.append) == []


def test_clean_data_asks_and_a_no_deletes_nothing(kedro_project, tmp_path):
    _populate(kedro_project.path, tmp_path / "dl")
    kept = clean(kedro_project.path, "base", assume_yes=False, ask=lambda _: "n", out=print)
    assert kept == []
    assert (kedro_project.path / "data" / "base" / "runs" / "2026.json").exists()


def test_clean_data_refuses_while_a_run_holds_the_lock(kedro_project, tmp_path):
    _populate(kedro_project.path, tmp_path / "dl")
    lock = kedro_project.path / "data" / "base" / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b'{"pid": 1, "command": "kedro run"}')
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(CleanDataError, match="kedro run is using"):
            clean(kedro_project.path, "base", assume_yes=True)
    finally:
        os.close(fd)
    assert (kedro_project.path / "data" / "base" / "runs" / "2026.json").exists()


def test_make_clean_data_as_documented(kedro_project, tmp_path):
    """`make clean-data ENV=nih YES=1` (README) through make and the module's command line."""
    _populate(kedro_project.path, tmp_path / "dl")
    done = subprocess.run(
        [
            "make",
            "-f",
            str(ROOT / "Makefile"),
            "clean-data",
            "ENV=nih",
            "YES=1",
            f"BIN={Path(sys.executable).parent}",
        ],
        cwd=kedro_project.path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (kedro_project.path / "data" / "nih" / "06_models" / "model.pt").exists()
    assert (kedro_project.path / "data" / "base" / "runs" / "2026.json").exists()
    # without YES and without a terminal: refuses, deletes nothing
    _populate_again = kedro_project.path / "data" / "nih" / "x.txt"
    _populate_again.write_text("x")
    done = subprocess.run(
        [
            "make",
            "-f",
            str(ROOT / "Makefile"),
            "clean-data",
            "ENV=nih",
            f"BIN={Path(sys.executable).parent}",
        ],
        cwd=kedro_project.path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0 and "pass --yes" in done.stderr
    assert _populate_again.exists()
